"""The stage rules of a deal (DESIGN §2, §3) as pure functions over plain data.

No I/O here: the shell loads a `DealState`, asks `evaluate` what follows from the
facts at `now`, and stores the transitions with their events in one transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from otc_common.messages import Outcome, Party, Stage


class RuleViolation(Exception):
    """A command the current stage does not allow."""


class SideState(msgspec.Struct, frozen=True, kw_only=True):
    party: Party
    chain: str
    asset: str
    amount: int
    commission: int
    fee_reserve: int
    filled: bool
    #: Sum of deposits mined in blocks (no later than the deadline while it runs).
    funded: int = 0
    #: Sum of those deposits that also have the chain's confirmation threshold.
    locked_amount: int = 0
    #: Any deposit seen at all, mempool included: something may need refunding.
    has_deposits: bool = False

    @property
    def required(self) -> int:
        return self.amount + self.commission + self.fee_reserve

    @property
    def is_funded(self) -> bool:
        return self.funded >= self.required

    @property
    def is_locked(self) -> bool:
        return self.locked_amount >= self.required


class DealState(msgspec.Struct, frozen=True, kw_only=True):
    deal_id: str
    stage: Stage
    outcome: Outcome | None
    timeout_seconds: int
    expires_at: datetime | None
    remaining_ms: int | None
    alice: SideState
    bob: SideState
    cancelled: bool = False
    #: Every payout of the swap plan (and its follow-ups) is confirmed.
    payouts_done: bool = False
    #: Everything received has been returned (trivially true when nothing was received).
    refunds_done: bool = False

    @property
    def sides(self) -> tuple[SideState, SideState]:
        return (self.alice, self.bob)

    def side(self, party: Party) -> SideState:
        return self.alice if party is Party.ALICE else self.bob


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    previous: Stage
    stage: Stage
    reason: str
    outcome: Outcome | None = None
    expires_at: datetime | None = None
    remaining_ms: int | None = None


def _apply(deal: DealState, t: Transition) -> DealState:
    return msgspec.structs.replace(
        deal, stage=t.stage, outcome=t.outcome, expires_at=t.expires_at, remaining_ms=t.remaining_ms
    )


def _next(deal: DealState, now: datetime) -> Transition | None:
    stage = deal.stage
    both_locked = all(side.is_locked for side in deal.sides)
    if stage is Stage.CREATED:
        if all(side.filled for side in deal.sides):
            return Transition(
                previous=stage,
                stage=Stage.COLLECTION,
                reason="both parties filled their details",
                expires_at=now + timedelta(seconds=deal.timeout_seconds),
            )
        return None
    if stage is Stage.COLLECTION:
        assert deal.expires_at is not None
        if all(side.is_funded for side in deal.sides):
            left = max(0, int((deal.expires_at - now).total_seconds() * 1000))
            return Transition(previous=stage, stage=Stage.WAITING, reason="both sides funded", remaining_ms=left)
        # Safeguard 1: a deal whose two sides are both locked is never reverted.
        if now >= deal.expires_at and not both_locked:
            return Transition(previous=stage, stage=Stage.REVERTED, reason="the deadline passed")
        return None
    if stage is Stage.WAITING:
        if both_locked:
            # The shell writes the transfer plan in the same transaction; the deadline is gone for good.
            return Transition(previous=stage, stage=Stage.SWAP, reason="both sides locked")
        if not all(side.is_funded for side in deal.sides):
            # Safeguard 7: the deadline resumes with the time that was left.
            left = deal.remaining_ms or 0
            return Transition(
                previous=stage,
                stage=Stage.COLLECTION,
                reason="a reorg took a side below its requirement",
                expires_at=now + timedelta(milliseconds=left),
            )
        return None
    if stage is Stage.SWAP:
        if deal.payouts_done:
            return Transition(
                previous=stage, stage=Stage.CLOSED, reason="every payout confirmed", outcome=Outcome.SWAPPED
            )
        return None
    if stage is Stage.REVERTED:
        if deal.refunds_done:
            outcome = Outcome.CANCELLED if deal.cancelled else Outcome.REFUNDED
            reason = "every deposit refunded" if any(s.has_deposits for s in deal.sides) else "nothing to refund"
            return Transition(previous=stage, stage=Stage.CLOSED, reason=reason, outcome=outcome)
        return None
    return None


def evaluate(deal: DealState, now: datetime) -> list[Transition]:
    """Every transition the facts allow at `now`, in order (a deal may cross several at once)."""
    transitions: list[Transition] = []
    while (step := _next(deal, now)) is not None:
        transitions.append(step)
        deal = _apply(deal, step)
    return transitions


def cancel(deal: DealState, now: datetime) -> list[Transition]:
    if deal.stage is not Stage.CREATED:
        raise RuleViolation(f"a deal can be cancelled only before collection starts; it is {deal.stage}")
    first = Transition(previous=deal.stage, stage=Stage.REVERTED, reason="cancelled by a party")
    cancelled = msgspec.structs.replace(_apply(deal, first), cancelled=True)
    return [first, *evaluate(cancelled, now)]
