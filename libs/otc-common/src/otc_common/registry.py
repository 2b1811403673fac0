"""The chains and assets the broker trades, from a TOML file plus environment overrides.

Scalar chain fields can be overridden by `OTC_CHAIN_<CHAIN>_<FIELD>` (for example
`OTC_CHAIN_ETH_RPC`, `OTC_CHAIN_ETH_CONFIRMATIONS`, `OTC_CHAIN_ETH_OPERATOR_ADDRESS`)
and asset fields by `OTC_ASSET_<CHAIN>_<SYMBOL>_<FIELD>`, so one file serves every
environment and deployments change only what differs.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

import msgspec

from otc_common.addresses import AddressError, validate_evm_address, validate_utxo_address
from otc_common.keys import parse_path
from otc_common.money import AmountError, parse_amount
from otc_common.settings import ConfigError

DEFAULT_COMMISSION_BPS = 30
ERC20_PREFIX = "ERC20:"


class ChainKind(StrEnum):
    EVM = "evm"
    UTXO = "utxo"


class AssetFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    decimals: Annotated[int, msgspec.Meta(ge=0, le=36)]
    native: bool = False
    contract: str | None = None
    commission_bps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = DEFAULT_COMMISSION_BPS
    fixed_fee: str = "0"
    max_amount: str = "1000000000"
    #: Network fees a native-coin escrow keeps back for its own payouts (tokens' gas comes from the tank).
    fee_reserve: str = "0"
    #: Gas units one transfer of this asset costs, used for fee reserves and tank funding.
    transfer_gas: Annotated[int, msgspec.Meta(ge=21_000)] | None = None


class ChainFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: ChainKind
    confirmations: Annotated[int, msgspec.Meta(ge=1, le=1000)]
    operator_address: str
    derivation_path: str
    account_xpub: str
    assets: dict[str, AssetFile]
    chain_id: int | None = None
    rpc: str | None = None
    electrum: str | None = None
    hrp: str | None = None
    tank_address: str | None = None
    explorer_tx_url: str = ""
    min_timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 600
    max_timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 7 * 24 * 3600
    reorg_window: Annotated[int, msgspec.Meta(ge=2, le=10_000)] = 64


class RegistryFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    chains: dict[str, ChainFile]


class Asset(msgspec.Struct, frozen=True, kw_only=True):
    chain: str
    symbol: str
    decimals: int
    native: bool
    contract: str | None
    commission_bps: int
    fixed_fee: int
    max_amount: int
    fee_reserve: int
    transfer_gas: int | None

    @property
    def is_token(self) -> bool:
        return not self.native


class Chain(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    kind: ChainKind
    confirmations: int
    operator_address: str
    derivation_path: str
    account_xpub: str
    assets: dict[str, Asset]
    chain_id: int | None
    rpc: str | None
    electrum: str | None
    hrp: str | None
    tank_address: str | None
    explorer_tx_url: str
    min_timeout_seconds: int
    max_timeout_seconds: int
    reorg_window: int

    @property
    def native_asset(self) -> Asset:
        for asset in self.assets.values():
            if asset.native:
                return asset
        raise LookupError(f"chain {self.id} has no native asset")

    def validate_address(self, text: str) -> str:
        """The canonical form of a valid address on this chain; AddressError otherwise."""
        if self.kind is ChainKind.EVM:
            return validate_evm_address(text)
        assert self.hrp is not None
        return validate_utxo_address(text, self.hrp)

    def find_asset(self, symbol_or_token: str) -> Asset | None:
        """A registry symbol, or `ERC20:<address>` of a registered token."""
        if symbol_or_token.startswith(ERC20_PREFIX) and self.kind is ChainKind.EVM:
            wanted = symbol_or_token[len(ERC20_PREFIX) :].lower()
            for asset in self.assets.values():
                if asset.contract is not None and asset.contract.lower() == wanted:
                    return asset
            return None
        return self.assets.get(symbol_or_token)


class Registry(msgspec.Struct, frozen=True):
    chains: dict[str, Chain]

    def chain(self, chain_id: str) -> Chain:
        return self.chains[chain_id]


_SCALAR_CHAIN_FIELDS = {
    "confirmations",
    "operator_address",
    "derivation_path",
    "account_xpub",
    "chain_id",
    "rpc",
    "electrum",
    "hrp",
    "tank_address",
    "explorer_tx_url",
    "min_timeout_seconds",
    "max_timeout_seconds",
    "reorg_window",
}
_SCALAR_ASSET_FIELDS = {
    "decimals",
    "contract",
    "commission_bps",
    "fixed_fee",
    "fee_reserve",
    "max_amount",
    "transfer_gas",
}


def _apply_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for chain_id, chain in raw.get("chains", {}).items():
        for field in _SCALAR_CHAIN_FIELDS:
            value = environ.get(f"OTC_CHAIN_{chain_id.upper()}_{field.upper()}")
            if value is not None:
                chain[field] = value
        for symbol, asset in chain.get("assets", {}).items():
            for field in _SCALAR_ASSET_FIELDS:
                value = environ.get(f"OTC_ASSET_{chain_id.upper()}_{symbol.upper()}_{field.upper()}")
                if value is not None:
                    asset[field] = value


def _optional_amount(text: str, decimals: int, symbol: str) -> int:
    return 0 if text in ("0", "") else parse_amount(text, decimals, symbol=symbol)


def _build_asset(chain: str, symbol: str, spec: AssetFile) -> Asset:
    where = f"asset {symbol} on {chain}"
    if spec.native == (spec.contract is not None):
        raise ConfigError(f"{where}: exactly one of native = true or contract must be set")
    contract = None
    if spec.contract is not None:
        try:
            contract = validate_evm_address(spec.contract)
        except AddressError as exc:
            raise ConfigError(f"{where}: contract {exc}") from None
    try:
        max_amount = parse_amount(spec.max_amount, spec.decimals, symbol=symbol)
        fixed_fee = _optional_amount(spec.fixed_fee, spec.decimals, symbol)
        fee_reserve = _optional_amount(spec.fee_reserve, spec.decimals, symbol)
    except AmountError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Asset(
        chain=chain,
        symbol=symbol,
        decimals=spec.decimals,
        native=spec.native,
        contract=contract,
        commission_bps=spec.commission_bps,
        fixed_fee=fixed_fee,
        max_amount=max_amount,
        fee_reserve=fee_reserve,
        transfer_gas=spec.transfer_gas,
    )


def _build_chain(chain_id: str, spec: ChainFile) -> Chain:
    where = f"chain {chain_id}"
    if spec.kind is ChainKind.EVM and (spec.rpc is None or spec.chain_id is None):
        raise ConfigError(f"{where}: an evm chain needs rpc and chain_id")
    if spec.kind is ChainKind.UTXO and (spec.electrum is None or spec.hrp is None):
        raise ConfigError(f"{where}: a utxo chain needs electrum and hrp")
    try:
        parse_path(spec.derivation_path)
    except ValueError as exc:
        raise ConfigError(f"{where}: derivation_path {exc}") from None
    assets = {symbol: _build_asset(chain_id, symbol, asset) for symbol, asset in spec.assets.items()}
    if sum(asset.native for asset in assets.values()) != 1:
        raise ConfigError(f"{where}: exactly one native asset is required")
    if spec.kind is ChainKind.UTXO and any(not asset.native for asset in assets.values()):
        raise ConfigError(f"{where}: a utxo chain has no token assets")
    chain = Chain(
        id=chain_id,
        kind=spec.kind,
        confirmations=spec.confirmations,
        operator_address=spec.operator_address,
        derivation_path=spec.derivation_path,
        account_xpub=spec.account_xpub,
        assets=assets,
        chain_id=spec.chain_id,
        rpc=spec.rpc,
        electrum=spec.electrum,
        hrp=spec.hrp,
        tank_address=spec.tank_address,
        explorer_tx_url=spec.explorer_tx_url,
        min_timeout_seconds=spec.min_timeout_seconds,
        max_timeout_seconds=spec.max_timeout_seconds,
        reorg_window=spec.reorg_window,
    )
    try:
        operator = chain.validate_address(spec.operator_address)
        tank = chain.validate_address(spec.tank_address) if spec.tank_address else None
    except AddressError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return msgspec.structs.replace(chain, operator_address=operator, tank_address=tank)


def parse_registry(text: str, environ: Mapping[str, str] | None = None) -> Registry:
    environ = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"registry file is not valid TOML: {exc}") from None
    _apply_overrides(raw, environ)
    try:
        spec = msgspec.convert(raw, RegistryFile, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"registry file: {exc}") from None
    if not spec.chains:
        raise ConfigError("registry file names no chains")
    return Registry(chains={chain_id: _build_chain(chain_id, chain) for chain_id, chain in spec.chains.items()})


def load_registry(path: str, environ: Mapping[str, str] | None = None) -> Registry:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"OTC_REGISTRY_FILE cannot be read ({path}): {exc.strerror}") from None
    return parse_registry(text, environ)
