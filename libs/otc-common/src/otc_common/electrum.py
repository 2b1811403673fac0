"""An asyncio client of the Electrum protocol that stays connected: it reconnects forever and re-subscribes.

    client = ElectrumClient("tcp://127.0.0.1:50001")
    client.on_notification("blockchain.headers.subscribe", on_header)
    await client.start()
    tip = await client.subscribe("blockchain.headers.subscribe")
    history = await client.request("blockchain.scripthash.get_history", scripthash)

A request waits for a connection within its time-out. A request whose connection is lost fails with
`ElectrumUnavailable` and is not sent again: whether it took effect (a broadcast) is for the caller to
find out. Subscriptions are remembered and sent again after every reconnect; their fresh results are
delivered like notifications, as `[*params, result]`, so a subscriber learns what changed while the
connection was down (a notification tells the current state, so one that repeats it is harmless).
Amounts in coins (relay fee, fee estimates) decode as Decimal, never float.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "ElectrumClient",
    "ElectrumError",
    "ElectrumTimeout",
    "ElectrumUnavailable",
    "Endpoint",
    "parse_url",
]

log = logging.getLogger("otc.electrum")

PROTOCOL_VERSION = "1.4"
#: Answers can be large (2016 headers, a long history); a line beyond this is a broken server.
MAX_LINE = 64 * 1024 * 1024
#: Re-subscriptions in flight at once after a reconnect.
RESUBSCRIBE_BATCH = 256

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(float_hook=Decimal)

NotificationCallback = Callable[[list[Any]], None]


class ElectrumError(Exception):
    """The server answered a request with an error object; `message` is the server's own text."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message


class ElectrumUnavailable(ConnectionError):
    """No connection to the server, or the connection was lost before the answer came."""


class ElectrumTimeout(TimeoutError):
    """The server did not answer within the time-out."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'ssl' if self.tls else 'tcp'}://{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """`tcp://host:port`, or `ssl://host:port` for a server that speaks TLS."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        port = None
        parts = urlsplit("")
    if parts.scheme not in ("tcp", "ssl") or not parts.hostname or not port:
        raise ValueError("an Electrum server is given as tcp://host:port or ssl://host:port")
    return Endpoint(parts.hostname, port, parts.scheme == "ssl")


