"""The ledger's plans for one escrow: the money rules of DESIGN §2 and safeguards 2 and 4."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from otc_common.messages import Party, Stage, TransferPurpose
from otc_engine import ledger
from otc_engine.ledger import DepositFact, Destinations, Escrow, GasFact, SafeguardViolation, TransferFact

TO = Destinations(counterparty_recipient="0xRecipient", operator="0xOperator", payback="0xPayback", tank="0xTank")
NOW = datetime(2026, 11, 25, tzinfo=UTC)
P = TransferPurpose


def escrow(
    native: bool = True, deposits: list[int] | None = None, transfers: list[TransferFact] | None = None, **kw: Any
) -> Escrow:
    base: dict[str, Any] = dict(
        deal_id="d",
        party=Party.ALICE,
        native=native,
        amount=1000,
        commission=3,
        fee_reserve=50 if native else 0,
        confirmations_needed=2,
        tip_height=100,
        deposits=[DepositFact(amount=a, block_number=90, block_time=NOW) for a in (deposits or [])],
        transfers=transfers or [],
    )
    base.update(kw)
    return Escrow(**base)


def done(
    purpose: TransferPurpose, amount: int, fee: int = 7, fee_from_amount: bool = False, sent: int | None = None
) -> TransferFact:
    return TransferFact(
        transfer_id=f"t-{purpose}-{amount}",
        purpose=purpose,
        amount=amount,
        status="CONFIRMED",
        fee_from_amount=fee_from_amount,
        amount_sent=amount - fee if fee_from_amount else (sent if sent is not None else amount),
        fee_paid=fee,
    )


def test_native_swap_pays_recipient_and_operator_exactly_then_returns_the_rest() -> None:
    first = ledger.swap_steps(escrow(deposits=[1100]), TO)
    assert [(p.purpose, p.to, p.amount, p.fee_from_amount) for p in first.transfers] == [
        (P.SWAP_PAYOUT, "0xRecipient", 1000, False),
        (P.COMMISSION, "0xOperator", 3, False),
    ]
    after = escrow(deposits=[1100], transfers=[done(P.SWAP_PAYOUT, 1000, fee=7), done(P.COMMISSION, 3, fee=7)])
    [surplus] = ledger.swap_steps(after, TO).transfers
    # 1100 in, 1003 paid out, 14 in fees: the payback gets the rest less only the fees
    assert (surplus.purpose, surplus.to, surplus.amount, surplus.fee_from_amount) == (P.SURPLUS, "0xPayback", 83, True)
    closed = escrow(
        deposits=[1100],
        transfers=[done(P.SWAP_PAYOUT, 1000), done(P.COMMISSION, 3), done(P.SURPLUS, 83, fee_from_amount=True)],
    )
    assert ledger.swap_steps(closed, TO).complete


def test_token_swap_waits_for_tank_gas_then_returns_what_is_left() -> None:
    token = escrow(native=False, deposits=[1010])
    waiting = ledger.swap_steps(token, TO)
    assert waiting.gas_request == ("d:ALICE:gas:swap", 3) and not waiting.transfers
    funded = escrow(
        native=False, deposits=[1010], gas=[GasFact(request_id="d:ALICE:gas:swap", status="FUNDED", amount=100)]
    )
    plan = ledger.swap_steps(funded, TO).transfers
    assert [(p.purpose, p.amount) for p in plan] == [(P.SWAP_PAYOUT, 1000), (P.COMMISSION, 3), (P.SURPLUS, 7)]
    paid = escrow(
        native=False,
        deposits=[1010],
        gas=[GasFact(request_id="d:ALICE:gas:swap", status="FUNDED", amount=100)],
        transfers=[done(P.SWAP_PAYOUT, 1000, fee=20), done(P.COMMISSION, 3, fee=20), done(P.SURPLUS, 7, fee=20)],
    )
    [gas_back] = ledger.swap_steps(paid, TO).transfers
    assert (gas_back.purpose, gas_back.to, gas_back.amount, gas_back.fee_from_amount) == (
        P.GAS_RETURN,
        "0xTank",
        40,
        True,
    )


def test_refund_returns_confirmed_deposits_only() -> None:
    unconfirmed = escrow(deposits=[500], tip_height=90)  # one confirmation of two
    steps = ledger.return_steps(unconfirmed, TO, P.REFUND, "refund")
    assert not steps.transfers and not steps.complete
    confirmed = escrow(deposits=[500, 20])
    [refund] = ledger.return_steps(confirmed, TO, P.REFUND, "refund").transfers
    assert (refund.to, refund.amount, refund.fee_from_amount) == ("0xPayback", 520, True)


def test_safeguard_2_no_refund_after_a_swap_payout_and_no_payout_after_a_refund() -> None:
    with pytest.raises(SafeguardViolation):
        ledger.return_steps(escrow(deposits=[1100], transfers=[done(P.SWAP_PAYOUT, 1000)]), TO, P.REFUND, "refund")
    with pytest.raises(SafeguardViolation):
        ledger.swap_steps(escrow(deposits=[1100], transfers=[done(P.REFUND, 1100, fee_from_amount=True)]), TO)


def test_safeguard_4_never_plans_more_than_confirmed_deposits() -> None:
    # 1053 required, only 1040 confirmed (the rest still maturing): the plan is refused.
    short = escrow(deposits=[1040])
    with pytest.raises(SafeguardViolation):
        ledger.swap_steps(short, TO)


@given(
    deposits=st.lists(st.integers(min_value=1, max_value=10**24), min_size=1, max_size=5),
    confirmed_depth=st.lists(st.integers(min_value=0, max_value=5), min_size=5, max_size=5),
    native=st.booleans(),
)
def test_safeguard_4_property_refunds_never_exceed_confirmed(
    deposits: list[int], confirmed_depth: list[int], native: bool
) -> None:
    facts = [
        DepositFact(amount=a, block_number=100 - confirmed_depth[i], block_time=NOW) for i, a in enumerate(deposits)
    ]
    e = msgspec.structs.replace(escrow(native=native), deposits=facts)
    funded = [GasFact(request_id="d:ALICE:gas:refund", status="FUNDED", amount=10**6)]
    for candidate in (e, msgspec.structs.replace(e, gas=funded)):
        steps = ledger.return_steps(candidate, TO, P.REFUND, "refund")
        asset_out = sum(t.amount for t in steps.transfers if t.purpose is not P.GAS_RETURN)
        assert asset_out <= candidate.confirmed_total


def test_late_deposit_after_close_goes_back_to_payback() -> None:
    swapped = [done(P.SWAP_PAYOUT, 1000), done(P.COMMISSION, 3), done(P.SURPLUS, 83, fee_from_amount=True)]
    late = escrow(deposits=[1100, 400], transfers=swapped)
    [back] = ledger.next_steps(Stage.CLOSED, late, TO).transfers
    assert (back.purpose, back.to, back.amount, back.fee_from_amount) == (P.LATE_RETURN, "0xPayback", 400, True)


def test_deadline_counts_only_deposits_mined_in_time() -> None:
    e = msgspec.structs.replace(
        escrow(),
        deposits=[
            DepositFact(amount=600, block_number=90, block_time=NOW),
            DepositFact(amount=600, block_number=95, block_time=NOW + timedelta(seconds=5)),
        ],
    )
    assert e.mined_total(NOW) == 600 and e.mined_total(None) == 1200


def test_utxo_escrow_pays_in_three_confirmed_phases() -> None:
    phased = escrow(deposits=[1100], phased=True)
    [payout] = ledger.swap_steps(phased, TO).transfers
    assert (payout.purpose, payout.phase) == (P.SWAP_PAYOUT, 1)
    pending = msgspec.structs.replace(
        phased,
        transfers=[
            TransferFact(transfer_id="p", purpose=P.SWAP_PAYOUT, amount=1000, status="SUBMITTED", fee_from_amount=False)
        ],
    )
    assert ledger.swap_steps(pending, TO).transfers == [], "nothing until phase 1 is confirmed"
    after_payout = msgspec.structs.replace(phased, transfers=[done(P.SWAP_PAYOUT, 1000, fee=5)])
    [commission] = ledger.swap_steps(after_payout, TO).transfers
    assert (commission.purpose, commission.amount, commission.phase) == (P.COMMISSION, 3, 2)
    after_commission = msgspec.structs.replace(
        phased, transfers=[done(P.SWAP_PAYOUT, 1000, fee=5), done(P.COMMISSION, 3, fee=5)]
    )
    [surplus] = ledger.swap_steps(after_commission, TO).transfers
    assert (surplus.purpose, surplus.amount, surplus.phase, surplus.fee_from_amount) == (P.SURPLUS, 87, 3, True)


@pytest.mark.parametrize("stage", [Stage.SWAP, Stage.REVERTED])
def test_a_gas_return_skipped_as_dust_is_not_asked_for_again(stage: Stage) -> None:
    """A fee bump can leave less tank gas than the return's own fee: the queue skips it, and that ends it."""
    if stage is Stage.SWAP:
        gas = GasFact(request_id="d:ALICE:gas:swap", status="FUNDED", amount=100)
        spent = [done(P.SWAP_PAYOUT, 1000, fee=30), done(P.COMMISSION, 3, fee=30), done(P.SURPLUS, 7, fee=30)]
    else:
        gas = GasFact(request_id="d:ALICE:gas:refund", status="FUNDED", amount=100)
        spent = [done(P.REFUND, 1010, fee=90)]
    paid = escrow(native=False, deposits=[1010], gas=[gas], transfers=spent)
    [gas_back] = ledger.next_steps(stage, paid, TO).transfers
    assert (gas_back.purpose, gas_back.amount) == (P.GAS_RETURN, 10)
    skipped = TransferFact(transfer_id="t-gas", purpose=P.GAS_RETURN, amount=10, status="SKIPPED", fee_from_amount=True)
    steps = ledger.next_steps(stage, msgspec.structs.replace(paid, transfers=[*spent, skipped]), TO)
    assert not steps.transfers and steps.complete


@pytest.mark.parametrize("native", [True, False])
def test_a_swap_is_not_done_while_less_counts_as_confirmed_than_went_out(native: bool) -> None:
    """A late tip or a reorg can make paid-out deposits look unconfirmed: wait for them, do not close the deal."""
    gas = [GasFact(request_id="d:ALICE:gas:swap", status="FUNDED", amount=100)] if not native else []
    paid = [done(P.SWAP_PAYOUT, 1000, fee=7), done(P.COMMISSION, 3, fee=7)]
    behind = escrow(native=native, deposits=[1100], tip_height=90, transfers=paid, gas=gas)  # 1 confirmation of 2
    steps = ledger.swap_steps(behind, TO)
    assert not steps.transfers and not steps.complete
    caught_up = ledger.swap_steps(msgspec.structs.replace(behind, tip_height=100), TO)
    assert [t.purpose for t in caught_up.transfers] == [P.SURPLUS]
