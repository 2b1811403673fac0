"""The watcher's node calls, on the shared EVM JSON-RPC client, counted as the watcher's.

The watcher retries any failure alike (`RpcFailure`), after a backoff.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from otc_common.evm_rpc import EvmJsonRpc, RpcUnavailable
from otc_watcher_evm import metrics, rules
from otc_watcher_evm.rules import Block, Log, Receipt

T = TypeVar("T")


@functools.cache
def balance_reader_init_code() -> str:
    text = resources.files("otc_watcher_evm").joinpath("BalanceReader.json").read_text(encoding="utf-8")
    code: str = json.loads(text)["bytecode"]
    return code


class EvmRpc(EvmJsonRpc):
    def __init__(self, chain: str, url: str, timeout_seconds: float) -> None:
        super().__init__(chain, url, timeout_seconds, metrics.RPC_CALLS)

    async def block_number(self) -> int:
        raw = await self.call("eth_blockNumber")
        return _checked(lambda: rules.quantity(raw, "block number"))

    async def block(self, number: int, *, full: bool) -> Block | None:
        raw = await self.call("eth_getBlockByNumber", hex(number), full)
        return None if raw is None else _checked(lambda: rules.parse_block(raw))

    async def logs_in_block(self, block_hash: str) -> list[Log]:
        """Every ERC-20/721 Transfer of the block, of any contract: split locally, so the cost stays flat."""
        raw = await self.call("eth_getLogs", {"blockHash": block_hash, "topics": [rules.TRANSFER_TOPIC]})
        return _checked(functools.partial(_parse_logs, raw))

    async def transfers_to(self, first: int, last: int, addresses: Sequence[str]) -> list[Log]:
        """Transfers to any of `addresses` over a block range (re-checks of newly watched escrows)."""
        found: list[Log] = []
        for start in range(0, len(addresses), 100):
            topics = [rules.address_topic(a) for a in addresses[start : start + 100]]
            raw = await self.call(
                "eth_getLogs",
                {"fromBlock": hex(first), "toBlock": hex(last), "topics": [rules.TRANSFER_TOPIC, None, topics]},
            )
            found.extend(_checked(functools.partial(_parse_logs, raw)))
        return found

    async def receipt(self, txid: str, tx_gas_price: int = 0) -> Receipt | None:
        raw = await self.call("eth_getTransactionReceipt", txid)
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
            raw = await self.call("eth_call", {"data": data}, at)
            result.update(_checked(functools.partial(rules.decode_balances, raw, batch)))
        return result


def _parse_logs(raw: Any) -> list[Log]:
    return [rules.parse_log(item) for item in raw or ()]


def _checked(parse: Callable[[], T]) -> T:
    try:
        return parse()
    except (ValueError, AttributeError, TypeError) as exc:
        raise RpcUnavailable("node answered with malformed data", str(exc)) from None
