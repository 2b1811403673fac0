"""Keys and signed P2WPKH transactions for the devnet tests, made independently of the devnet's own code."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CTxInWitness, CTxWitness, lx
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash
from bitcoin.segwit_addr import encode as segwit_encode
from bitcoin.wallet import CKey

HRP = "alpha"
RBF = 0xFFFFFFFD
FINAL = 0xFFFFFFFF


def sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


class Key:
    """A fresh secp256k1 key and its P2WPKH output, address and Electrum scripthash."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.key = CKey(secret or os.urandom(32), compressed=True)
        self.pub = bytes(self.key.pub)
        self.program = hash160(self.pub)
        self.script = b"\x00\x14" + self.program
        address = segwit_encode(HRP, 0, self.program)
        assert address is not None
        self.address: str = address
        self.scripthash = hashlib.sha256(self.script).digest()[::-1].hex()

    def sign(self, digest: bytes, hashtype: int = SIGHASH_ALL) -> bytes:
        return bytes(self.key.sign(digest)) + bytes([hashtype])


@dataclass(frozen=True)
class Utxo:
    txid: str
    vout: int
    value: int
    key: Key


def build(
    inputs: Sequence[Utxo],
    outputs: Sequence[tuple[bytes, int]],
    *,
    sequence: int = RBF,
    locktime: int = 0,
    version: int = 2,
    witness: Sequence[Sequence[bytes]] | None = None,
) -> CMutableTransaction:
    """A transaction spending P2WPKH inputs, each signed with BIP143 by its own key (unless witness is given)."""
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(lx(utxo.txid), utxo.vout), nSequence=sequence) for utxo in inputs],
        [CMutableTxOut(value, CScript(script)) for script, value in outputs],
        nLockTime=locktime,
        nVersion=version,
    )
    stacks: list[Sequence[bytes]] = []
    for index, utxo in enumerate(inputs):
        if witness is not None:
            stacks.append(witness[index])
            continue
        code = CScript(b"\x76\xa9\x14" + utxo.key.program + b"\x88\xac")
        digest = SignatureHash(code, tx, index, SIGHASH_ALL, amount=utxo.value, sigversion=SIGVERSION_WITNESS_V0)
        stacks.append([utxo.key.sign(digest), utxo.key.pub])
    tx.wit = CTxWitness([CTxInWitness(CScriptWitness(list(stack))) for stack in stacks])
    return tx


def sighash(tx: CMutableTransaction, index: int, utxo: Utxo, hashtype: int = SIGHASH_ALL) -> bytes:
    code = CScript(b"\x76\xa9\x14" + utxo.key.program + b"\x88\xac")
    digest: bytes = SignatureHash(code, tx, index, hashtype, amount=utxo.value, sigversion=SIGVERSION_WITNESS_V0)
    return digest


def txid_of(tx: CMutableTransaction) -> str:
    return str(tx.GetTxid()[::-1].hex())


def vsize_of(tx: CMutableTransaction) -> int:
    return (int(tx.calc_weight()) + 3) // 4


def electrum_status(history: Sequence[dict[str, Any]]) -> str | None:
    """The protocol's status, computed from get_history's answer: sha256 of "tx_hash:height:" in order."""
    if not history:
        return None
    return hashlib.sha256("".join(f"{item['tx_hash']}:{item['height']}:" for item in history).encode()).hexdigest()


async def next_notification(
    queue: asyncio.Queue[tuple[str, list[Any]]], method: str, *, key: str | None = None, timeout: float = 5.0
) -> list[Any]:
    """The next notification of method (for key, when given), skipping others; fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {method} notification within {timeout}s")
        got_method, params = await asyncio.wait_for(queue.get(), remaining)
        if got_method == method and (key is None or params[0] == key):
            return params


def drain(queue: asyncio.Queue[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
