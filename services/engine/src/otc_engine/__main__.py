"""Engine: the deal stage machine. Builds the runtime, registers handlers, runs until SIGTERM."""

from __future__ import annotations

import asyncio

from otc_common import subjects
from otc_common.runtime import Loop, Service
from otc_common.settings import settings_or_exit
from otc_engine.api import EngineApi
from otc_engine.service import Engine
from otc_engine.settings import EngineSettings
from otc_engine.sweeper import run_sweeper


async def serve() -> None:
    settings = settings_or_exit(EngineSettings)
    service = Service("engine", settings, schema="engine", migrations_package="otc_engine")
    holder: dict[str, Engine] = {}

    async def sweeper(loop: Loop) -> None:
        await run_sweeper(holder["engine"], loop)

    service.loop("deadline-sweep", sweeper)

    async def setup() -> None:
        assert service.registry is not None
        engine = Engine(service.db, service.registry)
        holder["engine"] = engine
        api = EngineApi(engine)
        await service.nats.nc.subscribe(subjects.ENGINE_RPC, queue=subjects.ENGINE_RPC_QUEUE_GROUP, cb=api.on_request)

    await service.run(setup=setup)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
