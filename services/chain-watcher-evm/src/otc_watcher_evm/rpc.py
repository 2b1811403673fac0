"""The watcher's node calls, on the shared EVM JSON-RPC client, counted as the watcher's.

The watcher retries any failure alike (`RpcFailure`), after a backoff.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from otc_common.evm_rpc import EvmJsonRpc, RpcUnavailable
from otc_watcher_evm import metrics, rules
from otc_watcher_evm.rules import Block, Log, Receipt

T = TypeVar("T")

RECEIPTS_PER_BATCH = 100


class EvmRpc(EvmJsonRpc):
    def __init__(
        self, chain: str, url: str, timeout_seconds: float, balance_call_addresses: int = rules.BALANCE_CALL_ADDRESSES
    ) -> None:
        super().__init__(chain, url, timeout_seconds, metrics.RPC_CALLS)
        self.balance_call_addresses = balance_call_addresses
        #: The last balance calls built, for the addresses they read: a watch set is read block after block.
        self._balance_calls: tuple[list[str], list[tuple[list[str], dict[str, str]]]] = ([], [])

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

    async def receipts(self, txids: Sequence[str], gas_prices: Sequence[int] | None = None) -> list[Receipt | None]:
        """Several receipts from one request, in the order of `txids`; None for a transaction not mined."""
        answers: list[Any] = []
        # Providers cap the calls of a batch; 100 is under every common cap.
        for start in range(0, len(txids), RECEIPTS_PER_BATCH):
            chunk = txids[start : start + RECEIPTS_PER_BATCH]
            answers += await self.batch([("eth_getTransactionReceipt", [txid]) for txid in chunk])
        found: list[Receipt | None] = []
        for position, raw in enumerate(answers):
            if isinstance(raw, Exception):
                raise raw
            if raw is None or raw.get("blockHash") is None:
                found.append(None)
                continue
            gas_price = gas_prices[position] if gas_prices is not None else 0
            found.append(_checked(functools.partial(rules.parse_receipt, raw, gas_price)))
        return found

    async def balances(self, addresses: Sequence[str], block_hash: str | None) -> dict[str, int]:
        """Native balances (lowercase `0x` addresses) at the end of a block (None: the latest)."""
        return rules.balances_from_words(addresses, await self.balance_words(addresses, block_hash))

    async def balance_words(self, addresses: Sequence[str], block_hash: str | None) -> bytes:
        """The same balances as 32-byte big-endian words in the order of `addresses`, undecoded.

        One `eth_call` per `balance_call_addresses` addresses, each running the balance reader placed
        with a state override, so nothing is deployed and no code-size limit applies.
        """
        at: dict[str, str] | str = "latest" if block_hash is None else {"blockHash": block_hash}
        words: list[bytes] = []
        for batch, transaction in self._balance_calls_for(addresses):
            raw = await self.call("eth_call", transaction, at, rules.BALANCE_READER_OVERRIDE)
            words.append(_checked(functools.partial(rules.balance_words, raw, len(batch))))
        return words[0] if len(words) == 1 else b"".join(words)

    def _balance_calls_for(self, addresses: Sequence[str]) -> list[tuple[list[str], dict[str, str]]]:
        built_for, calls = self._balance_calls
        wanted = list(addresses)
        if wanted != built_for:
            step = self.balance_call_addresses
            batches = [wanted[start : start + step] for start in range(0, len(wanted), step)]
            calls = [(batch, rules.balance_call(batch)) for batch in batches]
            self._balance_calls = (wanted, calls)
        return calls


def _parse_logs(raw: Any) -> list[Log]:
    return [rules.parse_log(item) for item in raw or ()]


def _checked(parse: Callable[[], T]) -> T:
    try:
        return parse()
    except (ValueError, AttributeError, TypeError) as exc:
        raise RpcUnavailable("node answered with malformed data", str(exc)) from None
