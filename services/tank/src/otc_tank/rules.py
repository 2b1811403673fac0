"""The tank's decisions as pure functions: how much gas to give, when a funding is done, when to warn.

No I/O here: the shell reads the chain and the database, asks these functions, and stores the answer.
"""

from __future__ import annotations

import re
from enum import StrEnum

import msgspec

from otc_common.money import parse_amount

#: Gas of a plain value transfer to an externally owned account (an escrow).
FUNDING_TX_GAS = 21_000
#: Headroom on top of the estimate, so a fee rise between funding and payout does not strand the tokens.
MARGIN_BPS = 1_000
BPS = 10_000

_ZERO_RE = re.compile(r"0+(?:\.0+)?", re.ASCII)


def max_fee_per_gas(base_fee: int, priority_fee: int) -> int:
    """Twice the latest base fee plus the tip: still includable after several full blocks in a row."""
    if base_fee < 0 or priority_fee < 0:
        raise ValueError("fees must not be negative")
    return 2 * base_fee + priority_fee


def gas_needed(transfers: int, gas_per_transfer: int, base_fee: int, priority_fee: int) -> int:
    """`transfers * gas_per_transfer * (2 * base fee + tip)`, plus the margin, rounded up."""
    if transfers < 0 or gas_per_transfer < 0:
        raise ValueError("transfers and gas_per_transfer must not be negative")
    estimate = transfers * gas_per_transfer * max_fee_per_gas(base_fee, priority_fee)
    return -(-estimate * (BPS + MARGIN_BPS) // BPS)


class PlanKind(StrEnum):
    #: The escrow already holds enough native coin: GasFunded with amount 0, no transaction.
    NOT_NEEDED = "NOT_NEEDED"
    #: Sign and send `amount` now.
    FUND = "FUND"
    #: The tank cannot pay `cost` right now; the request waits for a refill.
    WAIT = "WAIT"


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    kind: PlanKind
    #: Wei the escrow receives (0 for NOT_NEEDED).
    amount: int
    #: The target the escrow should hold: the estimate with its margin.
    needed: int
    max_fee_per_gas: int
    priority_fee: int
    #: The most the funding can take from the tank: the amount plus its own worst-case fee.
    cost: int


def plan_funding(
    *,
    transfers: int,
    gas_per_transfer: int,
    base_fee: int,
    priority_fee: int,
    escrow_balance: int,
    tank_available: int,
) -> Plan:
    """What to do with one waiting request, given the fee market and both balances."""
    needed = gas_needed(transfers, gas_per_transfer, base_fee, priority_fee)
    amount = max(0, needed - max(0, escrow_balance))
    fee_cap = max_fee_per_gas(base_fee, priority_fee)
    cost = amount + FUNDING_TX_GAS * fee_cap if amount else 0
    if amount == 0:
        kind = PlanKind.NOT_NEEDED
    elif cost > tank_available:
        kind = PlanKind.WAIT
    else:
        kind = PlanKind.FUND
    return Plan(kind=kind, amount=amount, needed=needed, max_fee_per_gas=fee_cap, priority_fee=priority_fee, cost=cost)


def funding_cost(amount: int, fee_cap: int) -> int:
    """What a signed funding can take from the tank at most."""
    return amount + FUNDING_TX_GAS * fee_cap


def next_nonce(stored_next: int, chain_count: int) -> int:
    """The tank's next nonce: the database's sequence, unless the chain has already used more.

    The chain's count (mined transactions) is never above a nonce we still have in flight, so taking
    the larger one leaves no gap; it only moves ahead when the key was used outside this service.
    """
    if stored_next < 0 or chain_count < 0:
        raise ValueError("nonces must not be negative")
    return max(stored_next, chain_count)


class Standing(StrEnum):
    #: Not in any block: (re)broadcast the stored bytes.
    UNMINED = "UNMINED"
    #: In a block, below the threshold.
    MINED = "MINED"
    #: Deep enough: publish GasFunded.
    CONFIRMED = "CONFIRMED"
    #: Mined but reverted: the amount did not arrive; an operator must look.
    REVERTED = "REVERTED"


def confirmations(tip: int, block_number: int | None) -> int:
    """The including block counts as one; a block above the tip (a stale tip) counts as none."""
    if block_number is None or block_number > tip:
        return 0
    return tip - block_number + 1


def standing(*, tip: int, block_number: int | None, success: bool, threshold: int) -> Standing:
    if block_number is None:
        return Standing.UNMINED
    if not success:
        return Standing.REVERTED
    if confirmations(tip, block_number) >= threshold:
        return Standing.CONFIRMED
    return Standing.MINED


def should_broadcast(
    *, never_sent: bool, was_mined: bool, seconds_since_last: float | None, retry_seconds: float
) -> bool:
    """Send the stored bytes again if they never went out, were unmined by a reorg, or may have been dropped."""
    if never_sent or was_mined or seconds_since_last is None:
        return True
    return seconds_since_last >= retry_seconds


class LowBalanceStep(msgspec.Struct, frozen=True):
    low: bool
    #: True exactly when the balance has just gone below the threshold.
    crossed: bool


def low_balance_step(*, was_low: bool, balance: int, threshold: int) -> LowBalanceStep:
    """Warn once when the balance goes below the threshold; re-arm once it is back at or above it."""
    low = balance < threshold
    return LowBalanceStep(low=low, crossed=low and not was_low)


def parse_threshold(text: str, decimals: int) -> int:
    """A decimal amount of native coin, e.g. "0.5", in base units; "0" turns the warning off."""
    stripped = text.strip()
    if _ZERO_RE.fullmatch(stripped):
        return 0
    return parse_amount(stripped, decimals)


#: Bounds on a request: far above what a deal needs, far below what would drain a tank by mistake.
MAX_TRANSFERS = 64
MAX_GAS_PER_TRANSFER = 2_000_000


def refusal(transfers: int, gas_per_transfer: int) -> str | None:
    """Why a request cannot be served as asked, or None."""
    if not 1 <= transfers <= MAX_TRANSFERS:
        return f"transfers must be between 1 and {MAX_TRANSFERS}, got {transfers}"
    if not 21_000 <= gas_per_transfer <= MAX_GAS_PER_TRANSFER:
        return f"gas_per_transfer must be between 21000 and {MAX_GAS_PER_TRANSFER}, got {gas_per_transfer}"
    return None
