"""The tank's pure rules, its settings and its wallet, without servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from hypothesis import given
from hypothesis import strategies as st

from otc_common.money import AmountError
from otc_common.registry import load_registry
from otc_common.settings import ConfigError, load_settings
from otc_tank import rules
from otc_tank.rules import PlanKind, Standing
from otc_tank.settings import TankSettings, low_balance_thresholds
from otc_tank.wallet import check_tank_addresses, load_wallet
from tests.support import TANK_PATH, TEST_SEED_HEX, tank_address, write_test_registry

GWEI = 10**9

# ----------------------------------------------------------------- the estimate


def test_estimate_with_the_numbers_seen_on_anvil() -> None:
    # 2 transfers x 65,000 gas x (2 x 0.265571225 gwei + 1 gwei), plus 10 %.
    assert rules.gas_needed(2, 65_000, 265_571_225, GWEI) == 218_953_370_350_000


def test_estimate_rounds_up() -> None:
    assert rules.gas_needed(1, 21_001, 0, 1) == 23_102  # 23,101.1 → never short by the rounding


@given(
    transfers=st.integers(0, 64),
    gas=st.integers(0, 2_000_000),
    base=st.integers(0, 10**12),
    tip=st.integers(0, 10**11),
)
def test_estimate_covers_every_transfer_at_twice_the_base_fee(transfers: int, gas: int, base: int, tip: int) -> None:
    needed = rules.gas_needed(transfers, gas, base, tip)
    exact = transfers * gas * (2 * base + tip)
    assert exact <= needed <= exact + exact // 10 + 1


def test_plan_funds_only_the_difference() -> None:
    needed = rules.gas_needed(2, 65_000, GWEI, GWEI)
    plan = rules.plan_funding(
        transfers=2,
        gas_per_transfer=65_000,
        base_fee=GWEI,
        priority_fee=GWEI,
        escrow_balance=needed // 4,
        tank_available=10**18,
    )
    assert plan.kind is PlanKind.FUND
    assert plan.amount == needed - needed // 4
    assert plan.max_fee_per_gas == 3 * GWEI
    assert plan.cost == plan.amount + 21_000 * 3 * GWEI


@pytest.mark.parametrize("held_extra", [0, 1, 10**18])
def test_plan_not_needed_when_the_escrow_holds_enough(held_extra: int) -> None:
    needed = rules.gas_needed(3, 65_000, GWEI, GWEI)
    plan = rules.plan_funding(
        transfers=3,
        gas_per_transfer=65_000,
        base_fee=GWEI,
        priority_fee=GWEI,
        escrow_balance=needed + held_extra,
        tank_available=0,
    )
    assert (plan.kind, plan.amount, plan.cost) == (PlanKind.NOT_NEEDED, 0, 0)


def test_plan_waits_when_the_tank_cannot_pay_amount_and_fee() -> None:
    args = {"transfers": 1, "gas_per_transfer": 65_000, "base_fee": GWEI, "priority_fee": GWEI, "escrow_balance": 0}
    cost = rules.plan_funding(**args, tank_available=10**18).cost
    assert rules.plan_funding(**args, tank_available=cost).kind is PlanKind.FUND
    assert rules.plan_funding(**args, tank_available=cost - 1).kind is PlanKind.WAIT
    assert rules.plan_funding(**args, tank_available=-5).kind is PlanKind.WAIT


def test_negative_fees_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        rules.max_fee_per_gas(-1, 0)


# ----------------------------------------------------------------- nonces and confirmations


@pytest.mark.parametrize(("stored", "chain", "expected"), [(0, 0, 0), (5, 3, 5), (3, 5, 5), (7, 7, 7)])
def test_next_nonce_follows_the_database_unless_the_chain_is_ahead(stored: int, chain: int, expected: int) -> None:
    assert rules.next_nonce(stored, chain) == expected


@pytest.mark.parametrize(
    ("tip", "block", "success", "expected"),
    [
        (10, None, True, Standing.UNMINED),
        (10, 10, True, Standing.MINED),
        (11, 10, True, Standing.CONFIRMED),
        (12, 10, True, Standing.CONFIRMED),
        (9, 10, True, Standing.MINED),  # tip read before the receipt: not yet counted
        (20, 10, False, Standing.REVERTED),
    ],
)
def test_standing(tip: int, block: int | None, success: bool, expected: Standing) -> None:
    assert rules.standing(tip=tip, block_number=block, success=success, threshold=2) is expected


def test_confirmations_count_the_including_block() -> None:
    assert rules.confirmations(10, 10) == 1
    assert rules.confirmations(12, 10) == 3
    assert rules.confirmations(9, 10) == 0
    assert rules.confirmations(10, None) == 0


@pytest.mark.parametrize(
    ("never_sent", "was_mined", "since", "expected"),
    [
        (True, False, None, True),
        (False, True, 0.0, True),
        (False, False, 0.1, False),
        (False, False, 5.0, True),
        (False, False, None, True),
    ],
)
def test_should_broadcast(never_sent: bool, was_mined: bool, since: float | None, expected: bool) -> None:
    assert (
        rules.should_broadcast(never_sent=never_sent, was_mined=was_mined, seconds_since_last=since, retry_seconds=5)
        is expected
    )


# ----------------------------------------------------------------- low balance


@given(st.lists(st.integers(0, 100), max_size=40), st.integers(0, 100))
def test_low_balance_warns_once_per_crossing(balances: list[int], threshold: int) -> None:
    low = False
    warnings = 0
    for balance in balances:
        step = rules.low_balance_step(was_low=low, balance=balance, threshold=threshold)
        warnings += step.crossed
        low = step.low
    # A crossing is a poll below the threshold right after one at or above it (the start counts as above).
    previous = [threshold, *balances]
    crossings = sum(1 for before, now in zip(previous, balances, strict=False) if now < threshold <= before)
    assert warnings == crossings


def test_zero_threshold_never_warns() -> None:
    assert rules.low_balance_step(was_low=False, balance=0, threshold=0) == rules.LowBalanceStep(False, False)


@pytest.mark.parametrize(("text", "wei"), [("0.5", 5 * 10**17), ("2", 2 * 10**18), ("0", 0), ("0.000", 0)])
def test_parse_threshold(text: str, wei: int) -> None:
    assert rules.parse_threshold(text, 18) == wei


@pytest.mark.parametrize("text", ["half", "1e18", "-1", "0.5.1", ""])
def test_parse_threshold_refuses_malformed(text: str) -> None:
    with pytest.raises(AmountError):
        rules.parse_threshold(text, 18)


@pytest.mark.parametrize(
    ("transfers", "gas", "refused"),
    [(1, 65_000, False), (64, 2_000_000, False), (0, 65_000, True), (65, 65_000, True), (1, 20_999, True)],
)
def test_refusal_bounds(transfers: int, gas: int, refused: bool) -> None:
    assert (rules.refusal(transfers, gas) is not None) is refused


# ----------------------------------------------------------------- settings and wallet


BASE_ENV = {"OTC_DATABASE_URL": "postgresql://x/y", "OTC_NATS_URL": "nats://x", "OTC_REGISTRY_FILE": "/r"}


def test_thresholds_default_and_per_chain(tmp_path: Path) -> None:
    registry = load_registry(str(write_test_registry(tmp_path / "r.toml")), {})
    settings = load_settings(TankSettings, {**BASE_ENV, "OTC_TANK_LOW_BALANCE": "2"})
    thresholds = low_balance_thresholds(
        settings, registry, ["ETH", "POLYGON"], {"OTC_TANK_LOW_BALANCE_POLYGON": "100.5"}
    )
    assert thresholds == {"ETH": 2 * 10**18, "POLYGON": 1005 * 10**17}
    with pytest.raises(ConfigError, match=r"^OTC_TANK_LOW_BALANCE_ETH is malformed"):
        low_balance_thresholds(settings, registry, ["ETH"], {"OTC_TANK_LOW_BALANCE_ETH": "lots"})


def test_settings_defaults() -> None:
    settings = load_settings(TankSettings, BASE_ENV)
    assert settings.tank_path == "m/44'/60'/1'/0/0"
    assert (settings.tank_retry_seconds, settings.tank_poll_seconds, settings.tank_low_balance) == (5.0, 10.0, "0.5")
    assert settings.tank_test_crash_after_sign is False


def test_wallet_is_the_registry_tank_and_keeps_its_key_private(tmp_path: Path) -> None:
    seed_file = tmp_path / "seed"
    seed_file.write_text(TEST_SEED_HEX + "\n")
    wallet = load_wallet(TANK_PATH, {"OTC_SEED_FILE": str(seed_file)})
    assert wallet.address == tank_address()
    registry = load_registry(str(write_test_registry(tmp_path / "r.toml")), {})
    assert check_tank_addresses(wallet, registry) == ["ETH", "POLYGON"]
    assert repr(wallet) == f"TankWallet({tank_address()})"
    assert not hasattr(wallet, "__dict__")


def test_wrong_path_names_the_chain_and_no_secret(tmp_path: Path) -> None:
    wallet = load_wallet("m/44'/60'/1'/0/1", {"OTC_SEED": TEST_SEED_HEX})
    registry = load_registry(str(write_test_registry(tmp_path / "r.toml")), {})
    with pytest.raises(ConfigError, match=r"^chain ETH: tank_address") as caught:
        check_tank_addresses(wallet, registry)
    assert TEST_SEED_HEX not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "path", "message"),
    [
        ({}, TANK_PATH, "^OTC_SEED or OTC_SEED_FILE is required"),
        ({"OTC_SEED": "zz" * 32}, TANK_PATH, "^OTC_SEED is malformed"),
        ({"OTC_SEED": TEST_SEED_HEX}, "m/44'/x", "^OTC_TANK_PATH is malformed"),
    ],
)
def test_seed_and_path_errors_are_config_errors(env: dict[str, str], path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_wallet(path, env)
    assert "zz" * 32 not in str(caught.value)
    assert TEST_SEED_HEX not in str(caught.value)


def test_signed_funding_is_what_was_decided() -> None:
    wallet = load_wallet(TANK_PATH, {"OTC_SEED": TEST_SEED_HEX})
    escrow = str(Account.create().address)
    signed = wallet.sign_funding(
        chain_id=31338, nonce=7, to=escrow, amount=12345, max_fee_per_gas=3 * GWEI, priority_fee=GWEI
    )
    assert signed.tx_hash == "0x" + keccak(signed.raw).hex()
    assert Account.recover_transaction(signed.raw) == wallet.address
    fields = TypedTransaction.from_bytes(HexBytes(signed.raw)).as_dict()
    assert fields["chainId"] == 31338
    assert fields["nonce"] == 7
    assert fields["value"] == 12345
    assert fields["gas"] == rules.FUNDING_TX_GAS
    assert fields["maxFeePerGas"] == 3 * GWEI
    assert fields["maxPriorityFeePerGas"] == GWEI
    assert HexBytes(fields["to"]) == HexBytes(escrow)
