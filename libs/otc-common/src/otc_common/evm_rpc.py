"""JSON-RPC 2.0 over HTTP to an EVM node, shared by the services that talk to one.

Single calls and batches; each call is counted by the caller's own counter (chain, method) before it
is sent, and each failed call once in `otc_chain_rpc_errors_total`. Failures are of two kinds: the
node gave no usable answer (`RpcUnavailable`: try again later) or it refused the call with a JSON-RPC
error (`RpcError`, with the node's code). Neither ever carries the node URL: it may hold an API key.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import msgspec
from prometheus_client import Counter

from otc_common import metrics

#: JSON-RPC "method not found", e.g. from a node without eth_maxPriorityFeePerGas.
METHOD_NOT_FOUND = -32601
#: A node's error text is cut to this length in messages (which end up in logs); the exception keeps it whole.
DETAIL_LIMIT = 200

_encoder = msgspec.json.Encoder()


class RpcFailure(Exception):
    """A call the node did not serve: `str()` says which call and why."""

    def __init__(self, what: str, detail: str | None = None) -> None:
        super().__init__(what if detail is None else f"{what}: {detail[:DETAIL_LIMIT]}")
        self.what = what
        self.detail = "" if detail is None else detail


class RpcUnavailable(RpcFailure):
    """No usable answer: unreachable, timed out, an HTTP error status, or not a JSON-RPC answer."""


class RpcError(RpcFailure):
    """The node answered the call with a JSON-RPC error."""

    def __init__(self, method: str, code: int | None, message: str) -> None:
        super().__init__(method, message)
        self.method = method
        self.code = code
        self.message = message


class EvmJsonRpc:
    """One node of one chain. Retries are the caller's: every call made is one call counted."""

    def __init__(self, chain: str, url: str, timeout_seconds: float, calls: Counter) -> None:
        self.chain = chain
        self.url = url
        self.calls = calls
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        #: Called after every answer, so a long run of calls (a deep reorg walk-back) keeps a loop's heartbeat.
        self.on_answer: Callable[[], None] | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the event loop that runs the calls.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers={"content-type": "application/json"}, trust_env=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _failed(self, error: RpcFailure) -> RpcFailure:
        metrics.RPC_ERRORS.labels(self.chain).inc()
        return error

    async def _post(self, body: Any, what: str) -> Any:
        try:
            async with self._client().post(self.url, data=_encoder.encode(body)) as response:
                status = response.status
                content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(RpcUnavailable(what, f"node unreachable ({type(exc).__name__})")) from None
        if self.on_answer is not None:
            self.on_answer()
        if status != 200:
            raise self._failed(RpcUnavailable(what, f"node answered HTTP {status}"))
        try:
            return msgspec.json.decode(content)
        except msgspec.DecodeError:
            raise self._failed(RpcUnavailable(what, "node answered with invalid JSON")) from None

    def _result(self, method: str, answer: Any) -> Any:
        if not isinstance(answer, dict):
            raise self._failed(RpcUnavailable(method, "node answered with an unexpected shape"))
        error = answer.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, dict) else None
            message = error.get("message", "error") if isinstance(error, dict) else error
            raise self._failed(RpcError(method, code if isinstance(code, int) else None, str(message)))
        if "result" not in answer:
            raise self._failed(RpcUnavailable(method, "answer without a result"))
        return answer["result"]

    async def call(self, method: str, *params: Any) -> Any:
        """The call's result; RpcError if the node refused it, RpcUnavailable if it gave no usable answer."""
        self.calls.labels(self.chain, method).inc()
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        return self._result(method, await self._post(body, method))

    async def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Each call's result, or the RpcError it got, in the order given, from one HTTP request.

        RpcUnavailable if the node answered none of them usably.
        """
        ids = [next(self._ids) for _ in calls]
        for method, _ in calls:
            self.calls.labels(self.chain, method).inc()
        what = calls[0][0] if len(calls) == 1 else f"batch of {len(calls)}"
        body = [
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            for request_id, (method, params) in zip(ids, calls, strict=True)
        ]
        reply = await self._post(body, what)
        if not isinstance(reply, list):
            # A node without batches answers with one error object for the whole request.
            error = reply.get("error") if isinstance(reply, dict) else None
            detail = error.get("message", "error") if isinstance(error, dict) else "no answer"
            raise self._failed(RpcUnavailable(what, str(detail)))
        by_id = {answer.get("id"): answer for answer in reply if isinstance(answer, dict)}
        results: list[Any] = []
        for request_id, (method, _) in zip(ids, calls, strict=True):
            if request_id not in by_id:
                raise self._failed(RpcUnavailable(what, f"no answer to {method}"))
            try:
                results.append(self._result(method, by_id[request_id]))
            except RpcError as exc:
                results.append(exc)
        return results


def as_int(value: Any, what: str) -> int:
    """A hex quantity from an answer; a batch's RpcError in its place is raised."""
    if isinstance(value, RpcError):
        raise value
    if isinstance(value, str) and value.startswith("0x"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise RpcUnavailable(what, f"unexpected answer {str(value)[:80]!r}")
