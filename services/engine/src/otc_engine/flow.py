"""Re-evaluating one deal: load its facts, ask the rules and the ledger, store and command the result.

Called with the deal's row locked, inside the transaction of whatever caused it (an API
call, a chain event, a queue result, the deadline sweep), so the stage change, the
transfer plan and the events they emit commit together (safeguard 6).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from otc_common import subjects
from otc_common.bus import emit
from otc_common.db import Connection
from otc_common.messages import (
    GasFundingRequest,
    Party,
    PayoutCommand,
    SideFunded,
    Stage,
    StageChanged,
    TransferPurpose,
)
from otc_common.registry import ChainKind, Registry
from otc_engine import ledger, rules, store
from otc_engine.ledger import Destinations, Escrow, SafeguardViolation
from otc_engine.metrics import STAGE_CHANGES
from otc_engine.rules import DealState, SideState, Transition

log = logging.getLogger("otc.engine.flow")

#: Gas units one ERC-20 transfer is budgeted at when the registry does not say.
DEFAULT_TOKEN_TRANSFER_GAS = 65_000


class DealFacts:
    """Everything about one deal that the rules and the ledger look at."""

    def __init__(
        self,
        deal: asyncpg.Record,
        sides: dict[Party, asyncpg.Record],
        deposits: Sequence[asyncpg.Record],
        transfers: Sequence[asyncpg.Record],
        gas: Sequence[asyncpg.Record],
        tips: dict[str, int],
        registry: Registry,
    ) -> None:
        self.deal = deal
        self.sides = sides
        self.deposits = deposits
        self.transfers = transfers
        self.gas = gas
        self.tips = tips
        self.registry = registry
        self.escrows = {party: self._escrow(party) for party in (Party.ALICE, Party.BOB)}

    @property
    def deal_id(self) -> str:
        return str(self.deal["deal_id"])

    @property
    def stage(self) -> Stage:
        return Stage(self.deal["stage"])

    def _escrow(self, party: Party) -> Escrow:
        side = self.sides[party]
        chain = self.registry.chain(side["chain"])
        return Escrow(
            deal_id=self.deal_id,
            party=party,
            native=chain.assets[side["asset"]].native,
            phased=chain.kind is ChainKind.UTXO,
            amount=int(side["amount"]),
            commission=int(side["commission"]),
            fee_reserve=int(side["fee_reserve"]),
            confirmations_needed=chain.confirmations,
            tip_height=self.tips.get(chain.id),
            deposits=[
                ledger.DepositFact(amount=int(d["amount"]), block_number=d["block_number"], block_time=d["block_time"])
                for d in self.deposits
                if d["party"] == party.value and d["asset"] == side["asset"]
            ],
            transfers=[
                ledger.TransferFact(
                    transfer_id=t["transfer_id"],
                    purpose=TransferPurpose(t["purpose"]),
                    amount=int(t["amount"]),
                    status=t["status"],
                    fee_from_amount=t["fee_from_amount"],
                    amount_sent=None if t["amount_sent"] is None else int(t["amount_sent"]),
                    fee_paid=None if t["fee_paid"] is None else int(t["fee_paid"]),
                )
                for t in self.transfers
                if t["party"] == party.value
            ],
            gas=[
                ledger.GasFact(request_id=g["request_id"], status=g["status"], amount=int(g["amount"] or 0))
                for g in self.gas
                if g["party"] == party.value
            ],
        )

    def destinations(self, party: Party) -> Destinations:
        own = self.sides[party]
        other = self.sides[Party.BOB if party is Party.ALICE else Party.ALICE]
        chain = self.registry.chain(own["chain"])
        return Destinations(
            counterparty_recipient=other["recipient_address"] or "",
            operator=chain.operator_address,
            payback=own["payback_address"] or "",
            tank=chain.tank_address,
        )

    def side_state(self, party: Party, deadline: datetime | None) -> SideState:
        side = self.sides[party]
        escrow = self.escrows[party]
        return SideState(
            party=party,
            chain=side["chain"],
            asset=side["asset"],
            amount=escrow.amount,
            commission=escrow.commission,
            fee_reserve=escrow.fee_reserve,
            filled=side["filled_at"] is not None,
            funded=escrow.mined_total(deadline),
            locked_amount=escrow.locked_total(deadline),
            has_deposits=bool(escrow.deposits),
        )

    def _all_complete(self, stage: Stage) -> bool:
        try:
            return all(ledger.next_steps(stage, self.escrows[p], self.destinations(p)).complete for p in self.escrows)
        except SafeguardViolation:
            return False

    def deal_state(self) -> DealState:
        deadline = self.deal["expires_at"] if self.stage is Stage.COLLECTION else None
        return DealState(
            deal_id=self.deal_id,
            stage=self.stage,
            outcome=None,
            timeout_seconds=self.deal["timeout_seconds"],
            expires_at=self.deal["expires_at"],
            remaining_ms=self.deal["remaining_ms"],
            alice=self.side_state(Party.ALICE, deadline),
            bob=self.side_state(Party.BOB, deadline),
            cancelled=self.deal["cancelled"],
            payouts_done=self._all_complete(Stage.SWAP),
            refunds_done=self._all_complete(Stage.REVERTED),
        )


async def load(
    conn: Connection, deal_id: str, registry: Registry, deal: asyncpg.Record | None = None
) -> DealFacts | None:
    """`deal`: the deal's row as the caller just locked it, if unchanged since."""
    if deal is None:
        deal = await store.get_deal(conn, deal_id)
    if deal is None:
        return None
    return DealFacts(
        deal,
        await store.get_sides(conn, deal_id),
        await store.deposits(conn, deal_id),
        await store.transfers(conn, deal_id),
        await store.gas_fundings(conn, deal_id),
        await store.tips(conn),
        registry,
    )


