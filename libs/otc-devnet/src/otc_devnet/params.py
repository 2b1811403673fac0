"""The devnet's consensus and policy parameters."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import msgspec

COIN = 100_000_000
MAX_MONEY = 21_000_000 * COIN
#: regtest's proof-of-work limit: about every second header hash meets it, yet it is checked.
POW_BITS = 0x207FFFFF
MAX_BLOCK_WEIGHT = 4_000_000
#: What bitcoind relays: a transaction up to a tenth of a block.
MAX_STANDARD_TX_WEIGHT = 400_000
MIN_STANDARD_TX_NONWITNESS_SIZE = 65
MAX_REPLACEMENT_CANDIDATES = 100
ANCESTOR_LIMIT = 25
DESCENDANT_LIMIT = 25
LOCKTIME_THRESHOLD = 500_000_000
SEQUENCE_FINAL = 0xFFFFFFFF
#: BIP125: an input with a lower sequence number opts its transaction in to replacement.
MAX_BIP125_RBF_SEQUENCE = 0xFFFFFFFD
MAX_SCRIPT_ELEMENT_SIZE = 520


@dataclass(frozen=True)
class ChainParams:
    hrp: str = "alpha"
    coinbase_maturity: int = 100
    subsidy: int = 50 * COIN
    #: Fees are in satoshis per 1000 virtual bytes, as bitcoind keeps them.
    min_relay_fee: int = 1000
    incremental_relay_fee: int = 1000
    dust_relay_fee: int = 3000
    #: What `blockchain.estimatefee` answers, in satoshis per 1000 virtual bytes.
    estimate_fee: int = 1000
    #: The production Alpha chain's differences from Bitcoin: 112-byte RandomX-style headers and
    #: exactly one input per transaction (consensus).
    alpha: bool = False


def coins(sats: int) -> msgspec.Raw:
    """Satoshis as a JSON number of coins with eight decimals, exactly as bitcoind prints amounts."""
    sign = "-" if sats < 0 else ""
    whole, fraction = divmod(abs(sats), COIN)
    return msgspec.Raw(f"{sign}{whole}.{fraction:08d}".encode())


def parse_coins(text: str) -> int:
    """A decimal amount of coins (e.g. "0.00001") in satoshis, refusing sub-satoshi precision."""
    value = Decimal(text)
    sats = value.scaleb(8)
    if not value.is_finite() or sats != sats.to_integral_value() or sats < 0:
        raise ValueError(f"{text!r} is not a non-negative amount with at most 8 decimals")
    return int(sats)


def format_money(sats: int) -> str:
    """bitcoind's FormatMoney: 8 decimals with trailing zeros trimmed down to two."""
    sign = "-" if sats < 0 else ""
    quotient, remainder = divmod(abs(sats), COIN)
    text = f"{quotient}.{remainder:08d}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{sign}{whole}.{fraction.ljust(2, '0')}"


def fee_for(rate_per_kvb: int, vsize: int) -> int:
    """CFeeRate::GetFee: the fee at a rate for a size, rounded up to the satoshi."""
    return -(-rate_per_kvb * vsize // 1000)


def fee_rate(fee: int, vsize: int) -> int:
    """CFeeRate(fee, size): satoshis per 1000 virtual bytes, rounded down."""
    return fee * 1000 // vsize if vsize else 0


def format_fee_rate(rate_per_kvb: int) -> str:
    """CFeeRate::ToString."""
    return f"{rate_per_kvb // COIN}.{rate_per_kvb % COIN:08d} ALPHA/kvB"
