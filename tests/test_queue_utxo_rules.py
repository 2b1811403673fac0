"""The UTXO rules of the queue processor: coin selection, fees, replacements, signing, what to do next."""

from __future__ import annotations

import hashlib
import os
from decimal import Decimal

import pytest
from bitcoin.core import CTransaction
from hypothesis import given, settings
from hypothesis import strategies as st

from otc_common.addresses import utxo_script_pubkey
from otc_devnet.params import ChainParams
from otc_devnet.script import dust_threshold as devnet_dust_threshold
from otc_devnet.tx import Coin as DevnetCoin
from otc_devnet.tx import parse_tx
from otc_devnet.validation import check_standard, check_transaction, verify_scripts
from otc_queue.backend import Sent
from otc_queue.rules import Bump, Candidate, Pending, Rebroadcast, Refused, Wait
from otc_queue.utxo import classify
from otc_queue.utxo_rules import (
    RBF_SEQUENCE,
    Coin,
    Leg,
    LegMined,
    Plan,
    Seen,
    Terms,
    coins_to_sats,
    dust_threshold,
    fee_for,
    fee_rate,
    leg_action,
    plan_bump,
    plan_transfer,
    spend_vsize,
    spendable,
    standing,
)
from otc_queue.utxo_tx import EscrowKey, sign_spend

P2WPKH = bytes([0x00, 0x14]) + b"\x11" * 20
P2WSH = bytes([0x00, 0x20]) + b"\x22" * 32
P2TR = bytes([0x51, 0x20]) + b"\x33" * 32
CHANGE = bytes([0x00, 0x14]) + b"\x44" * 20
RELAY = 1000
COIN = 100_000_000


def terms(rate: int = 1000, to_script: bytes = P2WPKH, cap: int = 200_000) -> Terms:
    return Terms(rate=rate, relay=RELAY, cap=cap, to_script=to_script, change_script=CHANGE)


def coin(value: int, n: int = 0, height: int = 10) -> Coin:
    return Coin(txid=hashlib.sha256(f"{value}:{n}".encode()).hexdigest(), vout=n % 3, value=value, height=height)


# --------------------------------------------------------------------------- sizes and fees


def test_sizes_of_one_input_p2wpkh_spends() -> None:
    assert spend_vsize([22]) == 110
    assert spend_vsize([22, 22]) == 141
    assert spend_vsize([34, 22]) == 153


@pytest.mark.parametrize(("script", "dust"), [(P2WPKH, 294), (P2WSH, 330), (P2TR, 330)])
def test_dust_thresholds_are_bitcoinds(script: bytes, dust: int) -> None:
    assert dust_threshold(script) == dust == devnet_dust_threshold(script, ChainParams().dust_relay_fee)


def test_fee_rates() -> None:
    assert fee_for(1000, 141) == 141
    assert fee_for(1500, 141) == 212, "rounded up"
    assert coins_to_sats(Decimal("0.00001")) == 1000
    assert coins_to_sats(Decimal("0.000012345")) == 1235
    assert fee_rate(None, 1000, 1000, 50_000) == 1000, "no estimate: the floor"
    assert fee_rate(5000, 1000, 2000, 50_000) == 5000
    assert fee_rate(900_000, 1000, 1000, 50_000) == 50_000, "capped"
    assert fee_rate(10, 3000, 1000, 2000) == 3000, "never below the relay fee, whatever the cap"


# --------------------------------------------------------------------------- signing


def test_a_signed_spend_passes_the_devnets_checks_and_is_no_bigger_than_estimated() -> None:
    for round_ in range(40):
        key = EscrowKey(os.urandom(32))
        value = 50_000 + round_
        outputs = [(P2WSH if round_ % 2 else P2WPKH, 30_000)]
        if round_ % 3:
            outputs.append((key.script_pubkey, 10_000))
        signed = sign_spend(key, os.urandom(32).hex(), round_ % 4, value, outputs)
        tx = parse_tx(signed.raw)
        assert tx.txid_hex == signed.txid and tx.vsize == signed.vsize
        assert signed.vsize <= spend_vsize([len(script) for script, _ in outputs]) <= signed.vsize + 1
        check_transaction(tx, single_input=True)
        check_standard(tx, ChainParams(alpha=True))
        spent = DevnetCoin(value, key.script_pubkey, "", 1, False)
        verify_scripts(tx, [spent])  # BIP143, low S, strict DER, SIGHASH_ALL, compressed key
        assert tx.ctx.vin[0].nSequence == RBF_SEQUENCE
        assert [out.nValue for out in tx.ctx.vout] == [amount for _, amount in outputs]


