from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Annotated

import msgspec

from otc_common.money import AmountError
from otc_common.registry import Registry
from otc_common.settings import BaseSettings, ConfigError
from otc_tank.rules import parse_threshold


class TankSettings(BaseSettings, frozen=True, kw_only=True):
    tank_path: Annotated[str, msgspec.Meta(description="BIP32 path of the tank wallet key")] = "m/44'/60'/1'/0/0"
    tank_retry_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=3600, description="how often waiting requests are tried again")
    ] = 5.0
    tank_poll_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=3600, description="how often the tank balances are read")
    ] = 10.0
    tank_confirm_poll_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=600, description="how often funding transactions in flight are checked")
    ] = 1.0
    tank_low_balance: Annotated[
        str,
        msgspec.Meta(description='warn below this much native coin ("0.5"); per chain: OTC_TANK_LOW_BALANCE_<CHAIN>'),
    ] = "0.5"
    tank_rpc_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    #: Test-only: die by SIGKILL right after a signed funding is committed and before it is broadcast.
    tank_test_crash_after_sign: bool = False


def low_balance_thresholds(
    settings: TankSettings, registry: Registry, chains: Iterable[str], environ: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Per chain, in base units of its native coin; a chain's own variable wins over the default."""
    environ = os.environ if environ is None else environ
    thresholds = {}
    for chain_id in chains:
        chain = registry.chain(chain_id)
        variable = f"OTC_TANK_LOW_BALANCE_{chain_id.upper()}"
        text = environ.get(variable) or settings.tank_low_balance
        source = variable if environ.get(variable) else "OTC_TANK_LOW_BALANCE"
        try:
            thresholds[chain_id] = parse_threshold(text, chain.native_asset.decimals)
        except AmountError as exc:
            raise ConfigError(f"{source} is malformed: {exc}") from None
    return thresholds
