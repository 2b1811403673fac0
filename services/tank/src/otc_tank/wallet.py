"""The tank wallet: its key from the seed, its address, and signing of funding transactions.

The private key lives only inside `TankWallet`; its repr shows the address alone, and nothing here
logs or puts key material into an exception message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec
from eth_account import Account
from eth_account.signers.local import LocalAccount

from otc_common.registry import ChainKind, Registry
from otc_common.settings import ConfigError, read_secret
from otc_common.signing_keys import load_seed, private_key_at
from otc_tank.rules import FUNDING_TX_GAS


class SignedFunding(msgspec.Struct, frozen=True):
    raw: bytes
    tx_hash: str


class TankWallet:
    __slots__ = ("_account", "address")

    def __init__(self, private_key: bytes) -> None:
        self._account: LocalAccount = Account.from_key(private_key)
        self.address: str = str(self._account.address)

    def __repr__(self) -> str:
        return f"TankWallet({self.address})"

    def sign_funding(
        self, *, chain_id: int, nonce: int, to: str, amount: int, max_fee_per_gas: int, priority_fee: int
    ) -> SignedFunding:
        transaction: dict[str, Any] = {
            "type": 2,
            "chainId": chain_id,
            "nonce": nonce,
            "to": to,
            "value": amount,
            "gas": FUNDING_TX_GAS,
            "maxFeePerGas": max_fee_per_gas,
            "maxPriorityFeePerGas": min(priority_fee, max_fee_per_gas),
            "data": b"",
        }
        signed = self._account.sign_transaction(transaction)
        return SignedFunding(raw=bytes(signed.raw_transaction), tx_hash=signed.hash.to_0x_hex().lower())


def load_wallet(tank_path: str, environ: Mapping[str, str] | None = None) -> TankWallet:
    """The key at `tank_path` of the seed in OTC_SEED_FILE / OTC_SEED; ConfigError with a safe message."""
    environ = os.environ if environ is None else environ
    secret = read_secret(environ.get("OTC_SEED"), environ.get("OTC_SEED_FILE"), "OTC_SEED")
    try:
        seed = load_seed(secret)
    except ValueError as exc:
        raise ConfigError(f"OTC_SEED is malformed: {exc}") from None
    try:
        key = private_key_at(seed, tank_path)
    except ValueError as exc:
        raise ConfigError(f"OTC_TANK_PATH is malformed: {exc}") from None
    return TankWallet(key)


def check_tank_addresses(wallet: TankWallet, registry: Registry) -> list[str]:
    """The EVM chains the wallet serves; ConfigError naming the chain whose tank_address differs."""
    chains = []
    for chain in sorted(registry.chains.values(), key=lambda c: c.id):
        if chain.kind is not ChainKind.EVM or not chain.tank_address:
            continue
        # The registry has already checked the address's checksum; only the key behind it is new here.
        if chain.tank_address.lower() != wallet.address.lower():
            raise ConfigError(
                f"chain {chain.id}: tank_address {chain.tank_address} is not the seed's key at OTC_TANK_PATH "
                f"({wallet.address}); check OTC_SEED and OTC_TANK_PATH"
            )
        chains.append(chain.id)
    return chains
