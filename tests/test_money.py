from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otc_common.money import AmountError, bps_of, format_amount, parse_amount


@pytest.mark.parametrize(
    ("text", "decimals", "expected"),
    [
        ("1", 18, 10**18),
        ("1.5", 18, 1_500_000_000_000_000_000),
        ("0.000000000000000001", 18, 1),
        ("123.456789", 6, 123_456_789),
        ("1.000000", 6, 1_000_000),
        ("1.10", 6, 1_100_000),
        ("0.1", 6, 100_000),
        ("007", 0, 7),
        ("007.5", 1, 75),
        ("42", 0, 42),
        ("0.00000001", 8, 1),
        ("21000000", 8, 2_100_000_000_000_000),
        ("115792089237316195423570985008687907853269984665640564039457.584007913129639935", 18, 2**256 - 1),
    ],
)
def test_parse_amount_accepts(text: str, decimals: int, expected: int) -> None:
    assert parse_amount(text, decimals) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        (" 1", "spaces"),
        ("1 ", "spaces"),
        ("1 000", "spaces"),
        ("\t1", "spaces"),
        ("1\n", "spaces"),
        ("\u00a01", "spaces"),
        ("-1", "negative"),
        ("-0.5", "negative"),
        ("+1", "'+' sign"),
        ("1e18", "scientific"),
        ("1E6", "scientific"),
        ("1.5e-3", "scientific"),
        ("0x10", "hexadecimal"),
        ("0X10", "hexadecimal"),
        ("1_000", "underscores"),
        ("1,5", "commas"),
        ("1,000.5", "commas"),
        ("1.2.3", "more than one decimal point"),
        ("1.", "digits after the decimal point"),
        (".5", "digits before the decimal point"),
        (".", "no digits"),
        ("abc", "only the digits 0-9"),
        ("NaN", "only the digits 0-9"),
        ("inf", "only the digits 0-9"),
        ("\u0661\u0662\u0663", "only the digits 0-9"),  # Arabic-Indic digits, which int() would accept
        ("\uff11\uff12", "only the digits 0-9"),  # fullwidth digits
        ("1.\uff15", "only the digits 0-9"),
        ("\u00b2", "only the digits 0-9"),  # superscript two, which isdigit() accepts
        ("0", "greater than zero"),
        ("0.000000", "greater than zero"),
        ("000", "greater than zero"),
        ("1" * 101, "too long"),
    ],
)
def test_parse_amount_rejects(text: str, fragment: str) -> None:
    with pytest.raises(AmountError) as info:
        parse_amount(text, 6, symbol="USDT")
    assert fragment in str(info.value)


def test_amount_error_is_value_error() -> None:
    assert issubclass(AmountError, ValueError)


@pytest.mark.parametrize("value", [1, 1.5, None, b"1", True, ["1"]])
def test_parse_amount_rejects_non_strings(value: Any) -> None:
    with pytest.raises(AmountError, match="decimal string"):
        parse_amount(value, 6)


def test_exactly_100_characters_is_accepted() -> None:
    text = "1" * 100
    assert parse_amount(text, 0) == int(text)


@pytest.mark.parametrize(
    ("text", "decimals", "message"),
    [
        ("1.1234567", 6, "amount has more than 6 decimal places for USDT"),
        ("0.0000001", 6, "amount has more than 6 decimal places for USDT"),
        ("1.5", 0, "amount must be a whole number for USDT (it has no decimal places)"),
    ],
)
def test_too_many_decimal_places(text: str, decimals: int, message: str) -> None:
    with pytest.raises(AmountError) as info:
        parse_amount(text, decimals, symbol="USDT")
    assert str(info.value) == message


@pytest.mark.parametrize(("text", "decimals"), [("1.0000000", 6), ("1.0", 0), ("5.000000000000000000000", 18)])
def test_trailing_zeros_beyond_decimals_are_rejected_and_said_so(text: str, decimals: int) -> None:
    with pytest.raises(AmountError) as info:
        parse_amount(text, decimals, symbol="USDT")
    assert "trailing zeros count too" in str(info.value)


def test_too_many_decimals_without_symbol_names_the_asset_generically() -> None:
    with pytest.raises(AmountError, match="for this asset"):
        parse_amount("1.1234567", 6)


