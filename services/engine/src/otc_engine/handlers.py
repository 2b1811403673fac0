"""What the engine does with chain events, queue results and tank results.

Each handler runs inside the consumer's inbox transaction: it records the fact and returns the deals
whose decisions it may change. The consumer (`DealConsumer`) re-evaluates those once each, after the
whole run of events is handled and before it commits, locking them in id order, so consumers and
replicas running side by side never deadlock on deals, and a deal a run touches many times (a payout's
confirmation and its commission's) is looked at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

from otc_common import subjects
from otc_common.bus import Bus, ConsumerRunner, TransientError, emit
from otc_common.db import Connection, Pool
from otc_common.messages import (
    AlertRaised,
    ChainReorg,
    ChainTip,
    DepositObserved,
    Envelope,
    GasFunded,
    Message,
    Party,
    TransferConfirmed,
    TransferFailed,
    TransferProgress,
    TransferSubmitted,
)
from otc_common.registry import Registry
from otc_common.subjects import ConsumerSpec
from otc_engine import store
from otc_engine.metrics import REORG_DEPTH, REORGS
from otc_engine.service import Engine, now_utc

log = logging.getLogger("otc.engine.handlers")


def chain_events(chain: str) -> ConsumerSpec:
    """Deposits, tips and reorgs of one chain; not the confirmations of the queue's own transactions,
    which reach the engine as queue results. One consumer per chain: a busy chain does not hold up the
    others (they shared one consumer before, whose inbox name they keep)."""
    return ConsumerSpec(
        durable=f"engine-chain-{chain}",
        stream="CHAIN",
        filter_subjects=[subjects.chain_event(chain, kind) for kind in ("deposit", "tip", "reorg")],
        inbox="engine-chain",
    )


def queue_results(chain: str) -> ConsumerSpec:
    return ConsumerSpec(
        durable=f"engine-queue-{chain}",
        stream="QUEUE",
        filter_subjects=[subjects.queue_result(chain)],
        inbox="engine-queue",
    )


TANK_RESULTS = ConsumerSpec(durable="engine-tank", stream="TANK", filter_subjects=["otc.tank.result.>"])

#: A handler records an event and returns the deals to re-evaluate.
DealHandler = Callable[[Connection, Envelope, Message], Awaitable[list[str]]]


class DealConsumer(ConsumerRunner):
    """Re-evaluates the deals its handler returns once each, in id order, before each run commits."""

    def __init__(self, bus: Bus, pool: Pool, spec: ConsumerSpec, handler: DealHandler, handlers: Handlers) -> None:
        self._touched: set[str] = set()

        async def record(conn: Connection, envelope: Envelope, message: Message) -> None:
            self._touched.update(await handler(conn, envelope, message))

        super().__init__(bus, pool, spec, record)
        self._handlers = handlers

    def before_transaction(self) -> None:
        self._touched.clear()

    async def before_commit(self, conn: Connection) -> None:
        await self._handlers.advance_all(conn, self._touched)


class Handlers:
    def __init__(self, engine: Engine, registry: Registry) -> None:
        self.engine = engine
        self.registry = registry

    async def advance_all(self, conn: Connection, deal_ids: Iterable[str]) -> None:
        """Locks the deals in id order (so concurrent transactions never deadlock) and re-evaluates each."""
        await self.engine.advance_all(conn, deal_ids, now_utc())

    async def chain(self, conn: Connection, envelope: Envelope, message: Message) -> list[str]:
        if isinstance(message, DepositObserved):
            return await self._deposit(conn, message)
        if isinstance(message, ChainTip):
            taken = await store.reorgs_taken(conn, message.chain)
            if message.reorgs > taken:
                # A reorg the watcher followed before this tip has not reached us yet (a redelivery after a crash
                # comes late): counted from this tip, deposits in the blocks it replaced would look confirmed.
                raise TransientError(
                    f"{message.chain} tip {message.height} follows reorg {message.reorgs}; {taken} taken"
                )
            crossed = await store.advance_tip(conn, message.chain, message.height, message.hash)
            chain = self.registry.chains.get(message.chain)
            if chain is None:
                return []
            return await store.deals_maturing_at(conn, message.chain, crossed, chain.confirmations)
        if isinstance(message, ChainReorg):
            return await self._reorg(conn, message)
        return []

    async def _deposit(self, conn: Connection, message: DepositObserved) -> list[str]:
        side = await store.side_by_escrow(conn, message.chain, message.address)
        if side is None:
            return []
        # Seen before a reorg that has replaced its block since (the report came late): not mined.
        replaced = await store.replaced_since(conn, message.chain, message.block_hash, message.reorgs)
        if side["asset"] != message.asset:
            log.warning(
                "deposit of %s into an escrow for %s is not counted",
                message.asset,
                side["asset"],
                extra={"deal_id": side["deal_id"], "chain": message.chain, "txid": message.txid},
            )
        fresh = await store.upsert_deposit(
            conn,
            chain=message.chain,
            txid=message.txid,
            idx=message.index,
            deal_id=side["deal_id"],
            party=Party(side["party"]),
            address=message.address,
            asset=message.asset,
            amount=message.amount,
            block_number=None if replaced else message.block_number,
            block_hash=None if replaced else message.block_hash,
            block_time=None if replaced else datetime.fromtimestamp(message.block_time, UTC),
        )
        if not fresh:
            return []
        log.info(
            "deposit seen",
            extra={"deal_id": side["deal_id"], "chain": message.chain, "txid": message.txid, "amount": message.amount},
        )
        return [side["deal_id"]]

    async def _reorg(self, conn: Connection, message: ChainReorg) -> list[str]:
        taken = await store.reorgs_taken(conn, message.chain)
        if message.sequence > taken + 1:
            raise TransientError(f"{message.chain} reorg {message.sequence} before reorg {taken + 1}")
        chain = self.registry.chains.get(message.chain)
        REORGS.labels(message.chain).inc()
        REORG_DEPTH.labels(message.chain).observe(message.depth)
        affected = await store.unmine_blocks(conn, message.chain, message.removed_hashes)
        await store.set_tip_after_reorg(
            conn, message.chain, message.new_tip_height, message.new_tip_hash, message.removed_hashes
        )
        await store.take_reorg(conn, message.chain, message.sequence, message.removed_hashes)
        if chain is not None:
            # The tip may have moved past heights whose own tip reports will now be ignored as old: deposits
            # the reorg left in place that reach the threshold there are re-evaluated here.
            crossed = range(message.ancestor_height + 1, message.new_tip_height + 1)
            affected += await store.deals_maturing_at(conn, message.chain, crossed, chain.confirmations)
        if chain is not None and message.depth >= chain.confirmations:
            # Safeguard 8: confirmed history changed; stop paying on this chain rather than guess.
            reason = f"reorg of depth {message.depth} at height {message.ancestor_height} >= {chain.confirmations}"
            await store.halt_chain(conn, message.chain, reason)
            await emit(
                conn,
                subjects.alert("engine"),
                AlertRaised(source="engine", kind="deep_reorg_halt", detail=reason, chain=message.chain),
            )
            log.error("payouts halted", extra={"chain": message.chain, "reason": reason})
        return affected

    async def queue(self, conn: Connection, envelope: Envelope, message: Message) -> list[str]:
        deal_id: str | None = None
        if isinstance(message, TransferSubmitted | TransferProgress):
            confirmations = message.confirmations if isinstance(message, TransferProgress) else None
            fields = {} if confirmations is None else {"confirmations": confirmations}
            row = await store.set_transfer_status(conn, message.transfer_id, "SUBMITTED", txid=message.txid, **fields)
            # On its way, a transfer weighs in every decision as it did when commanded: only one
            # coming back from a refusal changes what the deal owes.
            if row is not None and row["previous"] not in ("COMMANDED", "SUBMITTED"):
                deal_id = row["deal_id"]
        elif isinstance(message, TransferConfirmed):
            row = await store.set_transfer_status(
                conn,
                message.transfer_id,
                "CONFIRMED",
                txid=message.txid,
                confirmations=message.confirmations,
                amount_sent=message.amount_sent,
                fee_paid=message.fee_paid,
            )
            deal_id = row["deal_id"] if row else None
        elif isinstance(message, TransferFailed):
            # A return smaller than its own network fee is skipped: the dust stays in the escrow.
            status = "SKIPPED" if message.reason.startswith("dust") else "FAILED"
            row = await store.set_transfer_status(conn, message.transfer_id, status, reason=message.reason)
            deal_id = row["deal_id"] if row else None
            if status == "FAILED" and deal_id is not None:
                await emit(
                    conn,
                    subjects.alert("engine"),
                    AlertRaised(
                        source="engine",
                        kind="payout_failed",
                        detail=f"{message.transfer_id}: {message.reason}",
                        chain=message.chain,
                        deal_id=deal_id,
                    ),
                )
        return [] if deal_id is None else [deal_id]

    async def tank(self, conn: Connection, envelope: Envelope, message: Message) -> list[str]:
        if isinstance(message, GasFunded):
            deal_id = await store.gas_funded(conn, message.request_id, message.amount, message.txid)
            if deal_id is not None:
                return [deal_id]
        return []
