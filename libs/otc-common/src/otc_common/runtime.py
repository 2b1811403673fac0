"""The runtime every service shares: logs, database, bus, health, metrics, drain on SIGTERM.

A service's `__main__` builds its settings, creates a `Service`, registers its
consumers and loops, and calls `run()`; what differs between services is only
their rules and handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from otc_common.bus import Bus, ConsumerRunner, Handler, OutboxRelay
from otc_common.db import Pool, create_pool, migrate_when_reachable, package_migrations
from otc_common.logs import setup_logging
from otc_common.registry import Registry, load_registry
from otc_common.settings import BaseSettings, ConfigError, config_exit
from otc_common.subjects import ConsumerSpec

log = logging.getLogger("otc.runtime")

#: A loop that has not beaten for this long fails liveness, so Kubernetes restarts the pod.
STALL_SECONDS = 90.0


class Loop:
    """A long-running task with a heartbeat the liveness probe watches."""

    def __init__(
        self, name: str, factory: Callable[[Loop], Coroutine[Any, Any, None]], *, watched: bool = True
    ) -> None:
        self.name = name
        self.factory = factory
        self.watched = watched
        self.last_beat = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def beat(self) -> None:
        self.last_beat = time.monotonic()


class Service:
    def __init__(
        self,
        name: str,
        settings: BaseSettings,
        *,
        schema: str | None,
        migrations_package: str | None = None,
        extra_migrations: Sequence[tuple[str, str]] = (),
        health_server: bool = True,
    ) -> None:
        self.health_server = health_server
        self.name = name
        self.settings = settings
        self.schema = schema
        self.migrations_package = migrations_package
        self.extra_migrations = list(extra_migrations)
        self.pool: Pool | None = None
        #: Further pools of the service's own (open_pool), closed with it.
        self._pools: list[Pool] = []
        self.bus: Bus | None = None
        self.registry: Registry | None = None
        self.relay: OutboxRelay | None = None
        self.consumers: list[ConsumerRunner] = []
        self._consumer_specs: list[tuple[ConsumerSpec, Handler]] = []
        self._loops: list[Loop] = []
        self._stop = asyncio.Event()
        self._on_stop: list[Callable[[], None]] = []
        self._http: asyncio.AbstractServer | None = None
        self.started = False

    # ----------------------------------------------------------------- building

    def consume(self, spec: ConsumerSpec, handler: Handler) -> None:
        self._consumer_specs.append((spec, handler))

    def loop(self, name: str, factory: Callable[[Loop], Coroutine[Any, Any, None]], *, watched: bool = True) -> None:
        """A background task; a watched one must call `loop.beat()` or liveness fails."""
        self._loops.append(Loop(name, factory, watched=watched))

    async def add_consumer(self, spec: ConsumerSpec, handler: Handler) -> None:
        """For consumers whose handler needs the started service (call from `setup`)."""
        await self.nats.provision_consumer(spec)
        self.consumers.append(ConsumerRunner(self.nats, self.db, spec, handler))

    def on_stop(self, callback: Callable[[], None]) -> None:
        self._on_stop.append(callback)

    async def open_pool(self, max_size: int) -> Pool:
        """A further pool on the service's schema, closed when the service stops: work that would otherwise keep
        the consumers waiting for a connection gets its own (call from `setup`)."""
        assert self.schema is not None, "the service has no database"
        pool = await create_pool(self.settings.database_url, self.schema, max_size=max_size)
        self._pools.append(pool)
        return pool

    @property
    def db(self) -> Pool:
        assert self.pool is not None, "service not started"
        return self.pool

    @property
    def nats(self) -> Bus:
        assert self.bus is not None, "service not started"
        return self.bus

    # ----------------------------------------------------------------- health

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        stalled = [loop.name for loop in self._loops if loop.watched and now - loop.last_beat > STALL_SECONDS]
        stalled += [c.spec.durable for c in self.consumers if now - c.last_beat > STALL_SECONDS]
        if self.relay is not None and now - self.relay.last_beat > STALL_SECONDS:
            stalled.append("outbox-relay")
        return not stalled, {"status": "ok" if not stalled else "stalled", "stalled": stalled}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, str] = {}
        checks["nats"] = "ok" if self.bus is not None and self.bus.connected else "down"
        if self.schema is None:
            checks["postgres"] = "not used"
        elif self.pool is None:
            checks["postgres"] = "down"
        else:
            try:
                async with asyncio.timeout(2):
                    await self.pool.fetchval("SELECT 1")
                checks["postgres"] = "ok"
            except Exception as exc:  # any failure means not ready
                checks["postgres"] = f"down: {type(exc).__name__}"
        ready = self.started and all(v in ("ok", "not used") for v in checks.values())
        return ready, {"status": "ready" if ready else "not ready", "checks": checks}

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            status, content_type, body = await self.http_response(path.split("?")[0])
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def http_response(self, path: str) -> tuple[str, str, bytes]:
        from otc_common.messages import encode

        if path == "/healthz":
            ok, body = self.liveness()
            return ("200 OK" if ok else "503 Service Unavailable", "application/json", encode(body))
        if path == "/readyz":
            ok, body = await self.readiness()
            return ("200 OK" if ok else "503 Service Unavailable", "application/json", encode(body))
        if path == "/metrics":
            return ("200 OK", CONTENT_TYPE_LATEST, generate_latest())
        return ("404 Not Found", "text/plain", b"not found")

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        setup_logging(self.name, self.settings.log_level)
        try:
            self.registry = load_registry(self.settings.registry_file)
        except ConfigError as exc:
            config_exit(str(exc))
        if self.health_server:
            self._http = await asyncio.start_server(self._serve_http, self.settings.http_host, self.settings.http_port)
        if self.schema is not None:
            self.pool = await create_pool(self.settings.database_url, self.schema, max_size=self.settings.db_pool_size)
            migrations = package_migrations(self.migrations_package) if self.migrations_package else []
            await migrate_when_reachable(self.pool, self.schema, [*migrations, *self.extra_migrations])
        self.bus = await Bus.connect(self.settings.nats_url, self.name)
        await self.bus.provision_streams()
        for spec, handler in self._consumer_specs:
            await self.bus.provision_consumer(spec)
            assert self.pool is not None, "consumers need the database for their inbox"
            self.consumers.append(ConsumerRunner(self.bus, self.pool, spec, handler))
        if self.pool is not None and self.schema is not None:
            self.relay = OutboxRelay(self.pool, self.bus, self.schema, self.settings.database_url)

    def _spawn(self) -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(c.run(), name=f"consumer:{c.spec.durable}") for c in self.consumers]
        if self.relay is not None:
            tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        for loop in self._loops:
            loop.task = asyncio.create_task(loop.factory(loop), name=f"loop:{loop.name}")
            tasks.append(loop.task)
        return tasks

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, setup: Callable[[], Awaitable[None]] | None = None) -> None:
        """Starts, calls `setup` (database and bus are up), runs until SIGTERM/SIGINT, then drains."""
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, self.request_stop)
        await self.start()
        if setup is not None:
            await setup()
        tasks = self._spawn()
        self.started = True
        log.info("started", extra={"http_port": self.settings.http_port})
        stop_waiter = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop_waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_waiter and task.exception() is not None:
                log.error("task %s died", task.get_name(), exc_info=task.exception())
        await self.shutdown(tasks)

    async def shutdown(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        self.started = False
        log.info("draining", extra={"grace_seconds": self.settings.drain_seconds})
        for callback in self._on_stop:
            callback()
        for consumer in self.consumers:
            consumer.stopping.set()
        consumer_tasks = [t for t in tasks if t.get_name().startswith("consumer:")]
        if consumer_tasks:
            await asyncio.wait(consumer_tasks, timeout=self.settings.drain_seconds)
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.relay.drain(), timeout=5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.close(), timeout=5)
        for pool in [*self._pools, *([self.pool] if self.pool is not None else [])]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), timeout=5)
        if self._http is not None:
            self._http.close()
        log.info("stopped")


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Runs a service's main coroutine to the end on uvloop. Under load, asyncio's own event loop (written in
    Python) was a large part of a service's CPU: its timers, callbacks and socket transports."""
    uvloop.run(main)