def test_a_signature_over_another_amount_does_not_verify() -> None:
    key = EscrowKey(os.urandom(32))
    signed = sign_spend(key, os.urandom(32).hex(), 0, 50_000, [(P2WPKH, 40_000)])
    with pytest.raises(Exception, match="script-verify"):
        verify_scripts(parse_tx(signed.raw), [DevnetCoin(50_001, key.script_pubkey, "", 1, False)])


def test_a_key_shows_nothing_secret() -> None:
    secret = os.urandom(32)
    key = EscrowKey(secret)
    assert secret.hex() not in repr(key) and secret.hex() not in str(key)
    assert key.address("alpha").startswith("alpha1q")
    assert utxo_script_pubkey(key.address("alpha"), "alpha") == key.script_pubkey


# --------------------------------------------------------------------------- which outputs (safeguard 4)


def test_only_confirmed_unreserved_outputs_are_spendable() -> None:
    old, young, pooled, held = coin(1, 1, height=8), coin(2, 2, height=10), coin(3, 3, height=0), coin(4, 4, height=5)
    assert spendable([old, young, pooled, held], tip=10, threshold=2, reserved={held.outpoint}) == [old]
    assert spendable([old, young], tip=11, threshold=2, reserved=set()) == [old, young]


def test_one_deposit_pays_the_exact_amount_with_change_back() -> None:
    plan = plan_transfer(60_000_000, False, [coin(COIN)], terms())
    assert isinstance(plan, Plan) and len(plan.legs) == 1
    leg = plan.legs[0]
    assert (leg.to_value, leg.fee, leg.change) == (60_000_000, 141, COIN - 60_000_000 - 141)


