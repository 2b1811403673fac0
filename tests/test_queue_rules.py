"""The queue processor's rules: destination checks, funds, fees and what to do after a broadcast."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otc_common.messages import Party, TransferPurpose
from otc_queue.backend import Sent
from otc_queue.evm import classify, token_transfer_data
from otc_queue.rules import (
    AccountAt,
    Allowed,
    Bump,
    Candidate,
    ChainFacts,
    Confirm,
    EscrowFact,
    Market,
    Mined,
    Missing,
    NonceTaken,
    Outflow,
    PartyFact,
    Pending,
    Rebroadcast,
    Receipt,
    Refused,
    Seen,
    TransferOrder,
    TxPlan,
    Wait,
    check_transfer,
    confirmed_block,
    next_action,
    plan_bump,
    plan_payment,
    raised,
    spendable,
)

ESCROW = "0x1111111111111111111111111111111111111111"
OPERATOR = "0x2222222222222222222222222222222222222222"
TANK = "0x3333333333333333333333333333333333333333"
ALICE_PAYBACK = "0x4444444444444444444444444444444444444444"
ALICE_RECIPIENT = "0x5555555555555555555555555555555555555555"
BOB_PAYBACK = "0x6666666666666666666666666666666666666666"
BOB_RECIPIENT = "0x7777777777777777777777777777777777777777"
GWEI = 10**9

CHAIN = ChainFacts(
    id="ETH", operator_address=OPERATOR, tank_address=TANK, native_asset="ETH", assets=frozenset({"ETH", "USDT"})
)
PARTIES = {
    Party.ALICE: PartyFact(party=Party.ALICE, payback_address=ALICE_PAYBACK, recipient_address=ALICE_RECIPIENT),
    Party.BOB: PartyFact(party=Party.BOB, payback_address=BOB_PAYBACK, recipient_address=BOB_RECIPIENT),
}


def escrow(asset: str = "ETH", deal_id: str = "d1", index: int = 7) -> EscrowFact:
    return EscrowFact(deal_id=deal_id, party=Party.ALICE, chain="ETH", asset=asset, address=ESCROW, escrow_index=index)


def order(purpose: TransferPurpose, to: str, **changes: object) -> TransferOrder:
    fields: dict[str, object] = {
        "transfer_id": "t1",
        "deal_id": "d1",
        "chain": "ETH",
        "asset": "ETH",
        "escrow_address": ESCROW,
        "escrow_index": 7,
        "to": to,
        "amount": 10**18,
        "purpose": purpose,
        "fee_from_amount": False,
    }
    fields.update(changes)
    return TransferOrder(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- destinations


@pytest.mark.parametrize(
    ("purpose", "to"),
    [
        (TransferPurpose.SWAP_PAYOUT, BOB_RECIPIENT),
        (TransferPurpose.COMMISSION, OPERATOR),
        (TransferPurpose.SURPLUS, ALICE_PAYBACK),
        (TransferPurpose.REFUND, ALICE_PAYBACK),
        (TransferPurpose.LATE_RETURN, ALICE_PAYBACK),
    ],
)
def test_each_purpose_goes_only_where_the_deal_says(purpose: TransferPurpose, to: str) -> None:
    assert check_transfer(order(purpose, to), ESCROW, escrow(), PARTIES, CHAIN) == Allowed()
    # Case does not matter (checksums were checked where the addresses came in).
    assert check_transfer(order(purpose, to.upper().replace("0X", "0x")), ESCROW, escrow(), PARTIES, CHAIN) == Allowed()
    for elsewhere in {BOB_RECIPIENT, OPERATOR, ALICE_PAYBACK, TANK, ALICE_RECIPIENT, BOB_PAYBACK} - {to}:
        verdict = check_transfer(order(purpose, elsewhere), ESCROW, escrow(), PARTIES, CHAIN)
        assert isinstance(verdict, Refused), (purpose, elsewhere)


def test_gas_return_goes_to_the_tank_in_native_coin_from_a_token_escrow() -> None:
    gas = order(TransferPurpose.GAS_RETURN, TANK, asset="ETH", fee_from_amount=True)
    assert check_transfer(gas, ESCROW, escrow("USDT"), PARTIES, CHAIN) == Allowed()
    assert isinstance(check_transfer(gas, ESCROW, escrow("ETH"), PARTIES, CHAIN), Refused)
    assert isinstance(
        check_transfer(order(TransferPurpose.GAS_RETURN, OPERATOR), ESCROW, escrow("USDT"), PARTIES, CHAIN), Refused
    )
    no_tank = ChainFacts(
        id="ETH", operator_address=OPERATOR, tank_address=None, native_asset="ETH", assets=CHAIN.assets
    )
    assert isinstance(check_transfer(gas, ESCROW, escrow("USDT"), PARTIES, no_tank), Refused)


def test_the_escrow_must_be_the_derived_one_of_this_deal() -> None:
    payout = order(TransferPurpose.SWAP_PAYOUT, BOB_RECIPIENT)
    assert isinstance(check_transfer(payout, OPERATOR, escrow(), PARTIES, CHAIN), Refused)
    assert isinstance(check_transfer(payout, ESCROW, escrow(deal_id="other"), PARTIES, CHAIN), Refused)
    assert isinstance(check_transfer(payout, ESCROW, escrow(index=8), PARTIES, CHAIN), Refused)
    assert isinstance(check_transfer(payout, ESCROW, escrow(asset="USDT"), PARTIES, CHAIN), Refused)
    assert isinstance(
        check_transfer(order(TransferPurpose.SWAP_PAYOUT, BOB_RECIPIENT, amount=0), ESCROW, escrow(), PARTIES, CHAIN),
        Refused,
    )
    token_fee = order(TransferPurpose.REFUND, ALICE_PAYBACK, asset="USDT", fee_from_amount=True)
    assert isinstance(check_transfer(token_fee, ESCROW, escrow("USDT"), PARTIES, CHAIN), Refused)


def test_missing_deal_facts_wait_instead_of_refusing() -> None:
    payout = order(TransferPurpose.SWAP_PAYOUT, BOB_RECIPIENT)
    assert isinstance(check_transfer(payout, ESCROW, None, PARTIES, CHAIN), Missing)
    assert isinstance(check_transfer(payout, ESCROW, escrow(), {Party.ALICE: PARTIES[Party.ALICE]}, CHAIN), Missing)
    refund = order(TransferPurpose.REFUND, ALICE_PAYBACK)
    assert isinstance(check_transfer(refund, ESCROW, escrow(), {Party.BOB: PARTIES[Party.BOB]}, CHAIN), Missing)
    # ...but a foreign escrow is refused even before the deal is known.
    assert isinstance(check_transfer(payout, OPERATOR, None, {}, CHAIN), Refused)


# --------------------------------------------------------------------------- funds


def test_spendable_counts_an_outflow_only_where_the_block_does_not_show_it_yet() -> None:
    # Nonce 0 (1 ETH + fee) is mined in the latest block but not in the confirmed one.
    confirmed = AccountAt(block=10, nonce=0, native=5 * 10**18)
    latest = AccountAt(block=11, nonce=1, native=5 * 10**18 - 10**18 - 21_000 * GWEI)
    pending = [Outflow(nonce=0, native=10**18 + 21_000 * 3 * GWEI), Outflow(nonce=1, native=10**18)]
    native, _ = spendable([confirmed, latest], pending)
    assert native == 5 * 10**18 - 10**18 - 21_000 * 3 * GWEI - 10**18


def test_an_unconfirmed_deposit_does_not_count() -> None:
    confirmed = AccountAt(block=10, nonce=0, native=10**18)
    latest = AccountAt(block=11, nonce=0, native=3 * 10**18)
    assert spendable([confirmed, latest], []) == (10**18, 0)
    # A deposit reorged away after confirmation does not count either.
    assert spendable([AccountAt(block=10, nonce=0, native=10**18), AccountAt(block=11, nonce=0, native=0)], []) == (
        0,
        0,
    )


@given(
    deposits=st.integers(0, 10**21),
    unconfirmed=st.integers(0, 10**21),
    outs=st.lists(st.integers(1, 10**20), max_size=5),
    mined=st.integers(0, 5),
)
def test_never_more_than_confirmed_deposits_less_every_outflow(
    deposits: int, unconfirmed: int, outs: list[int], mined: int
) -> None:
    """Whatever is mined where, what is spendable never exceeds confirmed deposits less all outflows."""
    mined = min(mined, len(outs))
    flows = [Outflow(nonce=i, native=amount) for i, amount in enumerate(outs)]
    taken = sum(outs[:mined])
    confirmed = AccountAt(block=1, nonce=0, native=deposits)
    latest = AccountAt(block=2, nonce=mined, native=deposits + unconfirmed - taken)
    native, _ = spendable([confirmed, latest], flows)
    assert native <= deposits - sum(outs)


def test_confirmed_block() -> None:
    assert confirmed_block(100, 1) == 100
    assert confirmed_block(100, 12) == 89


# --------------------------------------------------------------------------- fees

MARKET = Market(base_fee=GWEI, priority_fee=GWEI)


def pay(
    amount: int,
    *,
    room_native: int,
    room_token: int = 0,
    native: bool = True,
    fee_from_amount: bool = False,
    gas_limit: int = 21_000,
) -> TxPlan | Wait | Refused:
    return plan_payment(
        amount=amount,
        native=native,
        fee_from_amount=fee_from_amount,
        gas_limit=gas_limit,
        market=MARKET,
        room_native=room_native,
        room_token=room_token,
    )


def test_fee_from_amount_is_exact() -> None:
    plan = pay(10**18, fee_from_amount=True, room_native=10**18)
    assert isinstance(plan, TxPlan)
    assert plan.max_fee == plan.priority_fee == 3 * GWEI >= 2 * MARKET.base_fee
    assert plan.value + 21_000 * plan.max_fee == 10**18
    assert plan.max_cost == 10**18


def test_dust_and_waiting() -> None:
    dust = pay(21_000 * 3 * GWEI, fee_from_amount=True, room_native=10**18)
    assert isinstance(dust, Refused) and dust.reason.startswith("dust")
    short = pay(10**18, fee_from_amount=True, room_native=10**18 - 1)
    assert isinstance(short, Wait)


def test_fee_on_top_fits_the_room_or_waits() -> None:
    full = pay(10**18, room_native=2 * 10**18)
    assert full == TxPlan(value=10**18, gas_limit=21_000, max_fee=3 * GWEI, priority_fee=GWEI)
    # Only enough for base fee + tip: the cap comes down to what is there.
    tight = pay(10**18, room_native=10**18 + 21_000 * 2 * GWEI)
    assert isinstance(tight, TxPlan) and tight.max_fee == 2 * GWEI and tight.max_cost <= 10**18 + 21_000 * 2 * GWEI
    assert isinstance(
        pay(10**18, room_native=10**18 + 21_000 * 2 * GWEI - 1),
        Wait,
    )


def test_tokens_need_tokens_and_gas() -> None:
    ok = pay(500, native=False, fee_from_amount=False, gas_limit=60_000, room_native=10**16, room_token=500)
    assert isinstance(ok, TxPlan) and ok.value == 0 and ok.gas_limit == 60_000
    no_tokens = pay(501, native=False, fee_from_amount=False, gas_limit=60_000, room_native=10**16, room_token=500)
    assert isinstance(no_tokens, Wait)
    no_gas = pay(500, native=False, fee_from_amount=False, gas_limit=60_000, room_native=10**5, room_token=500)
    assert isinstance(no_gas, Wait) and "gas" in no_gas.reason


@given(
    amount=st.integers(1, 10**20),
    native=st.booleans(),
    fee_from_amount=st.booleans(),
    base_fee=st.integers(0, 500 * GWEI),
    priority_fee=st.integers(0, 50 * GWEI),
    room_native=st.integers(-(10**18), 10**20),
    room_token=st.integers(-(10**18), 10**20),
)
def test_a_planned_transaction_never_takes_more_than_the_escrow_can_spend(
    amount: int,
    native: bool,
    fee_from_amount: bool,
    base_fee: int,
    priority_fee: int,
    room_native: int,
    room_token: int,
) -> None:
    """Safeguard 4 at the level of one transaction, whatever the fee market."""
    market = Market(base_fee=base_fee, priority_fee=priority_fee)
    gas = 21_000 if native else 65_000
    plan = plan_payment(
        amount=amount,
        native=native,
        fee_from_amount=fee_from_amount and native,
        gas_limit=gas,
        market=market,
        room_native=room_native,
        room_token=room_token,
    )
    if not isinstance(plan, TxPlan):
        return
    assert plan.max_cost <= room_native
    assert plan.max_fee >= base_fee + min(priority_fee, plan.priority_fee)
    assert plan.priority_fee <= plan.max_fee
    if native:
        assert plan.value + (gas * plan.max_fee if fee_from_amount else 0) == amount
    else:
        assert plan.value == 0 and amount <= room_token


@given(fee=st.integers(0, 10**15))
def test_raised_is_at_least_an_eighth_more(fee: int) -> None:
    assert raised(fee) * 8 >= fee * 9
    assert raised(fee) > fee


def test_bump_raises_both_fees_and_keeps_the_amount_exact() -> None:
    last = TxPlan(value=10**18 - 21_000 * 3 * GWEI, gas_limit=21_000, max_fee=3 * GWEI, priority_fee=3 * GWEI)
    bumped = plan_bump(last=last, amount=10**18, native=True, fee_from_amount=True, market=MARKET, room_native=0)
    assert isinstance(bumped, TxPlan)
    assert bumped.max_fee * 8 >= last.max_fee * 9 and bumped.priority_fee == bumped.max_fee
    assert bumped.value + 21_000 * bumped.max_fee == 10**18
    # A spike of the base fee: the replacement follows the market, not just +12.5 %.
    spike = plan_bump(
        last=last,
        amount=10**18,
        native=True,
        fee_from_amount=True,
        market=Market(base_fee=50 * GWEI, priority_fee=GWEI),
        room_native=0,
    )
    assert isinstance(spike, TxPlan) and spike.max_fee == 101 * GWEI

    on_top = TxPlan(value=10**18, gas_limit=21_000, max_fee=3 * GWEI, priority_fee=GWEI)
    bumped = plan_bump(
        last=on_top, amount=10**18, native=True, fee_from_amount=False, market=MARKET, room_native=2 * 10**18
    )
    assert isinstance(bumped, TxPlan)
    assert bumped.max_fee * 8 >= on_top.max_fee * 9 and bumped.priority_fee * 8 >= on_top.priority_fee * 9
    assert bumped.value == on_top.value
    broke = plan_bump(
        last=on_top, amount=10**18, native=True, fee_from_amount=False, market=MARKET, room_native=on_top.max_cost
    )
    assert isinstance(broke, Wait)


@given(
    value=st.integers(0, 10**19),
    max_fee=st.integers(1, 500 * GWEI),
    tip=st.integers(0, 50 * GWEI),
    base_fee=st.integers(0, 500 * GWEI),
    priority_fee=st.integers(0, 50 * GWEI),
    room_native=st.integers(-(10**18), 10**20),
    fee_from_amount=st.booleans(),
)
def test_a_replacement_raises_both_fees_and_stays_within_the_funds(
    value: int, max_fee: int, tip: int, base_fee: int, priority_fee: int, room_native: int, fee_from_amount: bool
) -> None:
    tip = min(tip, max_fee)
    if fee_from_amount:
        tip = max_fee
    last = TxPlan(value=value, gas_limit=21_000, max_fee=max_fee, priority_fee=tip)
    amount = value + 21_000 * max_fee if fee_from_amount else value
    market = Market(base_fee=base_fee, priority_fee=priority_fee)
    bumped = plan_bump(
        last=last, amount=amount, native=True, fee_from_amount=fee_from_amount, market=market, room_native=room_native
    )
    if not isinstance(bumped, TxPlan):
        return
    assert bumped.max_fee * 8 >= last.max_fee * 9 and bumped.priority_fee * 8 >= last.priority_fee * 9
    assert bumped.priority_fee <= bumped.max_fee and bumped.gas_limit == last.gas_limit
    if fee_from_amount:
        assert bumped.max_cost == amount and bumped.value > 0
    else:
        assert bumped.value == value and bumped.max_cost <= room_native


# --------------------------------------------------------------------------- after broadcast


def seen(
    tip: int = 100, nonce: int = 0, receipts: dict[str, Receipt] | None = None, known: set[str] | None = None
) -> Seen:
    return Seen(tip=tip, account_nonce=nonce, receipts=receipts or {}, known=frozenset(known or set()))


def receipt(txid: str, block: int) -> Receipt:
    return Receipt(
        txid=txid, block_number=block, block_hash="0xb", success=True, gas_used=21_000, effective_gas_price=GWEI
    )


CANDIDATES = [Candidate(txid="0xa", seq=0, signed_at=0.0), Candidate(txid="0xb", seq=1, signed_at=10.0)]


def act(candidates: list[Candidate], view: Seen, now: float = 11.0, first_unmined: bool = True) -> object:
    return next_action(candidates, 0, view, threshold=3, now=now, bump_after=30.0, first_unmined=first_unmined)


def test_the_mined_candidate_is_followed_to_the_threshold() -> None:
    assert act(CANDIDATES, seen(tip=100, nonce=1, receipts={"0xa": receipt("0xa", 99)})) == Mined(receipt("0xa", 99), 2)
    assert act(CANDIDATES, seen(tip=101, nonce=1, receipts={"0xa": receipt("0xa", 99)})) == Confirm(
        receipt("0xa", 99), 3
    )


def test_pending_waits_then_bumps_only_the_lowest_nonce() -> None:
    pending = seen(known={"0xb"})
    assert act(CANDIDATES, pending, now=20.0) == Pending()
    assert act(CANDIDATES, pending, now=40.0) == Bump()
    assert act(CANDIDATES, pending, now=40.0, first_unmined=False) == Pending()


def test_a_forgotten_transaction_goes_out_again_as_the_same_bytes() -> None:
    assert act(CANDIDATES, seen()) == Rebroadcast("0xb", reorged=False)
    reorged = [Candidate(txid="0xa", seq=0, signed_at=0.0, was_mined=True), CANDIDATES[1]]
    assert act(reorged, seen()) == Rebroadcast("0xa", reorged=True)


def test_a_used_nonce_without_receipt_is_not_resent() -> None:
    assert act(CANDIDATES, seen(nonce=1)) == NonceTaken()


def test_broadcast_errors_are_classified() -> None:
    assert classify("transaction already imported") is Sent.KNOWN
    assert classify("already known") is Sent.KNOWN
    assert classify("nonce too low") is Sent.SPENT
    assert classify("replacement transaction underpriced") is Sent.UNDERPRICED
    assert classify("max fee per gas less than block base fee") is Sent.UNDERPRICED
    assert classify("insufficient funds for gas * price + value") is Sent.NO_FUNDS
    assert classify("something else") is Sent.REJECTED


def test_token_transfer_call_data() -> None:
    data = token_transfer_data(BOB_RECIPIENT, 1234)
    assert data[:4].hex() == "a9059cbb"
    assert data[4:36] == bytes(12) + bytes.fromhex(BOB_RECIPIENT[2:])
    assert int.from_bytes(data[36:], "big") == 1234