async def load_many(conn: Connection, deals: Sequence[asyncpg.Record], registry: Registry) -> list[DealFacts]:
    """The facts of deals whose rows the caller has locked (`deals`: those rows), in a handful of statements:
    a run of chain events re-evaluates up to a hundred deals at once."""
    if not deals:
        return []
    found = await store.facts_of(conn, [deal["deal_id"] for deal in deals])
    tips = await store.tips(conn)
    facts = []
    for deal in deals:
        rows = found[deal["deal_id"]]
        sides = {Party(row["party"]): row for row in rows["sides"]}
        facts.append(DealFacts(deal, sides, rows["deposits"], rows["transfers"], rows["gas"], tips, registry))
    return facts


class HaltedChains:
    """The chains halted by a deep reorg, read once for a transaction's deals, and only if one has a command."""

    def __init__(self) -> None:
        self._chains: set[str] | None = None

    async def read(self, conn: Connection) -> set[str]:
        if self._chains is None:
            self._chains = await store.halted_chains(conn)
        return self._chains


class Flow:
    def __init__(self, registry: Registry, post_close_window: timedelta) -> None:
        self.registry = registry
        self.post_close_window = post_close_window

    async def emit_deal_event(
        self,
        conn: Connection,
        deal_id: str,
        event: Any,
        detail: dict[str, Any],
        now: datetime,
        writes: store.DealWrites | None = None,
    ) -> None:
        await emit(conn, subjects.deal(deal_id), event)
        if writes is None:
            await store.add_event(conn, deal_id, event.TYPE, detail, now)
        else:
            writes.event(deal_id, event.TYPE, detail, now)

    async def apply(
        self,
        conn: Connection,
        deal_id: str,
        transitions: list[Transition],
        now: datetime,
        writes: store.DealWrites | None = None,
    ) -> None:
        """Safeguard 6: each stage change and its event commit together (the caller's transaction)."""
        batch = store.DealWrites() if writes is None else writes
        for t in transitions:
            STAGE_CHANGES.labels(t.stage.value).inc()
            batch.stages[deal_id] = (t, now)
            event = StageChanged(
                deal_id=deal_id,
                stage=t.stage,
                previous=t.previous,
                outcome=t.outcome,
                expires_at=t.expires_at,
                reason=t.reason,
            )
            detail = {"from": t.previous.value, "to": t.stage.value, "reason": t.reason}
            if t.outcome:
                detail["outcome"] = t.outcome.value
            await self.emit_deal_event(conn, deal_id, event, detail, now, batch)
        if writes is None:
            await batch.store(conn)

    async def advance(
        self, conn: Connection, deal_id: str, now: datetime, locked: asyncpg.Record | None = None
    ) -> list[Transition]:
        """Re-evaluates a deal whose row the caller has locked (`locked`: that row, if unchanged since)."""
        facts = await load(conn, deal_id, self.registry, locked)
        if facts is None:
            return []
        writes = store.DealWrites()
        transitions = await self.advance_loaded(conn, facts, now, HaltedChains(), writes)
        await writes.store(conn)
        return transitions

    async def advance_all(self, conn: Connection, deal_ids: Iterable[str], now: datetime) -> None:
        """Locks the deals in id order (so concurrent transactions never deadlock) and re-evaluates each.

        Re-evaluating a deal writes only that deal's rows, so all of them can be read up front, and what they
        write is stored together at the end."""
        locked = await store.lock_deals(conn, sorted(set(deal_ids)))
        if not locked:
            return
        writes = store.DealWrites()
        halted = HaltedChains()
        for facts in await load_many(conn, locked, self.registry):
            await self.advance_loaded(conn, facts, now, halted, writes)
        await writes.store(conn)

    async def advance_loaded(
        self, conn: Connection, facts: DealFacts, now: datetime, halted: HaltedChains, writes: store.DealWrites
    ) -> list[Transition]:
        """Re-evaluates a loaded deal; what it writes goes into `writes`, for the caller to store."""
        deal_id = facts.deal_id
        state = facts.deal_state()
        for side in state.sides:
            if side.is_funded and facts.sides[side.party]["funded_at"] is None:
                writes.funded.append((deal_id, side.party.value, now))
                await self.emit_deal_event(
                    conn,
                    deal_id,
                    SideFunded(deal_id=deal_id, party=side.party, amount=side.funded),
                    {"party": side.party.value},
                    now,
                    writes,
                )
        transitions = rules.evaluate(state, now)
        await self.apply(conn, deal_id, transitions, now, writes)
        stage = transitions[-1].stage if transitions else facts.stage
        closed_at = now if transitions and stage is Stage.CLOSED else facts.deal["closed_at"]
        if stage is Stage.CLOSED and closed_at is not None and now - closed_at > self.post_close_window:
            return transitions
        planned = await self.plan(conn, facts, stage)
        waiting = [row for row in facts.transfers if row["status"] == "PLANNED"]
        if not planned and not waiting:
            return transitions
        # Safeguard 8: nothing is commanded on a chain halted by a deep reorg; it stays planned until resumed.
        stopped = await halted.read(conn)
        for row in waiting:
            if row["chain"] not in stopped:
                await _send_command(conn, _planned_of(row))
                writes.commanded.append(row["transfer_id"])
        for planned_transfer in planned:
            if planned_transfer.chain in stopped:
                writes.transfers.append((planned_transfer, "PLANNED"))
            else:
                await _send_command(conn, planned_transfer)
                writes.transfers.append((planned_transfer, "COMMANDED"))
        return transitions

    async def plan(self, conn: Connection, facts: DealFacts, stage: Stage) -> list[store.PlannedTransfer]:
        """The transfers the ledger asks for next (and the tank's gas, requested here)."""
        planned: list[store.PlannedTransfer] = []
        for party, escrow in facts.escrows.items():
            side = facts.sides[party]
            late_round = len(escrow.of(TransferPurpose.LATE_RETURN))
            try:
                steps = ledger.next_steps(stage, escrow, facts.destinations(party), late_round=late_round)
            except SafeguardViolation as exc:
                log.error("plan refused: %s", exc, extra={"deal_id": facts.deal_id, "party": party.value})
                continue
            for step in steps.transfers:
                sequence = sum(1 for t in escrow.transfers if t.purpose is step.purpose)
                planned.append(
                    store.PlannedTransfer(
                        transfer_id=f"{facts.deal_id}:{party.value}:{step.purpose.value}:{sequence}",
                        deal_id=facts.deal_id,
                        party=party,
                        chain=side["chain"],
                        asset=side["asset"] if step.purpose is not TransferPurpose.GAS_RETURN else self._native(side),
                        escrow_address=side["escrow_address"],
                        escrow_index=side["escrow_index"],
                        purpose=step.purpose.value,
                        to_address=step.to,
                        amount=step.amount,
                        fee_from_amount=step.fee_from_amount,
                        phase=step.phase,
                    )
                )
            if steps.gas_request is not None:
                request_id, count = steps.gas_request
                fresh = await store.request_gas(
                    conn, request_id, facts.deal_id, party, side["chain"], side["escrow_address"]
                )
                if fresh:
                    asset = self.registry.chain(side["chain"]).assets[side["asset"]]
                    await emit(
                        conn,
                        subjects.tank_command(side["chain"]),
                        GasFundingRequest(
                            request_id=request_id,
                            deal_id=facts.deal_id,
                            chain=side["chain"],
                            escrow_address=side["escrow_address"],
                            transfers=count,
                            gas_per_transfer=asset.transfer_gas or DEFAULT_TOKEN_TRANSFER_GAS,
                        ),
                        event_id=f"gas:{request_id}",
                    )
        return planned

    def _native(self, side: asyncpg.Record) -> str:
        return self.registry.chain(side["chain"]).native_asset.symbol

    async def command(self, conn: Connection, deal_id: str) -> None:
        """Sends planned transfers to the queue, except on chains halted by a deep reorg (safeguard 8)."""
        writes = store.DealWrites()
        for row in await store.planned_transfers(conn, deal_id, await store.halted_chains(conn)):
            await _send_command(conn, _planned_of(row))
            writes.commanded.append(row["transfer_id"])
        await writes.store(conn)


def _planned_of(row: asyncpg.Record) -> store.PlannedTransfer:
    return store.PlannedTransfer(
        transfer_id=row["transfer_id"],
        deal_id=row["deal_id"],
        party=Party(row["party"]),
        chain=row["chain"],
        asset=row["asset"],
        escrow_address=row["escrow_address"],
        escrow_index=row["escrow_index"],
        purpose=row["purpose"],
        to_address=row["to_address"],
        amount=int(row["amount"]),
        fee_from_amount=row["fee_from_amount"],
        phase=row["phase"],
    )


async def _send_command(conn: Connection, item: store.PlannedTransfer) -> None:
    command = PayoutCommand(
        transfer_id=item.transfer_id,
        deal_id=item.deal_id,
        chain=item.chain,
        asset=item.asset,
        escrow_address=item.escrow_address,
        escrow_index=item.escrow_index,
        to=item.to_address,
        amount=item.amount,
        purpose=TransferPurpose(item.purpose),
        fee_from_amount=item.fee_from_amount,
        phase=item.phase,
    )
    await emit(conn, subjects.queue_command(item.chain), command, event_id=f"payout:{item.transfer_id}")
