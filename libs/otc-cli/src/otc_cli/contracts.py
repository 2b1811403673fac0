"""The test ERC-20 (contracts/TestToken.sol) and anvil's well-known dev accounts.

The compiled artifact ships inside this package (regenerate it with
scripts/compile_contracts.sh), so deploying needs no compiler.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.types import Nonce, TxParams, TxReceipt, Wei

__all__ = [
    "ANVIL_MNEMONIC",
    "ANVIL_PRIVATE_KEYS",
    "ContractError",
    "anvil_account",
    "anvil_address",
    "balance_of",
    "code_exists",
    "deploy_test_token",
    "load_test_token_artifact",
    "mint",
    "mint_many",
    "token_contract",
    "transfer",
]

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
#: The private keys of anvil's ten funded dev accounts: the mnemonic above at
#: m/44'/60'/0'/0/i. Published by foundry and worthless outside local chains.
ANVIL_PRIVATE_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)

RECEIPT_TIMEOUT = 60.0


class ContractError(RuntimeError):
    """A deployment or token transaction failed."""


def anvil_account(index: int) -> LocalAccount:
    """Anvil dev account `index` (0-9)."""
    account: LocalAccount = Account.from_key(ANVIL_PRIVATE_KEYS[index])
    return account


def anvil_address(index: int) -> str:
    """Checksummed address of anvil dev account `index` (0-9)."""
    return str(anvil_account(index).address)


@functools.cache
def load_test_token_artifact() -> dict[str, Any]:
    """`{"abi": [...], "bytecode": "0x..."}` of TestToken."""
    text = resources.files("otc_cli").joinpath("contracts/TestToken.json").read_text(encoding="utf-8")
    artifact: dict[str, Any] = json.loads(text)
    return artifact


def _web3(rpc_url: str) -> Web3:
    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))


def token_contract(w3: Web3, token: str) -> Contract:
    return w3.eth.contract(address=Web3.to_checksum_address(token), abi=load_test_token_artifact()["abi"])


def _send(w3: Web3, account: LocalAccount, tx: TxParams) -> HexBytes:
    signed = account.sign_transaction(cast(dict[str, Any], tx))
    return w3.eth.send_raw_transaction(signed.raw_transaction)


def _await_success(w3: Web3, tx_hash: HexBytes, what: str) -> TxReceipt:
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT)
    if receipt["status"] != 1:
        raise ContractError(f"{what} reverted (tx {tx_hash.to_0x_hex()})")
    return receipt


def deploy_test_token(rpc_url: str, name: str, symbol: str, decimals: int, deployer_private_key: str) -> str:
    """Deploy TestToken and return its checksummed address; the deployer is its minter."""
    w3 = _web3(rpc_url)
    account: LocalAccount = Account.from_key(deployer_private_key)
    artifact = load_test_token_artifact()
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx = factory.constructor(name, symbol, decimals).build_transaction(
        {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending")}
    )
    receipt = _await_success(w3, _send(w3, account, tx), f"deploying {symbol}")
    address = receipt["contractAddress"]
    if address is None:
        raise ContractError(f"deploying {symbol}: the receipt names no contract address")
    return str(Web3.to_checksum_address(address))


def mint_many(rpc_url: str, token: str, grants: Sequence[tuple[str, int]], key: str) -> list[str]:
    """Mint to several holders; all transactions are sent before waiting, so they share blocks.

    Returns the transaction hashes (0x-hex), each confirmed successful.
    """
    w3 = _web3(rpc_url)
    account: LocalAccount = Account.from_key(key)
    contract = token_contract(w3, token)
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    hashes = []
    for offset, (to, amount) in enumerate(grants):
        params: TxParams = {"from": account.address, "nonce": Nonce(nonce + offset)}
        tx = contract.functions.mint(Web3.to_checksum_address(to), amount).build_transaction(params)
        hashes.append(_send(w3, account, tx))
    for tx_hash in hashes:
        _await_success(w3, tx_hash, "mint")
    return [tx_hash.to_0x_hex() for tx_hash in hashes]


def mint(rpc_url: str, token: str, to: str, amount: int, key: str) -> str:
    """Mint `amount` base units to `to` (key must be the deployer's); the tx hash."""
    return mint_many(rpc_url, token, [(to, amount)], key)[0]


def transfer(rpc_url: str, token: str, to: str, amount: int, key: str) -> str:
    """ERC-20 transfer from the key's account; the confirmed tx hash."""
    w3 = _web3(rpc_url)
    account: LocalAccount = Account.from_key(key)
    tx = (
        token_contract(w3, token)
        .functions.transfer(Web3.to_checksum_address(to), amount)
        .build_transaction({"from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending")})
    )
    tx_hash = _send(w3, account, tx)
    _await_success(w3, tx_hash, "transfer")
    return tx_hash.to_0x_hex()


def send_native(rpc_url: str, to: str, amount: int, key: str) -> str:
    """A plain value transfer from the key's account; the confirmed tx hash."""
    w3 = _web3(rpc_url)
    account: LocalAccount = Account.from_key(key)
    tx: TxParams = {
        "from": account.address,
        "to": Web3.to_checksum_address(to),
        "value": Wei(amount),
        "gas": 21_000,
        "maxFeePerGas": Wei(w3.eth.gas_price * 2 + 10**9),
        "maxPriorityFeePerGas": Wei(10**9),
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "chainId": w3.eth.chain_id,
        "type": 2,
    }
    tx_hash = _send(w3, account, tx)
    _await_success(w3, tx_hash, "native transfer")
    return tx_hash.to_0x_hex()


def balance_of(rpc_url: str, token: str, owner: str) -> int:
    contract = token_contract(_web3(rpc_url), token)
    balance: int = contract.functions.balanceOf(Web3.to_checksum_address(owner)).call()
    return balance


def code_exists(rpc_url: str, address: str) -> bool:
    """Whether a contract is deployed at address (false after the chain was reset)."""
    return len(_web3(rpc_url).eth.get_code(Web3.to_checksum_address(address))) > 0
