"""Plain JSON-RPC over HTTP, with batches: the signing path makes two round trips before it signs.

Every call is counted per chain and method. Errors never carry the node URL (it may hold an API key).
"""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
import msgspec

from otc_common import metrics as common_metrics
from otc_queue import metrics


class RpcUnavailable(Exception):
    """The node did not answer usably: try again later."""


class RpcError(Exception):
    """The node answered this call with a JSON-RPC error."""

    def __init__(self, method: str, code: int | None, message: str) -> None:
        super().__init__(f"{method}: {message}")
        self.method = method
        self.code = code
        self.message = message


_encoder = msgspec.json.Encoder()


class JsonRpc:
    def __init__(self, chain: str, url: str, timeout: float = 10.0) -> None:
        self.chain = chain
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers={"content-type": "application/json"}, trust_env=False
            )
        return self._session

    async def _post(self, body: Any, what: str) -> Any:
        try:
            async with self._client().post(self.url, data=_encoder.encode(body)) as response:
                if response.status != 200:
                    raise RpcUnavailable(f"{what}: HTTP {response.status}")
                return msgspec.json.decode(await response.read())
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise RpcUnavailable(f"{what}: {type(exc).__name__}") from None

    async def call(self, method: str, *params: Any) -> Any:
        result = (await self.batch([(method, list(params))]))[0]
        if isinstance(result, RpcError):
            raise result
        return result

    async def batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Each call's result, or the RpcError it got, in the order given."""
        first = next(self._ids)
        for _ in calls[1:]:
            next(self._ids)
        body = [
            {"jsonrpc": "2.0", "id": first + i, "method": method, "params": params}
            for i, (method, params) in enumerate(calls)
        ]
        for method, _ in calls:
            metrics.RPC_CALLS.labels(self.chain, method).inc()
        what = calls[0][0] if len(calls) == 1 else f"batch of {len(calls)}"
        reply = await self._post(body, what)
        if not isinstance(reply, list):
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            error = reply.get("error") if isinstance(reply, dict) else None
            raise RpcUnavailable(f"{what}: {error.get('message') if isinstance(error, dict) else 'no answer'}")
        by_id = {item.get("id"): item for item in reply if isinstance(item, dict)}
        results: list[Any] = []
        for i, (method, _) in enumerate(calls):
            item = by_id.get(first + i)
            if item is None:
                raise RpcUnavailable(f"{what}: no answer to {method}")
            error = item.get("error")
            if error is not None:
                common_metrics.RPC_ERRORS.labels(self.chain).inc()
                code = error.get("code") if isinstance(error, dict) else None
                message = error.get("message", "") if isinstance(error, dict) else str(error)
                results.append(RpcError(method, code if isinstance(code, int) else None, str(message)))
            else:
                results.append(item.get("result"))
        return results

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


def as_int(value: Any, what: str) -> int:
    if isinstance(value, RpcError):
        raise value
    if not isinstance(value, str) or not value.startswith("0x"):
        raise RpcUnavailable(f"{what}: unexpected answer")
    return int(value, 16)
