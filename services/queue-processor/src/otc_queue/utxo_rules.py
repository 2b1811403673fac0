"""The UTXO half of the queue's rules: pure functions over plain data, no I/O.

A chain such as Alpha accepts only transactions with exactly one input, so a transfer is a set of
*legs*: each leg spends one confirmed escrow output, pays its share of the transfer to the
destination and returns change to the escrow when the change is worth an output (else it goes to
the fee). Every candidate of a leg (the first one, then fee bumps) spends the same output, so at
most one of them is ever mined.

- `spendable`: safeguard 4, only outputs with the chain's threshold of confirmations, not reserved.
- `plan_transfer`: which outputs, what each leg pays, what each leg's fee is.
- `plan_bump`: a BIP125 replacement of one leg, paying more fee from the same input.
- `leg_action` and `standing`: what a signed transfer needs, given what the server shows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from decimal import ROUND_CEILING, Decimal

import msgspec

from otc_queue.rules import Bump, Candidate, Pending, Rebroadcast, Refused, Wait

#: BIP125: an input with this sequence number opts its transaction in to replacement by fee.
RBF_SEQUENCE = 0xFFFFFFFD
#: bitcoind's default -dustrelayfee (sat per 1000 vB); below its threshold an output is not relayed.
DUST_RELAY_FEE = 3000
COIN = 100_000_000

# Sizes of a one-input P2WPKH spend, in bytes. The signature is DER with a low S (at most 71
# bytes) plus the sighash byte: estimating with the largest keeps the fee at or above the rate
# whatever signature the key produces.
_BASE_FIXED = 4 + 1 + (32 + 4 + 1 + 4) + 4  # version, input count, the input, lock time
_WITNESS = 2 + 1 + (1 + 72) + (1 + 33)  # marker and flag, item count, signature, public key


def _compact_size(n: int) -> int:
    return 1 if n < 0xFD else 3 if n <= 0xFFFF else 5 if n <= 0xFFFFFFFF else 9


def _output_size(script_len: int) -> int:
    return 8 + _compact_size(script_len) + script_len


def spend_vsize(output_script_lengths: Sequence[int]) -> int:
    """The virtual size of a one-input P2WPKH transaction with these outputs (an upper bound)."""
    base = _BASE_FIXED + _compact_size(len(output_script_lengths))
    base += sum(_output_size(n) for n in output_script_lengths)
    return (4 * base + _WITNESS + 3) // 4


def fee_for(rate: int, vsize: int) -> int:
    """The fee at `rate` sat per 1000 vB for `vsize`, rounded up (bitcoind's CFeeRate::GetFee)."""
    return -(-rate * vsize // 1000)


def _is_witness_program(script: bytes) -> bool:
    return 4 <= len(script) <= 42 and script[1] == len(script) - 2 and (script[0] == 0 or 0x51 <= script[0] <= 0x60)


def dust_threshold(script: bytes) -> int:
    """bitcoind's GetDustThreshold: an output below it costs more to spend than it is worth."""
    spend = 32 + 4 + 1 + 107 // 4 + 4 if _is_witness_program(script) else 32 + 4 + 1 + 107 + 4
    return fee_for(DUST_RELAY_FEE, _output_size(len(script)) + spend)


def coins_to_sats(value: Decimal) -> int:
    """An amount of coins (as Electrum reports fees) in satoshis, rounded up."""
    return int((value * COIN).to_integral_value(rounding=ROUND_CEILING))


def fee_rate(estimate: int | None, relay: int, floor: int, cap: int) -> int:
    """The rate to pay (sat per 1000 vB): the estimate, at least the configured floor, at most the
    configured cap, and never below what the server relays (the cap yields to the relay fee)."""
    wanted = max(estimate or 0, floor)
    return max(relay, min(wanted, cap))


# --------------------------------------------------------------------------- coins


class Coin(msgspec.Struct, frozen=True, kw_only=True):
    """An unspent output of the escrow; height 0 or less while it is unconfirmed."""

    txid: str
    vout: int
    value: int
    height: int

    @property
    def outpoint(self) -> tuple[str, int]:
        return (self.txid, self.vout)


def confirmations(height: int, tip: int) -> int:
    return tip - height + 1 if height > 0 else 0


def spendable(coins: Sequence[Coin], tip: int, threshold: int, reserved: Collection[tuple[str, int]]) -> list[Coin]:
    """Safeguard 4: outputs with at least `threshold` confirmations that no signed transfer holds.

    Unconfirmed outputs, the escrow's own change included, are never spent.
    """
    return [
        coin
        for coin in coins
        if coin.value > 0 and confirmations(coin.height, tip) >= threshold and coin.outpoint not in reserved
    ]


# --------------------------------------------------------------------------- plans


class Terms(msgspec.Struct, frozen=True, kw_only=True):
    """What one transfer's transactions cost: the fee rate and the two output scripts."""

    #: The fee rate paid, sat per 1000 vB.
    rate: int
    #: The server's minimum relay fee, also the least step of a replacement (BIP125), sat per 1000 vB.
    relay: int
    #: No fee above this rate, sat per 1000 vB; a fee bump stops here.
    cap: int
    to_script: bytes
    change_script: bytes

    def vsize(self, change: bool) -> int:
        scripts = [self.to_script, self.change_script] if change else [self.to_script]
        return spend_vsize([len(s) for s in scripts])

    def fee(self, change: bool) -> int:
        return fee_for(self.rate, self.vsize(change))

    @property
    def dust_to(self) -> int:
        return dust_threshold(self.to_script)

    @property
    def dust_change(self) -> int:
        return dust_threshold(self.change_script)


class Leg(msgspec.Struct, frozen=True, kw_only=True):
    """One transaction of a transfer: its input, what the destination gets, the change, the fee."""

    coin: Coin
    to_value: int
    change: int
    fee: int

    @property
    def outflow(self) -> int:
        """What leaves the escrow: everything but the change."""
        return self.coin.value - self.change


class Plan(msgspec.Struct, frozen=True):
    legs: list[Leg]

    @property
    def sent(self) -> int:
        return sum(leg.to_value for leg in self.legs)

    @property
    def fees(self) -> int:
        return sum(leg.fee for leg in self.legs)

    @property
    def outflow(self) -> int:
        return sum(leg.outflow for leg in self.legs)


def _order(coin: Coin) -> tuple[int, str, int]:
    return (-coin.value, coin.txid, coin.vout)


def _shares(
    coins: Sequence[Coin], target: int, capacity: Callable[[Coin], int], clean: Callable[[Coin, int], bool]
) -> list[tuple[Coin, int]]:
    """The outputs to spend and the share of `target` each carries (the caller made sure they suffice).

    The largest outputs are spent whole until one can carry the rest; the rest goes to the smallest
    output that can carry it, preferring one whose leg wastes nothing to the fee (`clean`). One
    output that can carry the whole target is therefore used alone.
    """
    pool = sorted(coins, key=_order)
    shares: list[tuple[Coin, int]] = []
    rest = target
    while capacity(pool[0]) < rest:
        coin = pool.pop(0)
        shares.append((coin, capacity(coin)))
        rest -= capacity(coin)
    last = min((c for c in pool if capacity(c) >= rest), key=lambda c: (not clean(c, rest), c.value, c.txid, c.vout))
    shares.append((last, rest))
    return shares


def _leg_paying(coin: Coin, to_value: int, terms: Terms) -> Leg | None:
    """A leg giving the destination exactly `to_value`, the fee on top."""
    change = coin.value - to_value - terms.fee(True)
    if change >= terms.dust_change:
        return Leg(coin=coin, to_value=to_value, change=change, fee=terms.fee(True))
    if coin.value - to_value >= terms.fee(False):
        # Change too small to be an output goes to the fee.
        return Leg(coin=coin, to_value=to_value, change=0, fee=coin.value - to_value)
    return None


def _leg_taking(coin: Coin, outflow: int, terms: Terms) -> Leg | None:
    """A leg taking `outflow` out of the escrow, its fee included (the destination gets the rest)."""
    change = coin.value - outflow
    if change >= terms.dust_change:
        to_value, fee = outflow - terms.fee(True), terms.fee(True)
    else:
        to_value = outflow - terms.fee(False)
        change, fee = 0, coin.value - to_value
    if to_value < terms.dust_to:
        return None
    return Leg(coin=coin, to_value=to_value, change=change, fee=fee)


def _plan_fee_on_top(amount: int, coins: Sequence[Coin], terms: Terms) -> Plan | Wait | Refused:
    if amount < terms.dust_to:
        return Refused(f"dust: {amount} is below the {terms.dust_to} an output to the destination must carry")

    def capacity(coin: Coin) -> int:
        return coin.value - terms.fee(False)

    usable = [c for c in coins if capacity(c) >= terms.dust_to]
    can_pay = sum(capacity(c) for c in usable)
    if can_pay < amount:
        return Wait(f"needs {amount} plus fees; the escrow's confirmed outputs can pay {can_pay}")

    def clean(coin: Coin, share: int) -> bool:
        spare = coin.value - share - terms.fee(False)
        return spare == 0 or coin.value - share - terms.fee(True) >= terms.dust_change

    shares = _shares(usable, amount, capacity, clean)
    if len(shares) > 1 and shares[-1][1] < terms.dust_to:
        # The last leg would pay the destination dust: the leg before it pays that much less.
        short = terms.dust_to - shares[-1][1]
        coin, share = shares[-2]
        if share - short < terms.dust_to:
            return Wait(f"no split of the escrow's outputs pays {amount} without a dust output")
        shares[-2] = (coin, share - short)
        shares[-1] = (shares[-1][0], terms.dust_to)
    legs = [_leg_paying(coin, share, terms) for coin, share in shares]
    assert all(leg is not None for leg in legs)
    return Plan([leg for leg in legs if leg is not None])


def _plan_fee_from_amount(amount: int, coins: Sequence[Coin], terms: Terms) -> Plan | Wait | Refused:
    if amount - terms.fee(False) < terms.dust_to:
        return Refused(
            f"dust: {amount} does not cover the network fee of {terms.fee(False)} "
            f"and an output of at least {terms.dust_to}"
        )
    usable = [c for c in coins if c.value - terms.fee(False) >= terms.dust_to]
    total, worth = sum(c.value for c in coins), sum(c.value for c in usable)
    target = amount
    if worth < amount:
        if total < amount:
            return Wait(f"needs {amount}; the escrow has {total} in confirmed outputs")
        if not usable:
            return Refused(f"dust: each confirmed output of the escrow is worth less than its own fee ({total})")
        # What is missing sits in outputs worth less than their own fee: nobody can ever send it.
        target = worth
    shares = _shares(usable, target, lambda c: c.value, lambda c, share: c.value == share)
    # Only the last share can be too small for a leg of its own; it stays in the escrow.
    legs = [leg for coin, share in shares if (leg := _leg_taking(coin, share, terms)) is not None]
    if not legs:
        return Refused(f"dust: {amount} is too little to pay a fee and both an output and change of at least dust")
    return Plan(legs)


def plan_transfer(amount: int, fee_from_amount: bool, coins: Sequence[Coin], terms: Terms) -> Plan | Wait | Refused:
    """The legs of a transfer, over `coins` (already filtered by `spendable`).

    Fee on top: the destination gets exactly `amount`; the fees come from the escrow's other funds.
    Fee from the amount (refunds, surplus): exactly `amount` leaves the escrow, fees included, and
    the destination gets the rest; a change too small to be an output goes to the fee, and a
    remainder too small for a leg of its own stays in the escrow.
    """
    if amount <= 0:
        return Refused(f"amount must be positive, got {amount}")
    if fee_from_amount:
        return _plan_fee_from_amount(amount, coins, terms)
    return _plan_fee_on_top(amount, coins, terms)


def plan_bump(leg: Leg, fee_from_amount: bool, terms: Terms) -> Leg | Wait:
    """A replacement of `leg` spending the same input with a higher fee (BIP125).

    The new fee pays at least the old one plus the relay fee for the new size, and at least the
    current rate. Fee on top: the destination keeps its exact amount, the fee comes out of the
    change (a leg without change cannot be bumped without paying the destination less). Fee from
    the amount: the change stays, the fee comes out of what the destination gets.
    """

    def least(change: bool) -> int:
        vsize = terms.vsize(change)
        return max(leg.fee + fee_for(terms.relay, vsize), fee_for(terms.rate, vsize))

    def capped(candidate: Leg) -> Leg | Wait:
        vsize = terms.vsize(candidate.change > 0)
        if candidate.fee * 1000 > terms.cap * vsize:
            return Wait(f"a fee of {candidate.fee} for {vsize} vB would exceed the maximum rate of {terms.cap}")
        return candidate

    coin = leg.coin
    if fee_from_amount:
        fee = least(leg.change > 0)
        to_value = leg.outflow - fee
        if to_value < terms.dust_to:
            return Wait(f"raising the fee to {fee} would leave the destination less than {terms.dust_to}")
        return capped(Leg(coin=coin, to_value=to_value, change=leg.change, fee=fee))
    if leg.change > 0:
        fee = least(True)
        change = coin.value - leg.to_value - fee
        if change >= terms.dust_change:
            return capped(Leg(coin=coin, to_value=leg.to_value, change=change, fee=fee))
        if coin.value - leg.to_value >= least(False):
            # What is left of the change is too small to be an output: all of it goes to the fee.
            return capped(Leg(coin=coin, to_value=leg.to_value, change=0, fee=coin.value - leg.to_value))
    return Wait(
        f"no change left to raise the fee of {leg.fee} from; more would come out of the destination's exact amount"
    )


# --------------------------------------------------------------------------- after broadcast


class Seen(msgspec.Struct, frozen=True, kw_only=True):
    """One look at the escrow's history: the tip, and the height of each transaction the server
    knows (above 0 once mined, 0 or -1 while in its mempool)."""

    tip: int
    heights: dict[str, int]


class LegMined(msgspec.Struct, frozen=True):
    txid: str
    height: int
    confirmations: int


LegAction = LegMined | Pending | Bump | Rebroadcast


def leg_action(candidates: Sequence[Candidate], seen: Seen, *, now: float, bump_after: float) -> LegAction:
    """What one leg needs. Its candidates spend the same input, so at most one is ever mined; one
    the server no longer knows goes out again as the same bytes: the one a reorg unmined if any,
    else the newest."""
    for candidate in reversed(candidates):
        height = seen.heights.get(candidate.txid)
        if height is not None and height > 0:
            return LegMined(candidate.txid, height, confirmations(height, seen.tip))
    if any(candidate.txid in seen.heights for candidate in candidates):
        if now - candidates[-1].signed_at >= bump_after:
            return Bump()
        return Pending()
    reorged = [candidate for candidate in candidates if candidate.was_mined]
    if reorged:
        return Rebroadcast(reorged[-1].txid, reorged=True)
    return Rebroadcast(candidates[-1].txid, reorged=False)


class Standing(msgspec.Struct, frozen=True, kw_only=True):
    """Where a transfer stands: the first mined leg's transaction, and the confirmations of its
    least confirmed leg (0 while any leg is unmined)."""

    txid: str | None
    block_number: int | None
    confirmations: int
    done: bool


def standing(mined: Sequence[LegMined | None], threshold: int) -> Standing:
    first = next((m for m in mined if m is not None), None)
    least = min((m.confirmations if m is not None else 0) for m in mined) if mined else 0
    return Standing(
        txid=first.txid if first is not None else None,
        block_number=first.height if first is not None else None,
        confirmations=least,
        done=bool(mined) and all(m is not None for m in mined) and least >= threshold,
    )
