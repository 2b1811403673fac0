"""JSON-RPC to the chain's node: one HTTP request per call, each counted by method.

The node URL may carry an API key, so it never appears in logs or error messages.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import httpx
import msgspec

from otc_common import metrics as common_metrics
from otc_watcher_evm import metrics, rules
from otc_watcher_evm.rules import Block, Log, Receipt

T = TypeVar("T")


class RpcError(Exception):
    """The node could not be reached or refused a call; the caller retries with backoff."""


@functools.cache
def balance_reader_init_code() -> str:
    text = resources.files("otc_watcher_evm").joinpath("BalanceReader.json").read_text(encoding="utf-8")
    code: str = json.loads(text)["bytecode"]
    return code


class EvmRpc:
    def __init__(self, chain: str, url: str, timeout_seconds: float) -> None:
        self.chain = chain
        self.url = url
        self._client = httpx.AsyncClient(timeout=timeout_seconds)
        self._ids = itertools.count(1)
        #: Called after every answered call, so long RPC sequences (a deep reorg walk-back) keep the loop live.
        self.on_answer: Callable[[], None] | None = None

    async def close(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, params: list[Any]) -> Any:
        metrics.RPC_CALLS.labels(self.chain, method).inc()
        body = msgspec.json.encode({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params})
        try:
            response = await self._client.post(self.url, content=body, headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise RpcError(f"{method}: node unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise RpcError(f"{method}: node answered HTTP {response.status_code}")
        if self.on_answer is not None:
            self.on_answer()
        try:
            reply = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise RpcError(f"{method}: node answered with invalid JSON") from None
        if not isinstance(reply, dict):
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise RpcError(f"{method}: node answered with an unexpected shape")
        error = reply.get("error")
        if error is not None:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            detail = error.get("message", "error") if isinstance(error, dict) else str(error)
            raise RpcError(f"{method}: {str(detail)[:200]}")
        return reply.get("result")

    async def block_number(self) -> int:
        raw = await self.call("eth_blockNumber", [])
        return _checked(lambda: rules.quantity(raw, "block number"))

    async def block(self, number: int, *, full: bool) -> Block | None:
        raw = await self.call("eth_getBlockByNumber", [hex(number), full])
        return None if raw is None else _checked(lambda: rules.parse_block(raw))

    async def logs_in_block(self, block_hash: str) -> list[Log]:
        """Every ERC-20/721 Transfer of the block, of any contract: split locally, so the cost stays flat."""
        raw = await self.call("eth_getLogs", [{"blockHash": block_hash, "topics": [rules.TRANSFER_TOPIC]}])
        return _checked(functools.partial(_parse_logs, raw))

    async def transfers_to(self, first: int, last: int, addresses: Sequence[str]) -> list[Log]:
        """Transfers to any of `addresses` over a block range (re-checks of newly watched escrows)."""
        found: list[Log] = []
        for start in range(0, len(addresses), 100):
            topics = [rules.address_topic(a) for a in addresses[start : start + 100]]
            raw = await self.call(
                "eth_getLogs",
                [{"fromBlock": hex(first), "toBlock": hex(last), "topics": [rules.TRANSFER_TOPIC, None, topics]}],
            )
            found.extend(_checked(functools.partial(_parse_logs, raw)))
        return found

    async def receipt(self, txid: str, tx_gas_price: int = 0) -> Receipt | None:
        raw = await self.call("eth_getTransactionReceipt", [txid])
        if raw is None or raw.get("blockHash") is None:
            return None
        return _checked(lambda: rules.parse_receipt(raw, tx_gas_price))

    async def balances(self, addresses: Sequence[str], block_hash: str | None) -> dict[str, int]:
        """Native balances at the end of a block (None: the latest), one simulated creation per 1,500 addresses."""
        at: dict[str, str] | str = "latest" if block_hash is None else {"blockHash": block_hash}
        result: dict[str, int] = {}
        code = balance_reader_init_code()
        for start in range(0, len(addresses), rules.BALANCE_BATCH):
            batch = addresses[start : start + rules.BALANCE_BATCH]
            data = rules.balance_call_data(code, batch)
            raw = await self.call("eth_call", [{"data": data}, at])
            result.update(_checked(functools.partial(rules.decode_balances, raw, batch)))
        return result


def _parse_logs(raw: Any) -> list[Log]:
    return [rules.parse_log(item) for item in raw or ()]


def _checked(parse: Callable[[], T]) -> T:
    try:
        return parse()
    except (ValueError, AttributeError, TypeError) as exc:
        raise RpcError(f"node answered with malformed data: {exc}") from None
