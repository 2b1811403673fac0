"""Settings and the registry: a missing or malformed value stops a service with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otc_common.registry import parse_registry
from otc_common.settings import BaseSettings, ConfigError, load_settings

GOOD = {
    "OTC_DATABASE_URL": "postgresql://x@h/db",
    "OTC_NATS_URL": "nats://h:4222",
    "OTC_REGISTRY_FILE": "r.toml",
}


def test_settings_typed_from_env() -> None:
    settings = load_settings(BaseSettings, {**GOOD, "OTC_HTTP_PORT": "9000"})
    assert settings.http_port == 9000 and settings.database_url == GOOD["OTC_DATABASE_URL"]


@pytest.mark.parametrize("missing", sorted(GOOD))
def test_missing_variable_named(missing: str) -> None:
    env = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is required"):
        load_settings(BaseSettings, env)


def test_malformed_variable_named_without_its_value() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(BaseSettings, {**GOOD, "OTC_HTTP_PORT": "secret-value-99999"})
    assert str(caught.value).startswith("OTC_HTTP_PORT is malformed")
    assert "secret-value" not in str(caught.value)
    with pytest.raises(ConfigError, match="OTC_HTTP_PORT"):
        load_settings(BaseSettings, {**GOOD, "OTC_HTTP_PORT": "70000"})


def test_service_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTC_")}
    env.update({"OTC_NATS_URL": "nats://127.0.0.1:1", "OTC_REGISTRY_FILE": str(tmp_path / "r.toml")})
    proc = subprocess.run([sys.executable, "-m", "otc_engine"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: OTC_DATABASE_URL is required: PostgreSQL URL (postgresql://user:pass@host:port/db)"
    ]


def registry_text(tmp_path: Path) -> str:
    from tests.support import write_test_registry

    return write_test_registry(tmp_path / "r.toml").read_text()


def test_registry_env_overrides(tmp_path: Path) -> None:
    registry = parse_registry(
        registry_text(tmp_path),
        {
            "OTC_CHAIN_ETH_CONFIRMATIONS": "12",
            "OTC_CHAIN_ETH_RPC": "http://node:8545",
            "OTC_ASSET_ETH_USDT_COMMISSION_BPS": "50",
        },
    )
    eth = registry.chain("ETH")
    assert eth.confirmations == 12 and eth.rpc == "http://node:8545"
    assert eth.assets["USDT"].commission_bps == 50 and eth.assets["USDT"].fixed_fee == 1_000_000
    assert eth.assets["ETH"].commission_bps == 30  # the default
    assert eth.find_asset("ERC20:0x5fbdb2315678afecb367f032d93f642f64180aa3") == eth.assets["USDT"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("OTC_CHAIN_ETH_OPERATOR_ADDRESS", "0x123"), "chain ETH"),
        (("OTC_CHAIN_ETH_CONFIRMATIONS", "zero"), "confirmations"),
        (("OTC_ASSET_ETH_USDT_CONTRACT", "0xnothex"), "asset USDT on ETH"),
        (("OTC_ASSET_ETH_USDT_FIXED_FEE", "0.0000001"), "asset USDT on ETH"),
        (("OTC_CHAIN_UNICITY_DERIVATION_PATH", "m/84'/0'/0'/0/1"), "derivation_path"),
    ],
)
def test_registry_errors_name_the_place(tmp_path: Path, change: tuple[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_registry(registry_text(tmp_path), dict([change]))
