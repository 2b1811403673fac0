"""The queue processor's rules: pure functions over plain data, no I/O.

- `check_transfer`: DESIGN §3.3, the destination and the escrow checked against the deal.
- `spendable` and `plan_payment`: safeguard 4, never more out than confirmed deposits, and the fees.
- `plan_bump`: a replacement at the same nonce, fees raised by at least 12.5 %.
- `next_action`: what to do with a signed transfer given what the chain shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from otc_common.messages import Party, TransferPurpose

# --------------------------------------------------------------------------- destinations


class EscrowFact(msgspec.Struct, frozen=True, kw_only=True):
    """An escrow as the deal events announced it (EscrowAssigned)."""

    deal_id: str
    party: Party
    chain: str
    asset: str
    address: str
    escrow_index: int


class PartyFact(msgspec.Struct, frozen=True, kw_only=True):
    """A party's addresses as the deal events announced them (PartyDetailsFilled)."""

    party: Party
    payback_address: str
    recipient_address: str


class ChainFacts(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    operator_address: str
    tank_address: str | None
    native_asset: str
    assets: frozenset[str]


class TransferOrder(msgspec.Struct, frozen=True, kw_only=True):
    """A payout command as stored."""

    transfer_id: str
    deal_id: str
    chain: str
    asset: str
    escrow_address: str
    escrow_index: int
    to: str
    amount: int
    purpose: TransferPurpose
    fee_from_amount: bool


class Allowed(msgspec.Struct, frozen=True):
    pass


class Missing(msgspec.Struct, frozen=True):
    """The deal events needed for the check have not arrived yet: wait, do not refuse."""

    reason: str


class Refused(msgspec.Struct, frozen=True):
    """A check failed: never signed, reported as a non-retryable failure."""

    reason: str


Verdict = Allowed | Missing | Refused

_PAYBACK_PURPOSES = (TransferPurpose.SURPLUS, TransferPurpose.REFUND, TransferPurpose.LATE_RETURN)


def _same(a: str, b: str) -> bool:
    # EVM and bech32 addresses are both case-insensitive; checksums were verified where they entered.
    return a.lower() == b.lower()


def other(party: Party) -> Party:
    return Party.BOB if party is Party.ALICE else Party.ALICE


def check_transfer(
    order: TransferOrder,
    derived_address: str,
    escrow: EscrowFact | None,
    parties: Mapping[Party, PartyFact],
    chain: ChainFacts,
) -> Verdict:
    """Safeguard 3: the escrow is ours and the destination is one the deal allows for this purpose."""
    if order.amount <= 0:
        return Refused(f"amount must be positive, got {order.amount}")
    if order.chain != chain.id:
        return Refused(f"command for chain {order.chain} reached the signer of {chain.id}")
    if not _same(derived_address, order.escrow_address):
        return Refused(f"escrow {order.escrow_address} is not the address derived at index {order.escrow_index}")
    if escrow is None:
        return Missing(f"escrow {order.escrow_address} not yet announced by the deal events")
    if escrow.deal_id != order.deal_id:
        return Refused(f"escrow {order.escrow_address} belongs to deal {escrow.deal_id}, not {order.deal_id}")
    if escrow.escrow_index != order.escrow_index:
        return Refused(f"escrow {order.escrow_address} has index {escrow.escrow_index}, not {order.escrow_index}")
    if order.asset not in chain.assets:
        return Refused(f"asset {order.asset} is not traded on {chain.id}")
    if order.purpose is TransferPurpose.GAS_RETURN:
        if order.asset != chain.native_asset or escrow.asset == chain.native_asset:
            return Refused("a gas return sends the native coin out of a token escrow")
    elif order.asset != escrow.asset:
        return Refused(f"escrow {order.escrow_address} holds {escrow.asset}, not {order.asset}")
    if order.fee_from_amount and order.asset != chain.native_asset:
        return Refused("the fee can come out of the amount only for the native coin")

    allowed: str | None
    if order.purpose is TransferPurpose.SWAP_PAYOUT:
        # The counterparty's recipient address is on the chain this side sends from, i.e. this chain.
        counterparty = parties.get(other(escrow.party))
        if counterparty is None or not counterparty.recipient_address:
            return Missing(f"the {other(escrow.party).value} recipient address is not known yet")
        allowed = counterparty.recipient_address
    elif order.purpose is TransferPurpose.COMMISSION:
        allowed = chain.operator_address
    elif order.purpose in _PAYBACK_PURPOSES:
        own = parties.get(escrow.party)
        if own is None or not own.payback_address:
            return Missing(f"the {escrow.party.value} payback address is not known yet")
        allowed = own.payback_address
    else:
        allowed = chain.tank_address
        if allowed is None:
            return Refused(f"chain {chain.id} has no tank address to return gas to")
    if not _same(order.to, allowed):
        return Refused(f"{order.purpose.value} to {order.to} is not allowed: the deal says {allowed}")
    return Allowed()


# --------------------------------------------------------------------------- funds (safeguard 4)


class AccountAt(msgspec.Struct, frozen=True, kw_only=True):
    """An escrow's standing at one block: its nonce, native balance and balance of the traded token."""

    block: int
    nonce: int
    native: int
    token: int = 0


class Outflow(msgspec.Struct, frozen=True, kw_only=True):
    """What a signed, unconfirmed transfer can still take out: the most expensive of its candidates."""

    nonce: int
    native: int
    token: int = 0


def spendable(states: Sequence[AccountAt], outflows: Sequence[Outflow]) -> tuple[int, int]:
    """(native, token) the escrow can still send: the least over the blocks given.

    A transfer whose nonce is below the account's nonce at a block is already in that block's
    balance; the others are still to come out of it. Reading the balances at the newest block with
    the threshold of confirmations and at the latest block, and taking the smaller, counts only
    deposits that are both confirmed and still there.
    """
    if not states:
        return 0, 0
    native = min(s.native - sum(o.native for o in outflows if o.nonce >= s.nonce) for s in states)
    token = min(s.token - sum(o.token for o in outflows if o.nonce >= s.nonce) for s in states)
    return native, token


def confirmed_block(tip: int, confirmations: int) -> int:
    """The newest block that has `confirmations` confirmations (the tip itself has one)."""
    return tip - confirmations + 1


# --------------------------------------------------------------------------- fees

NATIVE_TRANSFER_GAS = 21_000


class Market(msgspec.Struct, frozen=True, kw_only=True):
    base_fee: int
    priority_fee: int

    @property
    def standard_cap(self) -> int:
        """Twice the base fee plus the tip: stays includable through several full blocks."""
        return 2 * self.base_fee + self.priority_fee


class TxPlan(msgspec.Struct, frozen=True, kw_only=True):
    """An EIP-1559 transaction's money: what the receiver gets (native) and the fee limits."""

    value: int
    gas_limit: int
    max_fee: int
    priority_fee: int

    @property
    def max_cost(self) -> int:
        """The most native coin it can take out of the sender."""
        return self.value + self.gas_limit * self.max_fee


class Wait(msgspec.Struct, frozen=True):
    """Not now: retried later (funds not confirmed yet, gas not there yet)."""

    reason: str


def raised(fee: int) -> int:
    """At least 12.5 % more (the replacement rule), and at least one wei more."""
    return max(fee + 1, (fee * 9 + 7) // 8)


def _fit(market: Market, gas_limit: int, room: int) -> tuple[int, int] | None:
    """(max fee, tip) within `room` wei of fee: the standard cap, or less down to base fee + tip."""
    if room < 0:
        return None
    cap = market.standard_cap
    if gas_limit * cap <= room:
        return cap, market.priority_fee
    cap = room // gas_limit
    if cap < market.base_fee + market.priority_fee:
        return None
    return cap, market.priority_fee


def plan_payment(
    *,
    amount: int,
    native: bool,
    fee_from_amount: bool,
    gas_limit: int,
    market: Market,
    room_native: int,
    room_token: int,
) -> TxPlan | Wait | Refused:
    """The first transaction of a transfer, within what the escrow can spend."""
    if native and fee_from_amount:
        # maxFee = tip = P makes the fee exactly gas * P whatever the base fee (P >= 2 * base fee),
        # so the receiver gets amount - fee to the wei and the escrow pays exactly `amount`.
        price = market.standard_cap
        fee = gas_limit * price
        if amount <= fee:
            return Refused(f"dust: {amount} does not cover the network fee of {fee}")
        if amount > room_native:
            return Wait(f"needs {amount}, the escrow can spend {room_native} of confirmed funds")
        return TxPlan(value=amount - fee, gas_limit=gas_limit, max_fee=price, priority_fee=price)
    if native:
        if amount > room_native:
            return Wait(f"needs {amount} plus the fee, the escrow can spend {room_native} of confirmed funds")
        fees = _fit(market, gas_limit, room_native - amount)
        if fees is None:
            return Wait(f"needs {amount} plus the fee, the escrow can spend {room_native} of confirmed funds")
        return TxPlan(value=amount, gas_limit=gas_limit, max_fee=fees[0], priority_fee=fees[1])
    if amount > room_token:
        return Wait(f"needs {amount} tokens, the escrow can spend {room_token} of confirmed funds")
    fees = _fit(market, gas_limit, room_native)
    if fees is None:
        needed = gas_limit * (market.base_fee + market.priority_fee)
        return Wait(f"waiting for gas: needs at least {needed} wei, the escrow can spend {room_native}")
    return TxPlan(value=0, gas_limit=gas_limit, max_fee=fees[0], priority_fee=fees[1])


def plan_bump(
    *, last: TxPlan, amount: int, native: bool, fee_from_amount: bool, market: Market, room_native: int
) -> TxPlan | Wait:
    """A replacement of `last` at the same nonce with fees raised by at least 12.5 %.

    `room_native` is what the escrow can spend apart from this transfer (whose candidates replace
    each other, so only one of them can ever take anything out).
    """
    gas = last.gas_limit
    if native and fee_from_amount:
        price = max(raised(last.max_fee), market.standard_cap)
        value = amount - gas * price
        if value <= 0:
            return Wait(f"cannot raise the fee to {gas * price}: it would exceed the amount {amount}")
        return TxPlan(value=value, gas_limit=gas, max_fee=price, priority_fee=price)
    tip = max(raised(last.priority_fee), market.priority_fee)
    cap = max(raised(last.max_fee), 2 * market.base_fee + tip)
    room = room_native - last.value
    if gas * cap > room:
        cap = room // gas if room > 0 else 0
        tip = min(tip, cap)
        if cap < raised(last.max_fee) or tip < raised(last.priority_fee):
            return Wait(f"no funds to raise the fee: {room} wei left for fees")
    return TxPlan(value=last.value, gas_limit=gas, max_fee=cap, priority_fee=tip)


# --------------------------------------------------------------------------- after broadcast


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    txid: str
    seq: int
    signed_at: float
    was_mined: bool = False


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    txid: str
    block_number: int
    block_hash: str
    success: bool
    gas_used: int
    effective_gas_price: int

    @property
    def fee(self) -> int:
        return self.gas_used * self.effective_gas_price


class Seen(msgspec.Struct, frozen=True, kw_only=True):
    """One look at the chain for a sender's signed transfers."""

    tip: int
    account_nonce: int
    receipts: dict[str, Receipt]
    #: Candidates the node knows (in its pool or mined).
    known: frozenset[str]


class Confirm(msgspec.Struct, frozen=True):
    receipt: Receipt
    confirmations: int


class Mined(msgspec.Struct, frozen=True):
    receipt: Receipt
    confirmations: int


class Rebroadcast(msgspec.Struct, frozen=True):
    txid: str
    #: It had been mined and a reorg took it out.
    reorged: bool


class Bump(msgspec.Struct, frozen=True):
    pass


class Pending(msgspec.Struct, frozen=True):
    """In the node's pool; not yet time to raise the fee."""


class NonceTaken(msgspec.Struct, frozen=True):
    """The nonce is used, yet no candidate has a receipt: a moment's race, or a transaction not ours."""


Action = Confirm | Mined | Rebroadcast | Bump | Pending | NonceTaken


def next_action(
    candidates: Sequence[Candidate],
    nonce: int,
    seen: Seen,
    *,
    threshold: int,
    now: float,
    bump_after: float,
    first_unmined: bool,
) -> Action:
    """What a signed transfer needs, given one look at the chain.

    Only one candidate can be mined (they share a nonce). A transaction the node no longer knows
    is sent again as the same bytes: the one a reorg unmined if any, else the newest. Fees are
    raised only for the lowest unmined nonce: the ones above it cannot be mined before it anyway.
    """
    for candidate in reversed(candidates):
        receipt = seen.receipts.get(candidate.txid)
        if receipt is not None:
            confirmations = max(0, seen.tip - receipt.block_number + 1)
            if confirmations >= threshold:
                return Confirm(receipt, confirmations)
            return Mined(receipt, confirmations)
    if seen.account_nonce > nonce:
        return NonceTaken()
    if any(c.txid in seen.known for c in candidates):
        newest = candidates[-1]
        if first_unmined and now - newest.signed_at >= bump_after:
            return Bump()
        return Pending()
    reorged = [c for c in candidates if c.was_mined]
    if reorged:
        return Rebroadcast(reorged[-1].txid, reorged=True)
    return Rebroadcast(candidates[-1].txid, reorged=False)