class _Connection:
    """One session with the server: its pending requests and the task that reads its answers."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        notify: Callable[[str, list[Any]], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._notify = notify
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self.lost: ElectrumUnavailable | None = None
        self._gone = asyncio.Event()
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def call(self, method: str, params: list[Any]) -> Any:
        if self.lost is not None:
            raise self.lost
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (method, future)
        try:
            line = _encoder.encode({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            self._writer.write(line + b"\n")
            await self._writer.drain()
            return await future
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, ElectrumUnavailable):
                raise
            self.abort(f"sending failed ({type(exc).__name__})")
            raise ElectrumUnavailable(f"{method}: the connection to the Electrum server was lost") from None
        finally:
            self._pending.pop(request_id, None)

    async def _read(self) -> None:
        reason = "the server closed the connection"
        try:
            while line := await self._reader.readline():
                try:
                    message = _decoder.decode(line)
                except msgspec.DecodeError:
                    reason = "the server sent a line that is not JSON"
                    break
                for item in message if isinstance(message, list) else [message]:
                    self._dispatch(item)
        except ValueError:
            reason = f"the server sent a line longer than {MAX_LINE} bytes"
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            reason = f"{type(exc).__name__}"
        finally:
            self._lose(reason)

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if isinstance(method, str) and "id" not in message:
            params = message.get("params")
            self._notify(method, params if isinstance(params, list) else [])
            return
        request_id = message.get("id")
        entry = self._pending.get(request_id) if isinstance(request_id, int) else None
        if entry is None:
            return
        name, future = entry
        if future.done():
            return
        error = message.get("error")
        if error is None:
            future.set_result(message.get("result"))
        elif isinstance(error, dict):
            code = error.get("code")
            future.set_exception(
                ElectrumError(name, code if isinstance(code, int) else 0, str(error.get("message", "")))
            )
        else:
            future.set_exception(ElectrumError(name, 0, str(error)))

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = ElectrumUnavailable(f"the connection to the Electrum server was lost: {reason}")
        for _method, future in self._pending.values():
            if not future.done():
                future.set_exception(self.lost)
        self._writer.close()
        self._gone.set()
        self._on_lost()

    def abort(self, reason: str) -> None:
        """Drops the connection now; the reader sees the end and fails what is pending."""
        transport = self._writer.transport
        if transport is not None:
            transport.abort()
        self._lose(reason)

    async def wait_lost(self) -> None:
        await self._gone.wait()

    async def close(self) -> None:
        self.abort("closed by the client")
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reading
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class ElectrumClient:
    """One server, one connection at a time, re-established with backoff for as long as the client runs."""

    def __init__(
        self,
        url: str,
        *,
        client_name: str = "otc",
        protocol_version: str = PROTOCOL_VERSION,
        request_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        ping_interval: float = 30.0,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self.endpoint = parse_url(url)
        self.client_name = client_name
        self.protocol_version = protocol_version
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        #: Called with the method of every request sent (re-subscriptions and pings included), for metrics.
        self.on_request = on_request
        #: The server's answer to `server.version`: [server software, negotiated protocol].
        self.server_version: list[str] = []
        #: Connections made so far; a new value means subscriptions were re-sent and state may have changed.
        self.generation = 0
        #: Why the last connection attempt failed or the last connection ended.
        self.last_error = ""
        self._handlers: dict[str, list[NotificationCallback]] = {}
        self._connect_callbacks: list[Callable[[], None]] = []
        self._subscriptions: dict[bytes, tuple[str, list[Any]]] = {}
        #: Subscriptions whose own subscribe() call is under way: a reconnect leaves them to it.
        self._in_flight: dict[bytes, int] = {}
        self._connection: _Connection | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # ----------------------------------------------------------------- set-up

    @classmethod
    async def connect(cls, url: str, **options: Any) -> ElectrumClient:
        """A started client that is connected (ElectrumUnavailable if that takes longer than connect_timeout)."""
        client = cls(url, **options)
        await client.start()
        try:
            await client.wait_connected(client.connect_timeout)
        except BaseException:
            await client.close()
            raise
        return client

    def on_notification(self, method: str, callback: NotificationCallback) -> None:
        """`callback(params)` for each notification of `method`; it runs on the reading task, so keep it short."""
        self._handlers.setdefault(method, []).append(callback)

    def notifications(self, method: str) -> asyncio.Queue[list[Any]]:
        """A queue that receives the params of every notification of `method`."""
        queue: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.on_notification(method, queue.put_nowait)
        return queue

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Called after each connection (the first and every reconnect), before subscriptions are re-sent."""
        self._connect_callbacks.append(callback)

    async def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._maintain(), name=f"electrum:{self.endpoint}")

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.lost is None

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the caller's bound
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise ElectrumUnavailable(self._not_connected(timeout)) from None

    def _not_connected(self, waited: float | None) -> str:
        why = f": {self.last_error}" if self.last_error else ""
        after = "" if waited is None else f" after {waited:g}s"
        return f"not connected to the Electrum server at {self.endpoint}{after}{why}"

    # ----------------------------------------------------------------- requests

    async def request(self, method: str, *params: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """The result of one call; ElectrumError, ElectrumUnavailable or ElectrumTimeout otherwise."""
        limit = self.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        connection = await self._current(deadline, limit)
        self._count(method)
        try:
            async with asyncio.timeout_at(deadline):
                return await connection.call(method, list(params))
        except TimeoutError:
            raise ElectrumTimeout(f"{method}: no answer from the Electrum server within {limit:g}s") from None

    async def subscribe(self, method: str, *params: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Subscribes now and after every reconnect; returns the current result (the status, the tip).

        The subscription is remembered even when this call fails, so a reconnect sends it again.
        """
        key = _key(method, params)
        self._subscriptions[key] = (method, list(params))
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            return await self.request(method, *params, timeout=timeout)
        finally:
            if self._in_flight[key] == 1:
                del self._in_flight[key]
            else:
                self._in_flight[key] -= 1

    def forget(self, method: str, *params: Any) -> None:
        """Not re-sent after the next reconnect (protocol 1.4 cannot unsubscribe on a live connection)."""
        self._subscriptions.pop(_key(method, params), None)

    @property
    def subscriptions(self) -> int:
        return len(self._subscriptions)

    async def _current(self, deadline: float, limit: float) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            connection = self._connection
            if connection is not None and connection.lost is None:
                return connection
            if self._closing:
                raise ElectrumUnavailable("the Electrum client is closed")
            if loop.time() >= deadline:
                raise ElectrumUnavailable(self._not_connected(limit))
            try:
                async with asyncio.timeout_at(deadline):
                    await self._connected.wait()
            except TimeoutError:
                raise ElectrumUnavailable(self._not_connected(limit)) from None

    def _count(self, method: str) -> None:
        if self.on_request is not None:
            self.on_request(method)

    def _notify(self, method: str, params: list[Any]) -> None:
        for callback in self._handlers.get(method, ()):
            try:
                callback(params)
            except Exception:
                log.exception("a notification handler failed", extra={"method": method})

    # ----------------------------------------------------------------- the connection

    async def _maintain(self) -> None:
        delay = self.min_backoff
        failures = 0
        while not self._closing:
            try:
                connection = await self._open()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, ElectrumError) as exc:
                self.last_error = _describe(exc)
                failures += 1
                # The first failure is worth a warning; a server that stays down is not worth one per attempt.
                level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
                log.log(
                    level, "Electrum server not reachable (%s); retrying", self.last_error, extra={"attempt": failures}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            failures = 0
            delay = self.min_backoff
            self._connection = connection
            self.generation += 1
            self._connected.set()
            log.info(
                "connected to the Electrum server",
                extra={"server": self.server_version, "generation": self.generation},
            )
            for callback in self._connect_callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("a connect callback failed")
            helpers = [
                asyncio.get_running_loop().create_task(self._resubscribe(connection)),
                asyncio.get_running_loop().create_task(self._ping(connection)),
            ]
            try:
                await connection.wait_lost()
            finally:
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                self._connected.clear()
                self._connection = None
                await connection.close()
            if connection.lost is not None:
                self.last_error = str(connection.lost)
            if not self._closing:
                log.warning("%s; reconnecting", self.last_error)
                await asyncio.sleep(delay)

    async def _open(self) -> _Connection:
        endpoint = self.endpoint
        context = ssl.create_default_context() if endpoint.tls else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, limit=MAX_LINE, ssl=context),
            self.connect_timeout,
        )
        connection = _Connection(reader, writer, self._notify, self._connected.clear)
        try:
            self._count("server.version")
            answer = await asyncio.wait_for(
                connection.call("server.version", [self.client_name, self.protocol_version]), self.connect_timeout
            )
        except BaseException:
            await connection.close()
            raise
        self.server_version = [str(part) for part in answer] if isinstance(answer, list) else [str(answer)]
        return connection

    async def _resubscribe(self, connection: _Connection) -> None:
        """Sends every remembered subscription again and hands each fresh result to the subscribers."""
        items = [item for key, item in self._subscriptions.items() if key not in self._in_flight]
        for start in range(0, len(items), RESUBSCRIBE_BATCH):
            batch = items[start : start + RESUBSCRIBE_BATCH]
            for method, _params in batch:
                self._count(method)
            results = await asyncio.gather(
                *(asyncio.wait_for(connection.call(method, params), self.request_timeout) for method, params in batch),
                return_exceptions=True,
            )
            for (method, params), result in zip(batch, results, strict=True):
                if isinstance(result, ElectrumUnavailable):
                    return  # the next connection sends them all again
                if isinstance(result, BaseException):
                    log.warning("re-subscribing failed: %s", _describe(result), extra={"method": method})
                    continue
                self._notify(method, [*params, result])

    async def _ping(self, connection: _Connection) -> None:
        """Keeps the session alive and notices a server that stopped answering on a connection that looks open."""
        while connection.lost is None:
            await asyncio.sleep(self.ping_interval)
            try:
                self._count("server.ping")
                await asyncio.wait_for(connection.call("server.ping", []), self.request_timeout)
            except TimeoutError:
                connection.abort(f"no answer to a ping within {self.request_timeout:g}s")
                return
            except (ElectrumError, ElectrumUnavailable):
                continue

    # ----------------------------------------------------------------- shutdown

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        self._connected.clear()

    async def __aenter__(self) -> ElectrumClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _key(method: str, params: tuple[Any, ...] | list[Any]) -> bytes:
    return _encoder.encode([method, list(params)])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ElectrumError | ElectrumUnavailable):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
