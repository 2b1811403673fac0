"""The shell of UTXO transfers: sign a transfer's legs, then follow them until all are confirmed.

Signing: check the transfer against the deal, read the escrow's outputs and the fee rates, then in
one database transaction lock the escrow, choose its confirmed outputs that no other transfer
holds, reserve them, sign one transaction per reserved output and store them with the
TransferSubmitted event; only after the commit are the stored bytes broadcast.

Following: one look at the escrow's history per sweep or hint. A leg the server no longer knows is
sent again as the same bytes; a leg stuck in the mempool is replaced by fee (same input); the
transfer is confirmed when every leg has the chain's threshold of confirmations.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from otc_common import subjects
from otc_common.addresses import AddressError, validate_utxo_address
from otc_common.bus import emit
from otc_common.db import Connection, Pool
from otc_common.messages import Party, TransferProgress, TransferSubmitted, stable_event_id
from otc_queue import metrics, rules, store, utxo_rules, utxo_store
from otc_queue.backend import Sent
from otc_queue.rules import Allowed, Bump, Candidate, Missing, Rebroadcast, Refused, Wait
from otc_queue.utxo import UtxoBackend
from otc_queue.utxo_rules import LegMined, Standing
from otc_queue.utxo_store import StoredLeg, UtxoCandidate, UtxoFlight

if TYPE_CHECKING:
    from otc_queue.processor import Processor, Worker

log = logging.getLogger("otc.queue.utxo")

#: How long an escrow output may look spent by something that is none of its leg's candidates
#: before that is alerted (a moment's race with a block otherwise).
SPENT_GRACE_SECONDS = 30.0


class UtxoPayouts:
    def __init__(self, processor: Processor, backend: UtxoBackend) -> None:
        self.processor = processor
        self.backend = backend
        self.chain = backend.chain
        self._spent_since: dict[str, float] = {}
        self._last_send: dict[str, Sent] = {}
        #: When a stored candidate was last accepted again: a leg is stuck from then, not from signing.
        self._resent_at: dict[str, float] = {}
        #: Newest candidates that cannot be replaced (no room for a higher fee); not tried again.
        self._unbumpable: set[str] = set()

    @property
    def pool(self) -> Pool:
        return self.processor.pool

    # ----------------------------------------------------------------- signing

    async def sign_queued(self, worker: Worker) -> None:
        while True:
            # Two at a time: whether there is another to sign after this one comes with the same read.
            rows = await store.queued(self.pool, worker.chain, worker.sender, 2)
            if not rows or not await self._sign_one(rows[0], worker) or len(rows) < 2:
                return

    def _verdict(
        self, order: rules.TransferOrder, escrow: rules.EscrowFact | None, parties: Mapping[Party, rules.PartyFact]
    ) -> rules.Verdict:
        derived = self.backend.escrow_address(order.escrow_index)
        verdict = rules.check_transfer(order, derived, escrow, parties, self.processor.facts[self.chain.id])
        if isinstance(verdict, Allowed):
            try:
                validate_utxo_address(order.to.lower(), self.backend.hrp)
            except AddressError as exc:
                return Refused(f"{order.to} is not a valid address on {self.chain.id}: {exc}")
        return verdict

    async def _sign_one(self, row: asyncpg.Record, worker: Worker) -> bool:
        """Signs and broadcasts the escrow's next transfer; False when it has to wait."""
        processor = self.processor
        started = time.time()
        order = store.order_of(row)
        escrow, parties = await processor._deal_facts(self.chain.id, order.escrow_address)
        verdict = self._verdict(order, escrow, parties)
        if isinstance(verdict, Missing):
            await processor._waits(row, verdict.reason)
            return False
        if isinstance(verdict, Refused):
            async with self.pool.acquire() as conn, conn.transaction():
                await processor._refuse_in(conn, order, verdict.reason)
            return True
        checked = time.time()
        reading = await self.backend.read(order.escrow_address)
        terms = self.backend.terms(order, reading.rate, reading.relay)
        read = time.time()
        async with self.pool.acquire() as conn, conn.transaction():
            # The escrow's row lock: replicas never choose outputs for the same escrow at once.
            await store.lock_sender(conn, self.chain.id, order.escrow_address)
            current = await store.lock_transfer(conn, order.transfer_id)
            if current is None or current["status"] != "QUEUED":
                return True
            held = await utxo_store.reserved(conn, self.chain.id, order.escrow_address)
            coins = utxo_rules.spendable(reading.coins, reading.tip, self.chain.confirmations, held)
            plan = utxo_rules.plan_transfer(order.amount, order.fee_from_amount, coins, terms)
            if isinstance(plan, Wait):
                await processor._waits(row, plan.reason)
                return False
            if isinstance(plan, Refused):
                await processor._fail_in(conn, order, plan.reason, alert=False)
                return True
            signed = [self.backend.sign(order, leg) for leg in plan.legs]
            await utxo_store.record_signed(conn, order, plan.legs, signed, datetime.now(UTC))
            await emit(
                conn,
                subjects.queue_result(self.chain.id),
                TransferSubmitted(
                    transfer_id=order.transfer_id,
                    deal_id=order.deal_id,
                    chain=self.chain.id,
                    txid=signed[0].txid,
                    candidates=[tx.txid for tx in signed],
                ),
                event_id=stable_event_id("queue", "submitted", order.transfer_id, 0),
            )
        stored = time.time()
        processor._waiting.pop(order.transfer_id, None)
        if processor.settings.test_crash_after_sign:
            os.kill(os.getpid(), signal.SIGKILL)
        outcomes = [await self.backend.send(tx.raw) for tx in signed]
        sent = time.time()
        since_command = sent - row["received_at"].timestamp()
        metrics.COMMAND_TO_BROADCAST.labels(self.chain.id).observe(since_command)
        metrics.SUBMITTED.labels(self.chain.id).inc()
        log.info(
            "broadcast",
            extra={
                "transfer_id": order.transfer_id,
                "deal_id": order.deal_id,
                "chain": self.chain.id,
                "txids": [tx.txid for tx in signed],
                "outcomes": [outcome.value for outcome, _ in outcomes],
                "sent": plan.sent,
                "fees": plan.fees,
                "fee_rate": terms.rate,
                "vsizes": [tx.vsize for tx in signed],
                "inputs": [f"{leg.coin.txid}:{leg.coin.vout}" for leg in plan.legs],
                "command_to_broadcast_ms": round(since_command * 1000, 2),
                "stages_ms": {
                    "waited": round((started - row["received_at"].timestamp()) * 1000, 2),
                    "check": round((checked - started) * 1000, 2),
                    "read": round((read - checked) * 1000, 2),
                    "store": round((stored - read) * 1000, 2),
                    "send": round((sent - stored) * 1000, 2),
                },
            },
        )
        refused = [(tx.txid, words) for tx, (outcome, words) in zip(signed, outcomes, strict=True) if words]
        for txid, words in refused:
            log.warning("broadcast not accepted: %s", words, extra={"transfer_id": order.transfer_id, "txid": txid})
        if refused:
            worker.check_due = True
        return True

    # ----------------------------------------------------------------- after broadcast

    async def reconcile(self, worker: Worker) -> None:
        flights = [f for f in await utxo_store.in_flight(self.pool, worker.chain, worker.sender) if f.legs]
        if not flights:
            return
        seen = await self.backend.look(worker.sender)
        now = time.time()
        bump_after = self.processor.settings.bump_after_seconds
        for flight in flights:
            mined: list[LegMined | None] = []
            for leg in flight.legs:
                views = [self._view(c) for c in leg.candidates]
                action = utxo_rules.leg_action(views, seen, now=now, bump_after=bump_after)
                if isinstance(action, LegMined):
                    mined.append(action)
                    continue
                mined.append(None)
                if isinstance(action, Rebroadcast):
                    await self._rebroadcast(flight, leg, action)
                elif isinstance(action, Bump) and leg.newest.txid not in self._unbumpable:
                    await self._bump(flight, leg)
            state = utxo_rules.standing(mined, self.chain.confirmations)
            if state.done:
                await self._confirm(flight, mined, state)
            else:
                await self._progress(flight, mined, state)

    def forget(self, txids: Iterable[str]) -> None:
        """Drops what was kept in memory about the transactions of a transfer now done."""
        for txid in txids:
            self._last_send.pop(txid, None)
            self._spent_since.pop(txid, None)
            self._unbumpable.discard(txid)
            self._resent_at.pop(txid, None)

    def _view(self, candidate: UtxoCandidate) -> Candidate:
        view = candidate.view()
        resent = self._resent_at.get(candidate.txid)
        return view if resent is None else msgspec.structs.replace(view, signed_at=max(view.signed_at, resent))

    @staticmethod
    def _newly_mined(flight: UtxoFlight, mined: list[LegMined | None]) -> list[LegMined]:
        """Legs mined somewhere their candidate was not seen mined before."""
        fresh = []
        for leg, found in zip(flight.legs, mined, strict=True):
            if found is not None:
                candidate = next(c for c in leg.candidates if c.txid == found.txid)
                if candidate.mined_block != found.height:
                    fresh.append(found)
        return fresh

    async def _note_mined(self, conn: Connection, flight: UtxoFlight, mined: list[LegMined | None]) -> None:
        """Remembers where each leg was seen mined, so that after a reorg those same bytes go out again."""
        for found in self._newly_mined(flight, mined):
            await utxo_store.note_mined(conn, found.txid, found.height, None)

    async def _progress(self, flight: UtxoFlight, mined: list[LegMined | None], state: Standing) -> None:
        order = flight.order
        row = flight.row
        recorded = (row["txid"], row["block_number"], row["confirmations"])
        if recorded == (state.txid, state.block_number, state.confirmations) and not self._newly_mined(flight, mined):
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await self._note_mined(conn, flight, mined)
            if not await store.set_standing(
                conn, order.transfer_id, state.txid, state.block_number, state.confirmations
            ):
                return
            heights = [(m.txid, m.height) if m is not None else None for m in mined]
            # An unmined standing can recur after each reorg and must not be taken for a duplicate.
            again = time.time() if state.block_number is None else None
            await emit(
                conn,
                subjects.queue_result(order.chain),
                TransferProgress(
                    transfer_id=order.transfer_id,
                    deal_id=order.deal_id,
                    chain=order.chain,
                    txid=state.txid or flight.legs[0].newest.txid,
                    confirmations=state.confirmations,
                ),
                event_id=stable_event_id("queue", "progress", order.transfer_id, heights, state.confirmations, again),
            )

    async def _confirm(self, flight: UtxoFlight, mined: list[LegMined | None], state: Standing) -> None:
        order = flight.order
        chosen = [
            next(c for c in leg.candidates if found is not None and c.txid == found.txid)
            for leg, found in zip(flight.legs, mined, strict=True)
        ]
        assert state.txid is not None and state.block_number is not None
        outcome = store.Outcome(
            transfer_id=order.transfer_id,
            txid=state.txid,
            block_number=state.block_number,
            confirmations=state.confirmations,
            amount_sent=sum(c.to_value for c in chosen),
            fee_paid=sum(c.fee for c in chosen),
            success=True,
            reason=None,
        )
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.confirm(conn, outcome):
                return
            await self._note_mined(conn, flight, mined)
            await self.processor._report_outcome(conn, outcome, order.deal_id, order.chain)
        self.forget(flight.txids)
        first_signed = min(leg.candidates[0].signed_at for leg in flight.legs)
        self.processor._finished(outcome, order.deal_id, order.chain, first_signed, flight.txids)

    async def _rebroadcast(self, flight: UtxoFlight, leg: StoredLeg, action: Rebroadcast) -> None:
        order = flight.order
        target = next(c for c in leg.candidates if c.txid == action.txid)
        outcome, words = await self.backend.send(target.raw)
        why = "reorg" if action.reorged else "not_known"
        metrics.REBROADCASTS.labels(order.chain, why).inc()
        # Logged after a reorg, or when the server's answer changes: a refusal repeats every sweep.
        if action.reorged or self._last_send.get(target.txid) != outcome:
            self._last_send[target.txid] = outcome
            log.info(
                "re-broadcast stored transaction",
                extra={
                    "transfer_id": order.transfer_id,
                    "chain": order.chain,
                    "txid": target.txid,
                    "leg": leg.leg,
                    "why": why,
                    "outcome": outcome.value,
                    "detail": words,
                },
            )
        if outcome in (Sent.ACCEPTED, Sent.KNOWN):
            self._spent_since.pop(target.txid, None)
            if outcome is Sent.ACCEPTED:
                self._resent_at[target.txid] = time.time()
            return
        if outcome is Sent.SPENT:
            # A candidate mined in a block the last look did not see yet, or a spend that is not ours.
            first = self._spent_since.setdefault(target.txid, time.time())
            if time.time() - first > max(SPENT_GRACE_SECONDS, 5 * self.processor.settings.poll_seconds):
                await self.processor._alert_once(
                    f"spent:{target.txid}",
                    "input_spent_elsewhere",
                    f"{order.transfer_id}: escrow output {leg.coin.txid}:{leg.coin.vout} is spent or gone, "
                    "and none of its leg's candidates is mined",
                    order.chain,
                    order.deal_id,
                )
            return
        if outcome is Sent.UNDERPRICED:
            if target.txid != leg.newest.txid:
                outcome, words = await self.backend.send(leg.newest.raw)
                if outcome in (Sent.ACCEPTED, Sent.KNOWN, Sent.SPENT):
                    return
            await self._bump(flight, leg)
            return
        await self.processor._alert_once(
            f"send:{target.txid}:{outcome.value}",
            "broadcast_refused",
            f"{order.transfer_id}: the server refuses {target.txid}: {words}",
            order.chain,
            order.deal_id,
        )

    async def _bump(self, flight: UtxoFlight, leg: StoredLeg) -> None:
        """Replaces the leg's newest candidate with one spending the same input at a higher fee;
        stored before it is sent."""
        order = flight.order
        rate, relay = await self.backend.rates()
        terms = self.backend.terms(order, rate, relay)
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_sender(conn, self.chain.id, order.escrow_address)
            current = await store.lock_transfer(conn, order.transfer_id)
            if current is None or current["status"] != "SIGNED":
                return
            fresh = await utxo_store.flight(conn, order.transfer_id)
            stored = next((s for s in fresh.legs if s.leg == leg.leg), None) if fresh is not None else None
            if fresh is None or stored is None or stored.newest.txid != leg.newest.txid:
                return
            last = stored.newest
            plan = utxo_rules.plan_bump(stored.plan_of(last), order.fee_from_amount, terms)
            if isinstance(plan, Wait):
                self._unbumpable.add(last.txid)
                await self.processor._alert_once(
                    f"bump:{last.txid}",
                    "fee_bump_impossible",
                    f"{order.transfer_id}: {last.txid} is not mined after "
                    f"{self.processor.settings.bump_after_seconds:g}s and cannot be replaced: {plan.reason}",
                    order.chain,
                    order.deal_id,
                )
                return
            signed = self.backend.sign(order, plan)
            seq = last.seq + 1
            await utxo_store.add_candidate(conn, order.transfer_id, stored.leg, seq, signed, plan, datetime.now(UTC))
            await emit(
                conn,
                subjects.queue_result(order.chain),
                TransferSubmitted(
                    transfer_id=order.transfer_id,
                    deal_id=order.deal_id,
                    chain=order.chain,
                    txid=signed.txid,
                    candidates=[*fresh.txids, signed.txid],
                ),
                event_id=stable_event_id("queue", "submitted", order.transfer_id, stored.leg, seq),
            )
        metrics.BUMPS.labels(order.chain).inc()
        outcome, words = await self.backend.send(signed.raw)
        log.info(
            "fee bumped",
            extra={
                "transfer_id": order.transfer_id,
                "chain": order.chain,
                "txid": signed.txid,
                "replaces": last.txid,
                "leg": stored.leg,
                "input": f"{stored.coin.txid}:{stored.coin.vout}",
                "fee": plan.fee,
                "previous_fee": last.fee,
                "vsize": signed.vsize,
                "outcome": outcome.value,
                "detail": words,
            },
        )

    async def close(self) -> None:
        await self.backend.close()
