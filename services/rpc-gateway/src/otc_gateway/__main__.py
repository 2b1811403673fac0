"""rpc-gateway: JSON-RPC API and pages. Builds the runtime, serves HTTP, runs until SIGTERM."""

from __future__ import annotations

import contextlib
from collections.abc import Generator

import uvicorn
import uvloop

from otc_common.runtime import Loop, Service
from otc_common.settings import settings_or_exit
from otc_gateway.app import create_app
from otc_gateway.live import LiveHub
from otc_gateway.ratelimit import Limits
from otc_gateway.rpc import RpcHandler
from otc_gateway.settings import GatewaySettings
from otc_gateway.status_cache import StatusCache


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The shared runtime owns SIGTERM/SIGINT and drains everything in order.
        yield


async def serve() -> None:
    settings = settings_or_exit(GatewaySettings)
    service = Service("rpc-gateway", settings, schema=None, health_server=False)
    server: dict[str, _Server] = {}

    async def http(loop: Loop) -> None:
        await server["uvicorn"].serve()

    service.loop("http", http, watched=False)

    async def setup() -> None:
        assert service.registry is not None
        limits = Limits(
            settings.rate_client_per_second,
            settings.rate_client_burst,
            settings.rate_deal_per_second,
            settings.rate_deal_burst,
        )
        cache = StatusCache(settings.status_cache_seconds, settings.status_cache_size)
        await cache.start(service.nats.nc)
        rpc = RpcHandler(service, service.registry, settings.public_base_url, limits, cache)
        hub = LiveHub()
        await hub.start(service.nats.nc)
        config = uvicorn.Config(
            create_app(service, rpc, settings, hub),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            http="httptools",
            # Party links carry their token in the path: no access log, ever.
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server["uvicorn"] = _Server(config)

        def stop_http() -> None:
            # Open event streams would otherwise hold the server open until the drain timeout.
            hub.stop()
            server["uvicorn"].should_exit = True

        service.on_stop(stop_http)

    await service.run(setup=setup)


def main() -> None:
    uvloop.run(serve())


if __name__ == "__main__":
    main()
