"""What every chain watcher does the same way, whatever the chain kind.

The engine and the queue processor read one stream of chain facts for all chains, so the facts must
mean the same thing everywhere: the same subjects, the same fact-derived event ids (replicas publish
identical events that JetStream deduplicates), the same confirmation counting for followed
transactions, and the same walk back to the common ancestor on a reorg.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import nats.errors

from otc_common import subjects
from otc_common.bus import Bus, emit
from otc_common.db import Connection
from otc_common.messages import (
    ChainReorg,
    ChainTip,
    DepositObserved,
    Envelope,
    Message,
    TransferSubmitted,
    TxConfirmation,
    stable_event_id,
)
from otc_common.subjects import ConsumerSpec

T = TypeVar("T")

# --------------------------------------------------------------------------- followed transactions


@dataclass(frozen=True)
class Followed:
    """A transaction the queue processor broadcast, and where it was last seen mined."""

    txid: str
    transfer_id: str
    block_number: int | None = None
    block_hash: str | None = None
    success: bool = True
    fee_paid: int = 0


def stop_at(threshold: int) -> int:
    """Confirmations after which a transaction is no longer followed."""
    return threshold + 2


def confirmations_at(followed: Iterable[Followed], height: int) -> list[tuple[Followed, int]]:
    """Each mined followed transaction with its confirmations once `height` is the tip."""
    updates = []
    for item in followed:
        if item.block_number is None or item.block_number > height:
            continue
        updates.append((item, height - item.block_number + 1))
    return updates


def follow_consumer_spec(kind: str, chain: str) -> ConsumerSpec:
    return ConsumerSpec(
        durable=f"watcher-{kind}-{chain}-queue", stream="QUEUE", filter_subjects=[subjects.queue_result(chain)]
    )


def followed_txids(message: TransferSubmitted, normalise: Callable[[str], str | None]) -> list[str]:
    """Every candidate of a submitted transfer in the chain's own txid form; None from `normalise` skips one."""
    found = {normalise(txid) for txid in [message.txid, *message.candidates] if txid}
    return sorted(txid for txid in found if txid)


class FollowHandler:
    """Consumes the queue's results for one chain and follows each broadcast candidate."""

    def __init__(
        self,
        chain: str,
        normalise: Callable[[str], str | None],
        add: Callable[[Connection, str, str], Awaitable[None]],
    ) -> None:
        self.chain = chain
        self.normalise = normalise
        self.add = add

    async def __call__(self, conn: Connection, envelope: Envelope, message: Message) -> None:
        if not isinstance(message, TransferSubmitted) or message.chain != self.chain:
            return
        for txid in followed_txids(message, self.normalise):
            await self.add(conn, txid, message.transfer_id)


# --------------------------------------------------------------------------- reorgs


async def find_common_ancestor(
    window: Sequence[tuple[int, str]], fetch: Callable[[int], Awaitable[T]], hash_of: Callable[[T], str]
) -> T | None:
    """The highest block of the stored `window` ((number, hash), lowest first) that the chain still has.

    `fetch(number)` returns the chain's block at that height now. None when not one block of the
    window survived: the reorg is deeper than the window.
    """
    for number, stored_hash in reversed(window):
        remote = await fetch(number)
        if hash_of(remote) == stored_hash:
            return remote
    return None


# --------------------------------------------------------------------------- events


async def emit_tip(conn: Connection, tip: ChainTip) -> None:
    await emit(
        conn,
        subjects.chain_event(tip.chain, "tip"),
        tip,
        event_id=stable_event_id(tip.chain, "tip", tip.height, tip.hash),
    )


async def emit_deposit(conn: Connection, deposit: DepositObserved) -> None:
    await emit(
        conn,
        subjects.chain_event(deposit.chain, "deposit"),
        deposit,
        # After a reorg the same deposit in the same block is news again (a chain can go back to a branch).
        event_id=stable_event_id(
            deposit.chain, "deposit", deposit.txid, deposit.index, deposit.block_hash, deposit.reorgs
        ),
    )


async def emit_confirmation(
    conn: Connection, chain: str, item: Followed, count: int, threshold: int | None = None
) -> None:
    """Reports a followed transaction's confirmations; with a `threshold`, only counts up to it.

    Block by block, counts beyond the threshold tell the queue processor nothing (it confirms at the
    threshold, and looks at the chain itself again should that report come too early for its node);
    the transaction is still followed until `stop_at`, so a reorg that unmines it is reported. The
    first report of a transaction (found mined already some blocks deep) goes without a threshold."""
    if threshold is not None and count > threshold:
        return
    await emit(
        conn,
        subjects.chain_event(chain, "confirmation"),
        TxConfirmation(
            chain=chain,
            txid=item.txid,
            confirmations=count,
            block_number=item.block_number,
            block_hash=item.block_hash,
            success=item.success,
            fee_paid=item.fee_paid,
        ),
        event_id=stable_event_id(chain, "confirmation", item.txid, item.block_hash, count),
    )


async def emit_unmined(conn: Connection, chain: str, item: Followed) -> None:
    """`item` as it was mined (its block hash keys the event): a reorg took that block away."""
    await emit(
        conn,
        subjects.chain_event(chain, "confirmation"),
        TxConfirmation(chain=chain, txid=item.txid, confirmations=0, success=item.success),
        event_id=stable_event_id(chain, "confirmation", item.txid, item.block_hash, 0),
    )


async def reorgs_followed(conn: Connection) -> int:
    """How many reorgs this watcher has followed on its chain (its `head` table's count).

    Every tip and deposit carries it, so that the engine takes a tip only after every reorg before
    it, whatever order redeliveries bring them in, and knows a deposit seen before a reorg."""
    count = await conn.fetchval("SELECT reorgs FROM head")
    return 0 if count is None else int(count)


async def count_reorg(conn: Connection) -> int:
    """In the transaction that records a reorg: its sequence number."""
    return int(await conn.fetchval("UPDATE head SET reorgs = reorgs + 1 RETURNING reorgs"))


async def emit_reorg(conn: Connection, reorg: ChainReorg) -> None:
    await emit(
        conn,
        subjects.chain_event(reorg.chain, "reorg"),
        reorg,
        event_id=stable_event_id(reorg.chain, "reorg", reorg.ancestor_hash, *reorg.removed_hashes),
    )


# --------------------------------------------------------------------------- start-up


async def await_consumer(bus: Bus, stream: str, durable: str, beat: Callable[[], None], timeout: float) -> None:  # noqa: ASYNC109
    """Waits (at most `timeout`) until a durable consumer has nothing pending.

    After downtime the deal events queued meanwhile go into the watch set before old blocks are read.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat()
        try:
            info = await bus.js.consumer_info(stream, durable)
        except (nats.errors.Error, TimeoutError, OSError):
            return
        if not info.num_pending and not info.num_ack_pending:
            return
        await asyncio.sleep(0.1)