def test_maximum() -> None:
    assert parse_amount("100", 6, max_base_units=100_000_000) == 100_000_000
    with pytest.raises(AmountError) as info:
        parse_amount("100.000001", 6, max_base_units=100_000_000, symbol="USDT")
    assert str(info.value) == "amount is above the maximum of 100 USDT"
    with pytest.raises(AmountError, match=r"above the maximum of 0\.5$"):
        parse_amount("1", 18, max_base_units=5 * 10**17)


@pytest.mark.parametrize("decimals", [-1, 256, True, 1.0, "6"])
def test_bad_decimals_is_a_programming_error(decimals: Any) -> None:
    with pytest.raises(ValueError) as info:
        parse_amount("1", decimals)
    assert not isinstance(info.value, AmountError)


@pytest.mark.parametrize("max_base_units", [-1, True, 1.5, "10"])
def test_bad_maximum_is_a_programming_error(max_base_units: Any) -> None:
    with pytest.raises(ValueError) as info:
        parse_amount("1", 6, max_base_units=max_base_units)
    assert not isinstance(info.value, AmountError)


@pytest.mark.parametrize(
    ("base_units", "decimals", "expected"),
    [
        (0, 18, "0"),
        (0, 0, "0"),
        (1, 18, "0.000000000000000001"),
        (10**18, 18, "1"),
        (1_500_000_000_000_000_000, 18, "1.5"),
        (1_100_000, 6, "1.1"),
        (123_456_789, 6, "123.456789"),
        (100_000, 6, "0.1"),
        (10, 1, "1"),
        (42, 0, "42"),
        (2**256 - 1, 18, "115792089237316195423570985008687907853269984665640564039457.584007913129639935"),
    ],
)
def test_format_amount(base_units: int, decimals: int, expected: str) -> None:
    assert format_amount(base_units, decimals) == expected


@pytest.mark.parametrize("base_units", [-1, -(10**18)])
def test_format_amount_rejects_negative(base_units: int) -> None:
    with pytest.raises(ValueError, match="negative"):
        format_amount(base_units, 18)


@pytest.mark.parametrize("base_units", [1.5, "1", True, None])
def test_format_amount_rejects_non_int(base_units: Any) -> None:
    with pytest.raises(ValueError):
        format_amount(base_units, 18)


@pytest.mark.parametrize(
    ("amount", "bps", "expected"),
    [
        (1_000_000, 30, 3_000),
        (10**18, 30, 3 * 10**15),
        (333, 30, 0),  # 0.999 rounds down
        (334, 30, 1),  # 1.002 rounds down
        (9_999, 1, 0),
        (10_000, 1, 1),
        (19_999, 1, 1),
        (0, 30, 0),
        (12_345, 0, 0),
        (12_345, 10_000, 12_345),
        (2**256 - 1, 30, (2**256 - 1) * 30 // 10_000),
    ],
)
def test_bps_of_rounds_down(amount: int, bps: int, expected: int) -> None:
    assert bps_of(amount, bps) == expected


@pytest.mark.parametrize(("amount", "bps"), [(-1, 30), (1, -1), (1, 10_001), (1.0, 30), (1, True)])
def test_bps_of_rejects(amount: Any, bps: Any) -> None:
    with pytest.raises(ValueError):
        bps_of(amount, bps)


@given(
    base_units=st.integers(min_value=1, max_value=10**80),
    decimals=st.integers(min_value=0, max_value=30),
)
def test_format_then_parse_round_trips(base_units: int, decimals: int) -> None:
    text = format_amount(base_units, decimals)
    assert parse_amount(text, decimals) == base_units
    assert not text.endswith(".")
    assert "." not in text or not text.endswith("0")


@given(
    whole=st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    frac=st.from_regex(r"[0-9]{0,18}", fullmatch=True),
)
def test_parse_then_format_is_canonical(whole: str, frac: str) -> None:
    text = f"{whole}.{frac}" if frac else whole
    try:
        base_units = parse_amount(text, 18)
    except AmountError:
        assert int(whole) == 0 and set(frac) <= {"0"}
        return
    canonical = format_amount(base_units, 18)
    assert parse_amount(canonical, 18) == base_units
    assert format_amount(parse_amount(canonical, 18), 18) == canonical


@given(amount=st.integers(min_value=0, max_value=10**40), bps=st.integers(min_value=0, max_value=10_000))
def test_bps_of_never_exceeds_exact_share(amount: int, bps: int) -> None:
    share = bps_of(amount, bps)
    assert share * 10_000 <= amount * bps < (share + 1) * 10_000
