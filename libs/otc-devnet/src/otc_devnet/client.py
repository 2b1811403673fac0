"""A small asyncio Electrum client: requests, and the server's notifications on a queue.

    async with await ElectrumClient.connect("tcp://127.0.0.1:50001") as client:
        status = await client.request("blockchain.scripthash.subscribe", scripthash)
        method, params = await client.notifications.get()

Amounts in coins (relayfee, verbose transaction values) decode as Decimal, never float.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from decimal import Decimal
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import msgspec

__all__ = ["ElectrumClient", "ElectrumError"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(float_hook=Decimal)
_MAX_LINE = 64 * 1024 * 1024


class ElectrumError(Exception):
    """An error object the server answered with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


class ElectrumClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        #: (method, params) of every notification, in arrival order
        self.notifications: asyncio.Queue[tuple[str, list[Any]]] = asyncio.Queue()
        self.server_version: list[str] = []
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        client_name: str = "otc",
        protocol_version: str | list[str] = "1.4",
        timeout: float = 10.0,  # noqa: ASYNC109 - bounds the connect and the version handshake together
    ) -> ElectrumClient:
        """Connect to tcp://host:port and negotiate the protocol version (the required first call)."""
        parts = urlsplit(url)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise ValueError(f"expected tcp://host:port, got {url!r}")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port, limit=_MAX_LINE), timeout
        )
        client = cls(reader, writer)
        try:
            client.server_version = await asyncio.wait_for(
                client.request("server.version", client_name, protocol_version), timeout
            )
        except BaseException:
            await client.close()
            raise
        return client

    async def request(self, method: str, *params: Any) -> Any:
        """Send one request and wait for its result; ElectrumError if the server answers with an error."""
        if self._listener.done():
            raise ConnectionError("the connection to the Electrum server is closed")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": list(params)}
        try:
            self._writer.write(_encoder.encode(message) + b"\n")
            await self._writer.drain()
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _listen(self) -> None:
        error: BaseException = ConnectionError("the Electrum server closed the connection")
        try:
            while line := await self._reader.readline():
                message = _decoder.decode(line)
                for item in message if isinstance(message, list) else [message]:
                    self._dispatch(item)
        except (ConnectionError, asyncio.IncompleteReadError, msgspec.DecodeError, ValueError) as exc:
            error = ConnectionError(f"Electrum connection lost: {exc}")
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    def _dispatch(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        if "method" in message and "id" not in message:
            self.notifications.put_nowait((message["method"], message.get("params") or []))
            return
        request_id = message.get("id")
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if future is None or future.done():
            return
        error = message.get("error")
        if error is not None:
            future.set_exception(ElectrumError(int(error.get("code", 0)), str(error.get("message", ""))))
        else:
            future.set_result(message.get("result"))

    async def close(self) -> None:
        self._listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._listener
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> ElectrumClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
