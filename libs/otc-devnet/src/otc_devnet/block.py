"""Block headers and blocks: Bitcoin's 80-byte header, or the Alpha chain's 112-byte RandomX header.

Unicity's Alpha node serializes `hashRandomX` after the nonce when version bit 1 is set; the block
hash is sha256d of all 112 bytes and the proof of work is checked on hashRandomX. RandomX itself
is not available here, so the devnet puts sha256d of the first 80 bytes in that field: the layout
and the hashing clients see are the production ones, only the work function differs.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO

from bitcoin.core import CBlock, CTransaction
from bitcoin.core.serialize import VectorSerializer

from .merkle import merkle_root
from .tx import Tx, sha256d, tx_from

__all__ = [
    "ALPHA_VERSION",
    "BITCOIN_VERSION",
    "BlockError",
    "block_hash",
    "check_block",
    "compact_target",
    "make_header",
    "parse_block",
    "pow_hash",
    "serialize_block",
]

BITCOIN_VERSION = 0x20000000
RANDOMX_VERSION_BIT = 1 << 1
ALPHA_VERSION = BITCOIN_VERSION | RANDOMX_VERSION_BIT
_BASE = struct.Struct("<i32s32sIII")


class BlockError(ValueError):
    """Bytes that are not a valid block."""


def compact_target(bits: int) -> int:
    exponent, mantissa = bits >> 24, bits & 0x007FFFFF
    return mantissa >> 8 * (3 - exponent) if exponent <= 3 else mantissa << 8 * (exponent - 3)


def header_size(version: int) -> int:
    return 112 if version & RANDOMX_VERSION_BIT else 80


def make_header(version: int, prev: bytes, root: bytes, time: int, bits: int, nonce: int) -> bytes:
    base = _BASE.pack(version, prev, root, time, bits, nonce)
    return base + sha256d(base) if version & RANDOMX_VERSION_BIT else base


def pow_hash(header: bytes) -> bytes:
    """The hash held against the target: the header's own for Bitcoin, hashRandomX for Alpha."""
    return header[80:112] if len(header) == 112 else sha256d(header)


def block_hash(header: bytes) -> bytes:
    return sha256d(header)


def serialize_block(header: bytes, txs: Sequence[Tx]) -> bytes:
    count = len(txs)
    if count < 0xFD:
        prefix = bytes([count])
    elif count <= 0xFFFF:
        prefix = b"\xfd" + count.to_bytes(2, "little")
    else:
        prefix = b"\xfe" + count.to_bytes(4, "little")
    return header + prefix + b"".join(tx.raw for tx in txs)


def parse_block(raw: bytes) -> tuple[bytes, list[Tx]]:
    """The header and transactions of a serialized block."""
    try:
        (version,) = struct.unpack_from("<i", raw)
        size = header_size(version)
        if size == 80:
            vtx = CBlock.deserialize(raw).vtx
        else:
            stream = BytesIO(raw[size:])
            vtx = VectorSerializer.stream_deserialize(CTransaction, stream)
            if stream.read(1):
                raise BlockError("trailing bytes after the transactions")
    except BlockError:
        raise
    except Exception as exc:  # python-bitcoinlib raises several unrelated types on bad input
        raise BlockError(f"undecodable block: {exc}") from exc
    return raw[:size], [tx_from(ctx) for ctx in vtx]


def check_block(header: bytes, txs: Sequence[Tx]) -> None:
    """Proof of work, the RandomX stand-in and the merkle root."""
    _version, _prev, root, _time, bits, _nonce = _BASE.unpack_from(header)
    if len(header) == 112 and header[80:] != sha256d(header[:80]):
        raise BlockError("hashRandomX does not match the header")
    if int.from_bytes(pow_hash(header), "little") > compact_target(bits):
        raise BlockError("the proof of work does not meet the target")
    if not txs or merkle_root([tx.txid for tx in txs]) != root:
        raise BlockError("the merkle root does not match the transactions")
