"""Amounts as integers in base units (wei, satoshi); decimal strings only at the edges.

Floats never appear: a JSON number such as 0.1 is already wrong before it reaches Python, so
amounts cross the API as strings and are parsed here with exact integer arithmetic.
"""

from __future__ import annotations

import re

__all__ = ["MAX_AMOUNT_CHARS", "AmountError", "bps_of", "format_amount", "parse_amount"]

MAX_AMOUNT_CHARS = 100
BPS_DENOMINATOR = 10_000
# ERC-20 `decimals` is a uint8; nothing real comes close, but the bound keeps 10**decimals sane.
MAX_DECIMALS = 255

# ASCII only: `str.isdigit` and `\d` would also accept other scripts' digits, which int() happily converts.
_AMOUNT_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_SCIENTIFIC_RE = re.compile(r"[0-9]*\.?[0-9]*[eE][+-]?[0-9]+", re.ASCII)


class AmountError(ValueError):
    """An amount a trader (or an operator's config) wrote that cannot be accepted; the message says why."""


def _check_decimals(decimals: int) -> None:
    if isinstance(decimals, bool) or not isinstance(decimals, int):
        raise ValueError("decimals must be an int")
    if not 0 <= decimals <= MAX_DECIMALS:
        raise ValueError(f"decimals must be between 0 and {MAX_DECIMALS}, got {decimals}")


def _asset(symbol: str) -> str:
    return symbol if symbol else "this asset"


def _diagnose(text: str) -> str:
    """Why `text` does not match the accepted form, in words a trader understands."""
    if any(ch.isspace() for ch in text):
        return "amount must not contain spaces"
    if text.startswith("-"):
        return "amount must not be negative"
    if text.startswith("+"):
        return "amount must not have a '+' sign"
    if text[:2].lower() == "0x":
        return "hexadecimal amounts are not accepted; write a decimal number such as 1.5"
    if _SCIENTIFIC_RE.fullmatch(text):
        return "scientific notation such as 1e18 is not accepted; write the digits out"
    if "_" in text:
        return "underscores are not accepted in amounts"
    if "," in text:
        return "use '.' as the decimal point; commas are not accepted"
    if text.count(".") > 1:
        return "amount has more than one decimal point"
    if text == ".":
        return "amount has no digits"
    if text.endswith("."):
        return "amount must have digits after the decimal point (write 1 or 1.0, not 1.)"
    if text.startswith("."):
        return "amount must have digits before the decimal point (write 0.5, not .5)"
    return "amount may contain only the digits 0-9 and one '.' decimal point"


def parse_amount(
    text: str,
    decimals: int,
    *,
    max_base_units: int | None = None,
    symbol: str = "",
) -> int:
    """Parse a positive decimal string such as "12.5" into base units of an asset with `decimals`.

    The accepted form is deliberately narrow (ASCII digits, optionally a '.' followed by at least one
    digit) so that every accepted string has exactly one meaning.
    """
    _check_decimals(decimals)
    if max_base_units is not None and (
        isinstance(max_base_units, bool) or not isinstance(max_base_units, int) or max_base_units < 0
    ):
        raise ValueError("max_base_units must be a non-negative int or None")
    if not isinstance(text, str):
        raise AmountError('amount must be given as a decimal string such as "1.5", not as a number')
    if not text:
        raise AmountError("amount is empty")
    if len(text) > MAX_AMOUNT_CHARS:
        raise AmountError(f"amount is too long (more than {MAX_AMOUNT_CHARS} characters)")
    if _AMOUNT_RE.fullmatch(text) is None:
        raise AmountError(_diagnose(text))

    whole, _, frac = text.partition(".")
    if len(frac) > decimals:
        asset = _asset(symbol)
        if decimals == 0:
            message = f"amount must be a whole number for {asset} (it has no decimal places)"
        else:
            message = f"amount has more than {decimals} decimal places for {asset}"
        if set(frac[decimals:]) == {"0"}:
            # Silently dropping the zeros would be harmless here, but accepting them would mean
            # accepting a precision the asset does not have; say plainly what to remove.
            message += " (trailing zeros count too; remove them)"
        raise AmountError(message)

    scale: int = 10**decimals
    base_units = int(whole) * scale + int(frac.ljust(decimals, "0") or "0")
    if base_units == 0:
        raise AmountError("amount must be greater than zero")
    if max_base_units is not None and base_units > max_base_units:
        unit = f" {symbol}" if symbol else ""
        raise AmountError(f"amount is above the maximum of {format_amount(max_base_units, decimals)}{unit}")
    return base_units


def format_amount(base_units: int, decimals: int) -> str:
    """The canonical decimal string for `base_units`: no trailing zeros, no trailing '.', "0" for zero."""
    _check_decimals(decimals)
    if isinstance(base_units, bool) or not isinstance(base_units, int):
        raise ValueError("base_units must be an int")
    if base_units < 0:
        raise ValueError("base_units must not be negative")
    if decimals == 0:
        return str(base_units)
    scale: int = 10**decimals
    whole, frac = divmod(base_units, scale)
    frac_text = str(frac).rjust(decimals, "0").rstrip("0")
    return f"{whole}.{frac_text}" if frac_text else str(whole)


def bps_of(amount: int, bps: int) -> int:
    """`bps` basis points of `amount`, rounded down to the base unit (never in the broker's favour)."""
    for name, value in (("amount", amount), ("bps", bps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int")
    if amount < 0:
        raise ValueError("amount must not be negative")
    if not 0 <= bps <= BPS_DENOMINATOR:
        raise ValueError(f"bps must be between 0 and {BPS_DENOMINATOR}, got {bps}")
    return amount * bps // BPS_DENOMINATOR
