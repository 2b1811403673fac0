"""One-input P2WPKH transactions: built with python-bitcoinlib, signed per BIP143 with the escrow's key.

A key object never leaves this module's callers' caches and nothing here logs or quotes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import coincurve
import msgspec
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CTxInWitness, CTxWitness, lx
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash

from otc_common.addresses import segwit_address
from otc_queue.utxo_rules import RBF_SEQUENCE

TX_VERSION = 2


class SignedTx(msgspec.Struct, frozen=True, kw_only=True):
    txid: str
    raw: bytes
    vsize: int


def hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


class EscrowKey:
    """The private key of one escrow and what follows from it; repr and str show nothing secret."""

    __slots__ = ("_key", "program", "public_key")

    def __init__(self, secret: bytes) -> None:
        try:
            self._key = coincurve.PrivateKey(secret)
        except Exception:
            raise ValueError("not a valid secp256k1 private key") from None
        self.public_key: bytes = self._key.public_key.format(compressed=True)
        self.program: bytes = hash160(self.public_key)

    def __repr__(self) -> str:
        return "EscrowKey(<redacted>)"

    __str__ = __repr__

    def address(self, hrp: str) -> str:
        return segwit_address(hrp, 0, self.program)

    @property
    def script_pubkey(self) -> bytes:
        return bytes([0x00, 0x14]) + self.program

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA with a low S (libsecp256k1 always normalises it), RFC 6979 nonces."""
        return bytes(self._key.sign(digest, hasher=None))


def sign_spend(key: EscrowKey, txid: str, vout: int, value: int, outputs: Sequence[tuple[bytes, int]]) -> SignedTx:
    """A version-2 transaction spending the one P2WPKH output `txid:vout` worth `value` (replaceable,
    BIP125) to `outputs` (script, amount), signed with SIGHASH_ALL."""
    tx = CMutableTransaction(
        [CMutableTxIn(COutPoint(lx(txid), vout), nSequence=RBF_SEQUENCE)],
        [CMutableTxOut(amount, CScript(script)) for script, amount in outputs],
        nLockTime=0,
        nVersion=TX_VERSION,
    )
    # BIP143: a P2WPKH input is signed with the P2PKH script of its key hash as the script code.
    script_code = CScript(b"\x76\xa9\x14" + key.program + b"\x88\xac")
    digest = SignatureHash(script_code, tx, 0, SIGHASH_ALL, amount=value, sigversion=SIGVERSION_WITNESS_V0)
    signature = key.sign_digest(digest) + bytes([SIGHASH_ALL])
    tx.wit = CTxWitness([CTxInWitness(CScriptWitness([signature, key.public_key]))])
    return SignedTx(
        txid=tx.GetTxid()[::-1].hex(),
        raw=bytes(tx.serialize()),
        vsize=(int(tx.calc_weight()) + 3) // 4,
    )
