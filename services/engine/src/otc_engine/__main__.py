"""Engine: the deal stage machine. Builds the runtime, registers handlers, runs until SIGTERM."""

from __future__ import annotations

from datetime import timedelta

from otc_common import subjects
from otc_common.runtime import Loop, Service, run_service
from otc_common.settings import settings_or_exit
from otc_common.subjects import ConsumerSpec
from otc_engine import notify
from otc_engine.admin import serve_admin
from otc_engine.api import EngineApi
from otc_engine.handlers import TANK_RESULTS, DealConsumer, DealHandler, Handlers, chain_events, queue_results
from otc_engine.metrics import refresh_stage_gauge
from otc_engine.service import Engine
from otc_engine.settings import EngineSettings
from otc_engine.solvency import run_solvency
from otc_engine.sweeper import run_sweeper, run_unwatcher


async def serve() -> None:
    settings = settings_or_exit(EngineSettings)
    service = Service("engine", settings, schema="engine", migrations_package="otc_engine")
    notifications = notify.register(service, settings)
    engine: list[Engine] = []

    async def sweeper(loop: Loop) -> None:
        await run_sweeper(engine[0], loop)

    async def unwatcher(loop: Loop) -> None:
        await run_unwatcher(engine[0], loop)

    async def stage_gauge(loop: Loop) -> None:
        await refresh_stage_gauge(service.db, loop, engine[0].registry.chains)

    async def solvency(loop: Loop) -> None:
        await run_solvency(engine[0], engine[0].registry, loop, interval_seconds=settings.solvency_interval_seconds)

    service.loop("solvency-check", solvency)
    service.loop("deadline-sweep", sweeper)
    service.loop("stage-gauge", stage_gauge)
    service.loop("post-close-unwatch", unwatcher)

    async def setup() -> None:
        assert service.registry is not None
        engine.append(Engine(service.db, service.registry, timedelta(seconds=settings.post_close_watch_seconds)))
        handlers = Handlers(engine[0], service.registry)
        consumers: list[tuple[ConsumerSpec, DealHandler]] = [(TANK_RESULTS, handlers.tank)]
        for chain in sorted(service.registry.chains):
            consumers += [(chain_events(chain), handlers.chain), (queue_results(chain), handlers.queue)]
        for spec, handler in consumers:
            await service.nats.provision_consumer(spec)
            service.consumers.append(DealConsumer(service.nats, service.db, spec, handler, handlers))
        api = EngineApi(engine[0])
        await notifications.setup(api)
        await service.nats.nc.subscribe(subjects.ENGINE_RPC, queue=subjects.ENGINE_RPC_QUEUE_GROUP, cb=api.on_request)
        await serve_admin(service, engine[0])

    await service.run(setup=setup)


def main() -> None:
    run_service(serve())


if __name__ == "__main__":
    main()
