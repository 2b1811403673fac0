"""The engine's stage rules as pure functions: DESIGN §2 transitions and the safeguards they carry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from otc_common.messages import Outcome, Party, Stage
from otc_engine import rules
from otc_engine.rules import DealState, SideState

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def side(party: Party, **kw: object) -> SideState:
    base = dict(party=party, chain="ETH", asset="ETH", amount=100, commission=1, fee_reserve=2, filled=True)
    base.update(kw)
    return SideState(**base)  # type: ignore[arg-type]


def deal(stage: Stage, **kw: object) -> DealState:
    base: dict[str, object] = dict(
        deal_id="d1",
        stage=stage,
        outcome=None,
        timeout_seconds=600,
        expires_at=NOW + timedelta(seconds=60) if stage is Stage.COLLECTION else None,
        remaining_ms=None,
        alice=side(Party.ALICE),
        bob=side(Party.BOB),
    )
    base.update(kw)
    # The shell computes this from the escrows; here: done exactly when nothing was received.
    base.setdefault("refunds_done", not any(s.has_deposits for s in (base["alice"], base["bob"])))  # type: ignore[attr-defined]
    return DealState(**base)  # type: ignore[arg-type]


def test_both_filled_starts_collection_with_deadline() -> None:
    [t] = rules.evaluate(deal(Stage.CREATED), NOW)
    assert t.stage is Stage.COLLECTION and t.expires_at == NOW + timedelta(seconds=600)


def test_one_filled_stays_created() -> None:
    assert rules.evaluate(deal(Stage.CREATED, bob=side(Party.BOB, filled=False)), NOW) == []


def test_deadline_without_deposits_reverts_and_closes_refunded() -> None:
    ts = rules.evaluate(deal(Stage.COLLECTION, expires_at=NOW), NOW)
    assert [(t.stage, t.outcome) for t in ts] == [(Stage.REVERTED, None), (Stage.CLOSED, Outcome.REFUNDED)]


def test_deadline_with_deposits_waits_in_reverted_for_refunds() -> None:
    funded_alice = side(Party.ALICE, funded=50, has_deposits=True)
    ts = rules.evaluate(deal(Stage.COLLECTION, expires_at=NOW, alice=funded_alice), NOW)
    assert [t.stage for t in ts] == [Stage.REVERTED]


def test_cancel_only_in_created() -> None:
    ts = rules.cancel(deal(Stage.CREATED, bob=side(Party.BOB, filled=False)), NOW)
    assert [(t.stage, t.outcome) for t in ts] == [(Stage.REVERTED, None), (Stage.CLOSED, Outcome.CANCELLED)]
    for stage in (Stage.COLLECTION, Stage.WAITING, Stage.SWAP, Stage.REVERTED, Stage.CLOSED):
        with pytest.raises(rules.RuleViolation):
            rules.cancel(deal(stage), NOW)


def test_funded_collection_waits_and_keeps_time_left() -> None:
    full = {"funded": 103, "has_deposits": True}
    [t] = rules.evaluate(deal(Stage.COLLECTION, alice=side(Party.ALICE, **full), bob=side(Party.BOB, **full)), NOW)
    assert t.stage is Stage.WAITING and t.remaining_ms == 60_000 and t.expires_at is None


def test_both_locked_in_waiting_swaps_and_payouts_close_it() -> None:
    full = {"funded": 103, "locked_amount": 103, "has_deposits": True}
    waiting = deal(Stage.WAITING, remaining_ms=5, alice=side(Party.ALICE, **full), bob=side(Party.BOB, **full))
    assert [t.stage for t in rules.evaluate(waiting, NOW)] == [Stage.SWAP]
    swapping = msgspec.structs.replace(waiting, stage=Stage.SWAP)
    assert rules.evaluate(swapping, NOW) == []
    [closed] = rules.evaluate(msgspec.structs.replace(swapping, payouts_done=True), NOW)
    assert (closed.stage, closed.outcome) == (Stage.CLOSED, Outcome.SWAPPED)


def test_reorg_in_waiting_resumes_deadline_with_time_left() -> None:
    short = side(Party.ALICE, funded=50, has_deposits=True)
    full = side(Party.BOB, funded=103, has_deposits=True)
    [t] = rules.evaluate(deal(Stage.WAITING, remaining_ms=42_000, alice=short, bob=full), NOW)
    assert t.stage is Stage.COLLECTION and t.expires_at == NOW + timedelta(seconds=42)


amounts = st.integers(min_value=0, max_value=10**30)


@given(
    alice_locked=amounts,
    bob_locked=amounts,
    late=st.integers(min_value=0, max_value=10**6),
    stage=st.sampled_from(list(Stage)),
)
def test_safeguard_1_never_revert_both_locked(alice_locked: int, bob_locked: int, late: int, stage: Stage) -> None:
    alice = side(Party.ALICE, funded=alice_locked, locked_amount=alice_locked, has_deposits=alice_locked > 0)
    bob = side(Party.BOB, funded=bob_locked, locked_amount=bob_locked, has_deposits=bob_locked > 0)
    state = deal(stage, alice=alice, bob=bob, expires_at=NOW - timedelta(seconds=late), remaining_ms=1000)
    for t in rules.evaluate(state, NOW):
        if alice.is_locked and bob.is_locked:
            assert t.stage is not Stage.REVERTED


@given(
    stage=st.sampled_from([Stage.CREATED, Stage.WAITING, Stage.SWAP, Stage.CLOSED]),
    late=st.integers(min_value=1, max_value=10**8),
)
def test_safeguard_7_deadline_counts_only_in_collection(stage: Stage, late: int) -> None:
    full = side(Party.ALICE, funded=103, has_deposits=True)
    state = deal(
        stage,
        expires_at=NOW - timedelta(seconds=late),
        alice=full,
        bob=msgspec.structs.replace(full, party=Party.BOB),
    )
    assert all(t.stage is not Stage.REVERTED for t in rules.evaluate(state, NOW))
