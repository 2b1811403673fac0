"""Transactions as the devnet keeps them: parsed once, with their ids and sizes, and the coins they create."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bitcoin.core import CTransaction

__all__ = ["Coin", "Outpoint", "Tx", "TxDecodeError", "parse_tx", "sha256d", "tx_from"]

#: (txid in internal byte order, output index)
Outpoint = tuple[bytes, int]


class TxDecodeError(ValueError):
    """The bytes are not one canonically serialized transaction."""


def sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


@dataclass(frozen=True, slots=True)
class Tx:
    ctx: CTransaction
    raw: bytes
    txid: bytes
    wtxid: bytes
    #: BIP141 weight: the stripped size counts four times, witness bytes once.
    weight: int
    stripped_size: int

    @property
    def vsize(self) -> int:
        return (self.weight + 3) // 4

    @property
    def txid_hex(self) -> str:
        return self.txid[::-1].hex()

    @property
    def is_coinbase(self) -> bool:
        vin = self.ctx.vin
        return len(vin) == 1 and vin[0].prevout.is_null()

    def outpoints(self) -> list[Outpoint]:
        return [(txin.prevout.hash, txin.prevout.n) for txin in self.ctx.vin]


def tx_from(ctx: CTransaction) -> Tx:
    ctx = CTransaction.from_tx(ctx)
    raw = ctx.serialize()
    stripped = ctx.serialize({"include_witness": False}) if ctx.has_witness() else raw
    return Tx(
        ctx=ctx,
        raw=raw,
        txid=sha256d(stripped),
        wtxid=sha256d(raw),
        weight=len(stripped) * 3 + len(raw),
        stripped_size=len(stripped),
    )


def parse_tx(raw: bytes) -> Tx:
    try:
        ctx = CTransaction.deserialize(raw)
    except Exception as exc:  # python-bitcoinlib raises several unrelated types on bad input
        raise TxDecodeError(str(exc) or type(exc).__name__) from exc
    # Anything that does not serialize back to the same bytes (a superfluous witness marker,
    # an oversized length prefix) would get a different id from a real node.
    if ctx.serialize() != raw:
        raise TxDecodeError("not canonically serialized")
    stripped = _strip_witness(raw) if ctx.has_witness() else raw
    return Tx(
        ctx=ctx,
        raw=raw,
        txid=sha256d(stripped),
        wtxid=sha256d(raw),
        weight=len(stripped) * 3 + len(raw),
        stripped_size=len(stripped),
    )


def _compact_size(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    if first < 0xFD:
        return first, pos + 1
    width = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
    return int.from_bytes(data[pos + 1 : pos + 1 + width], "little"), pos + 1 + width


def _strip_witness(raw: bytes) -> bytes:
    """The serialization without marker, flag and witnesses, cut out of canonical segwit bytes."""
    count, pos = _compact_size(raw, 6)
    for _ in range(count):
        length, pos = _compact_size(raw, pos + 36)
        pos += length + 4
    count, pos = _compact_size(raw, pos)
    for _ in range(count):
        length, pos = _compact_size(raw, pos + 8)
        pos += length
    return raw[:4] + raw[6:pos] + raw[-4:]


@dataclass(frozen=True, slots=True)
class Coin:
    """An unspent output (confirmed, or created by a mempool transaction)."""

    value: int
    script: bytes
    scripthash: str
    #: block height; MEMPOOL for an output of an unconfirmed transaction
    height: int
    coinbase: bool
    #: position of the creating transaction in its block, for blockchain order
    tx_pos: int = 0


MEMPOOL = -1