def test_the_smallest_output_that_can_pay_is_used_alone() -> None:
    coins = [coin(5 * COIN, 1), coin(COIN, 2), coin(COIN // 2, 3)]
    plan = plan_transfer(COIN // 2 + 1000, False, coins, terms())
    assert isinstance(plan, Plan) and [leg.coin for leg in plan.legs] == [coins[1]]


def test_three_deposits_make_three_legs_with_an_exact_total() -> None:
    coins = [coin(40_000_000, n) for n in range(3)]
    plan = plan_transfer(COIN, False, coins, terms())
    assert isinstance(plan, Plan) and len(plan.legs) == 3
    assert plan.sent == COIN
    assert [leg.change for leg in plan.legs[:2]] == [0, 0], "whole outputs, no change"
    assert plan.legs[2].change == 120_000_000 - COIN - 3 * 110 - 31
    assert plan.fees == 2 * 110 + 141


def test_a_remainder_below_dust_is_moved_to_the_last_leg_from_the_one_before() -> None:
    big, small = coin(10_000_000, 1), coin(5_000_000, 2)
    amount = 10_000_000 - 110 + 100  # the big output whole, then 100 sat: dust
    plan = plan_transfer(amount, False, [big, small], terms())
    assert isinstance(plan, Plan)
    assert plan.sent == amount and all(leg.to_value >= 294 for leg in plan.legs)


def test_a_surplus_sweep_takes_each_fee_from_its_own_output() -> None:
    coins = [coin(30_000_000, 1), coin(20_000_000, 2)]
    plan = plan_transfer(50_000_000, True, coins, terms())
    assert isinstance(plan, Plan) and len(plan.legs) == 2
    assert all(leg.change == 0 and leg.fee == 110 for leg in plan.legs)
    assert plan.outflow == 50_000_000 and plan.sent == 50_000_000 - 220


def test_a_sweep_leaves_outputs_worth_less_than_their_fee() -> None:
    coins = [coin(COIN, 1), coin(300, 2)]
    plan = plan_transfer(COIN + 300, True, coins, terms())
    assert isinstance(plan, Plan) and [leg.coin for leg in plan.legs] == [coins[0]]
    assert isinstance(plan_transfer(300, True, [coin(300, 2)], terms()), Refused)
    dust_only = plan_transfer(10_000, True, [coin(300, n) for n in range(40)], terms())
    assert isinstance(dust_only, Refused) and dust_only.reason.startswith("dust:")


def test_dust_is_refused_and_missing_funds_wait() -> None:
    refund = plan_transfer(400, True, [coin(COIN)], terms())
    assert isinstance(refund, Refused) and refund.reason.startswith("dust:")
    tiny = plan_transfer(200, False, [coin(COIN)], terms())
    assert isinstance(tiny, Refused) and tiny.reason.startswith("dust:")
    assert isinstance(plan_transfer(COIN, False, [coin(COIN)], terms()), Wait), "the fee comes on top"
    assert isinstance(plan_transfer(COIN, True, [coin(COIN // 2)], terms()), Wait)
    assert isinstance(plan_transfer(COIN, False, [], terms()), Wait)


amounts = st.integers(min_value=1, max_value=3 * COIN)
coin_values = st.lists(
    st.one_of(st.integers(min_value=1, max_value=2000), st.integers(min_value=1, max_value=2 * COIN)),
    max_size=8,
)
scripts = st.sampled_from([P2WPKH, P2WSH, P2TR])
rates = st.integers(min_value=1000, max_value=60_000)


@settings(max_examples=400)
@given(amount=amounts, values=coin_values, fee_from_amount=st.booleans(), rate=rates, to_script=scripts)
def test_every_plan_spends_only_what_it_is_given_and_pays_what_it_must(
    amount: int, values: list[int], fee_from_amount: bool, rate: int, to_script: bytes
) -> None:
    coins = [coin(value, n) for n, value in enumerate(values)]
    t = terms(rate, to_script)
    plan = plan_transfer(amount, fee_from_amount, coins, t)
    if isinstance(plan, Refused):
        assert plan.reason.startswith("dust:")
        return
    if isinstance(plan, Wait):
        if fee_from_amount:
            assert sum(values) < amount
        else:
            usable = [v - t.fee(False) for v in values if v - t.fee(False) >= t.dust_to]
            # Too little, or only a split with a dust share (small outputs of less than twice dust).
            assert sum(usable) < amount or ("dust output" in plan.reason and min(usable) < 2 * t.dust_to)
        return
    spent = [leg.coin for leg in plan.legs]
    assert len({c.outpoint for c in spent}) == len(spent), "each output spent once"
    assert all(c in coins for c in spent)
    assert plan.outflow <= sum(c.value for c in spent) <= sum(values), "never more out than the outputs given"
    for leg in plan.legs:
        assert leg.to_value + leg.change + leg.fee == leg.coin.value
        assert leg.to_value >= t.dust_to, "no dust to the destination"
        assert leg.change == 0 or leg.change >= t.dust_change, "no dust change"
        vsize = t.vsize(leg.change > 0)
        assert leg.fee >= fee_for(rate, vsize) >= fee_for(RELAY, vsize), "at least the rate (and relay) for the size"
        assert leg.fee <= fee_for(rate, t.vsize(True)) + t.dust_change, "at most a dust change on top"
    if fee_from_amount:
        # Exactly the amount leaves, but for dust that cannot be an output of its own, and for outputs
        # worth less than their own fee (nobody can ever send those).
        worth = sum(v for v in values if v - t.fee(False) >= t.dust_to)
        assert min(amount, worth) - t.fee(True) - t.dust_to <= plan.outflow < amount + t.dust_change
    else:
        assert plan.sent == amount, "the destination gets the exact amount"


@given(values=st.lists(st.integers(min_value=10_000, max_value=COIN), min_size=1, max_size=6), rate=rates)
def test_a_sweep_of_every_output_takes_exactly_their_sum(values: list[int], rate: int) -> None:
    coins = [coin(value, n) for n, value in enumerate(values)]
    t = terms(rate)
    plan = plan_transfer(sum(values), True, coins, t)
    if any(value - t.fee(False) < t.dust_to for value in values):
        return
    assert isinstance(plan, Plan)
    assert plan.outflow == sum(values) and all(leg.change == 0 for leg in plan.legs)


# --------------------------------------------------------------------------- fee bumps


def test_a_bump_raises_the_fee_from_the_change_and_keeps_the_amount() -> None:
    leg = Leg(coin=coin(COIN), to_value=60_000_000, change=COIN - 60_000_000 - 141, fee=141)
    bumped = plan_bump(leg, False, terms())
    assert isinstance(bumped, Leg)
    assert bumped.to_value == 60_000_000 and bumped.fee == 282 and bumped.change == leg.change - 141
    assert bumped.coin == leg.coin


def test_a_leg_without_change_cannot_be_bumped_without_paying_the_destination_less() -> None:
    leg = Leg(coin=coin(COIN), to_value=COIN - 110, change=0, fee=110)
    assert isinstance(plan_bump(leg, False, terms()), Wait)
    swept = plan_bump(leg, True, terms())
    assert isinstance(swept, Leg) and swept.fee == 220 and swept.to_value == COIN - 220


def test_a_bump_stops_at_the_maximum_rate() -> None:
    leg = Leg(coin=coin(COIN), to_value=60_000_000, change=COIN - 60_000_000 - 141 * 50, fee=141 * 50)
    assert isinstance(plan_bump(leg, False, terms(cap=50_000)), Wait)
    assert isinstance(plan_bump(leg, False, terms(cap=60_000)), Leg)


@settings(max_examples=300)
@given(amount=amounts, values=coin_values, fee_from_amount=st.booleans(), rate=rates, later=rates)
def test_every_bump_is_a_valid_bip125_replacement(
    amount: int, values: list[int], fee_from_amount: bool, rate: int, later: int
) -> None:
    coins = [coin(value, n) for n, value in enumerate(values)]
    plan = plan_transfer(amount, fee_from_amount, coins, terms(rate))
    if not isinstance(plan, Plan):
        return
    t = terms(later)
    for leg in plan.legs:
        bumped = plan_bump(leg, fee_from_amount, t)
        if isinstance(bumped, Wait):
            assert not fee_from_amount or leg.to_value < t.dust_to + 2 * t.fee(True)
            continue
        assert bumped.coin == leg.coin, "the same input"
        assert bumped.to_value + bumped.change + bumped.fee == leg.coin.value
        old_vsize, new_vsize = t.vsize(leg.change > 0), t.vsize(bumped.change > 0)
        assert bumped.fee >= leg.fee + fee_for(RELAY, new_vsize), "BIP125 rule 4"
        assert bumped.fee * old_vsize > leg.fee * new_vsize, "a higher fee rate"
        assert bumped.fee >= fee_for(later, new_vsize)
        assert bumped.to_value >= t.dust_to and (bumped.change == 0 or bumped.change >= t.dust_change)
        if fee_from_amount:
            assert bumped.outflow == leg.outflow
        else:
            assert bumped.to_value == leg.to_value


# --------------------------------------------------------------------------- after broadcast


def candidates(*txids: str, was_mined: str | None = None, signed_at: float = 100.0) -> list[Candidate]:
    return [
        Candidate(txid=txid, seq=i, signed_at=signed_at + i, was_mined=txid == was_mined)
        for i, txid in enumerate(txids)
    ]


def test_a_mined_candidate_is_counted_from_the_tip() -> None:
    seen = Seen(tip=12, heights={"b": 11, "x": 3})
    assert leg_action(candidates("a", "b"), seen, now=200, bump_after=30) == LegMined("b", 11, 2)


def test_a_candidate_in_the_mempool_waits_then_is_bumped() -> None:
    seen = Seen(tip=12, heights={"a": 0})
    assert leg_action(candidates("a"), seen, now=110, bump_after=30) == Pending()
    assert leg_action(candidates("a"), seen, now=131, bump_after=30) == Bump()
    # The newest candidate's age counts, whichever of them the server holds.
    assert leg_action(candidates("a", "b"), seen, now=120, bump_after=30) == Pending()


def test_an_unknown_leg_is_sent_again_the_reorged_candidate_first() -> None:
    seen = Seen(tip=12, heights={})
    assert leg_action(candidates("a", "b"), seen, now=0, bump_after=30) == Rebroadcast("b", reorged=False)
    assert leg_action(candidates("a", "b", was_mined="a"), seen, now=0, bump_after=30) == Rebroadcast("a", reorged=True)


def test_a_transfer_is_done_when_every_leg_has_the_threshold() -> None:
    partial = standing([LegMined("a", 10, 3), None], threshold=2)
    assert (partial.txid, partial.block_number, partial.confirmations, partial.done) == ("a", 10, 0, False)
    shallow = standing([LegMined("a", 10, 3), LegMined("b", 12, 1)], threshold=2)
    assert shallow.confirmations == 1 and not shallow.done
    done = standing([LegMined("a", 10, 3), LegMined("b", 11, 2)], threshold=2)
    assert done.done and done.txid == "a" and done.confirmations == 2
    assert not standing([None], threshold=2).done


@pytest.mark.parametrize(
    ("message", "outcome"),
    [
        ("the transaction was rejected by network rules.\n\ntxn-already-in-mempool\n", Sent.KNOWN),
        ("the transaction was rejected by network rules.\n\nTransaction outputs already in utxo set\n", Sent.KNOWN),
        ("the transaction was rejected by network rules.\n\nbad-txns-inputs-missingorspent\n", Sent.SPENT),
        ("the transaction was rejected by network rules.\n\ntxn-mempool-conflict\n", Sent.SPENT),
        ("rejected by network rules.\n\ninsufficient fee, rejecting replacement abc\n", Sent.UNDERPRICED),
        ("rejected by network rules.\n\nmin relay fee not met, 100 < 141\n", Sent.UNDERPRICED),
        ("rejected by network rules.\n\nbad-txns-too-many-inputs, Alpha Transactions must have\n", Sent.REJECTED),
        ("rejected by network rules.\n\ndust\n", Sent.REJECTED),
    ],
)
def test_broadcast_refusals_are_classified(message: str, outcome: Sent) -> None:
    assert classify(message) is outcome


def test_a_signed_transaction_round_trips_through_python_bitcoinlib() -> None:
    key = EscrowKey(os.urandom(32))
    signed = sign_spend(key, "ab" * 32, 1, 10_000, [(P2TR, 5_000), (key.script_pubkey, 4_000)])
    tx = CTransaction.deserialize(signed.raw)
    assert tx.GetTxid()[::-1].hex() == signed.txid
    assert len(tx.vin) == 1 and tx.vin[0].prevout.n == 1 and tx.nVersion == 2 and tx.nLockTime == 0
