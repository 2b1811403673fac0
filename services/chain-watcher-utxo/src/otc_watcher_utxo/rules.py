"""What the Electrum server's answers mean for the watched escrows and followed transactions: pure functions.

Hashes and txids are lowercase hex in display order (byte-reversed, as Electrum and explorers show
them). Nothing a server says is taken on trust where it can be checked: block hashes are computed
from the header bytes, a transaction must hash to the txid asked for, and a transaction is placed in
a block only by a merkle branch that leads to that block's header.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitcoin.core import CTransaction

#: Version bit 1 marks an Alpha header with a 32-byte hashRandomX after the nonce (112 bytes in all).
RANDOMX_VERSION_BIT = 1 << 1
BASE_HEADER_SIZE = 80
RANDOMX_HEADER_SIZE = 112

_TXID_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)


class MalformedChainData(ValueError):
    """The server answered with something that is not a header, history or transaction, or does not check out."""


def sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def display_hex(internal: bytes) -> str:
    return internal[::-1].hex()


def normalise_txid(text: str) -> str | None:
    """A txid as 64 lowercase hex digits; None for anything that cannot be one."""
    value = text.strip().lower()
    value = value.removeprefix("0x")
    return value if _TXID_RE.fullmatch(value) else None


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class Header:
    height: int
    hash: str
    prev_hash: str
    merkle_root: str
    time: int


def header_size(version: int) -> int:
    """The chain mixes 80-byte Bitcoin headers and 112-byte RandomX ones; the version says which."""
    return RANDOMX_HEADER_SIZE if version & RANDOMX_VERSION_BIT else BASE_HEADER_SIZE


def _header_at(raw: bytes, offset: int, height: int) -> tuple[Header, int]:
    if len(raw) - offset < BASE_HEADER_SIZE:
        raise MalformedChainData(f"header {height} is truncated")
    (version,) = struct.unpack_from("<i", raw, offset)
    size = header_size(version)
    if len(raw) - offset < size:
        raise MalformedChainData(f"header {height} is truncated")
    data = raw[offset : offset + size]
    (time,) = struct.unpack_from("<I", data, 68)
    header = Header(
        height=height,
        hash=display_hex(sha256d(data)),
        prev_hash=display_hex(data[4:36]),
        merkle_root=display_hex(data[36:68]),
        time=time,
    )
    return header, offset + size


def _hex_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedChainData(f"{what} is not hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MalformedChainData(f"{what} is not hex") from None


def parse_header(hex_text: Any, height: int) -> Header:
    raw = _hex_bytes(hex_text, f"header {height}")
    header, end = _header_at(raw, 0, height)
    if end != len(raw):
        raise MalformedChainData(f"header {height} has {len(raw) - end} bytes too many")
    return header


def parse_headers(hex_text: Any, first_height: int, count: int) -> list[Header]:
    """`count` concatenated headers from `first_height` on, each linked to the one before."""
    raw = _hex_bytes(hex_text, "headers")
    headers: list[Header] = []
    offset = 0
    for height in range(first_height, first_height + count):
        header, offset = _header_at(raw, offset, height)
        if headers and header.prev_hash != headers[-1].hash:
            raise MalformedChainData(f"header {height} does not extend header {height - 1}")
        headers.append(header)
    if offset != len(raw):
        raise MalformedChainData("headers carry trailing bytes")
    return headers


def parse_tip(raw: Any) -> Header:
    """The `{height, hex}` of blockchain.headers.subscribe (its result and its notifications)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("height"), int) or raw["height"] < 0:
        raise MalformedChainData("the tip is not {height, hex}")
    return parse_header(raw.get("hex"), raw["height"])


def parse_block_headers(raw: Any, first_height: int) -> list[Header]:
    """The answer of blockchain.block.headers."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("count"), int) or raw["count"] < 0:
        raise MalformedChainData("block.headers answered without a count")
    return parse_headers(raw.get("hex"), first_height, raw["count"])


# --------------------------------------------------------------------------- transactions


@dataclass(frozen=True)
class TxIn:
    prev_txid: str
    prev_index: int


@dataclass(frozen=True)
class TxOut:
    value: int
    script: bytes


@dataclass(frozen=True)
class Tx:
    txid: str
    inputs: tuple[TxIn, ...]
    outputs: tuple[TxOut, ...]


def parse_tx(raw_hex: Any, txid: str) -> Tx:
    """A raw transaction, refused unless it hashes to `txid` (so a server cannot swap one in)."""
    raw = _hex_bytes(raw_hex, f"transaction {txid}")
    try:
        ctx = CTransaction.deserialize(raw)
        actual = display_hex(ctx.GetTxid())
        inputs = tuple(TxIn(display_hex(bytes(i.prevout.hash)), int(i.prevout.n)) for i in ctx.vin)
        outputs = tuple(TxOut(int(o.nValue), bytes(o.scriptPubKey)) for o in ctx.vout)
    except Exception as exc:  # python-bitcoinlib raises several unrelated types on bad input
        raise MalformedChainData(f"transaction {txid} does not decode ({type(exc).__name__})") from None
    if actual != txid:
        raise MalformedChainData(f"the server answered for {txid} with transaction {actual}")
    return Tx(txid=actual, inputs=inputs, outputs=outputs)


def spends_script(tx: Tx, script: bytes, known: Mapping[str, Tx]) -> bool:
    """True when `tx` spends an output paying `script` (found among the `known` transactions)."""
    for txin in tx.inputs:
        previous = known.get(txin.prev_txid)
        if previous is None or txin.prev_index >= len(previous.outputs):
            continue
        if previous.outputs[txin.prev_index].script == script:
            return True
    return False


def deposit_outputs(tx: Tx, script: bytes, spends_escrow: bool) -> list[tuple[int, int]]:
    """(output index, satoshis) of each output of `tx` paying the escrow `script`.

    Value the escrow sends back to itself (the change of a payout, which spends the escrow's own
    coins) was counted when it first arrived and is no deposit.
    """
    if spends_escrow:
        return []
    return [(index, out.value) for index, out in enumerate(tx.outputs) if out.script == script and out.value > 0]


def fee_paid(tx: Tx, spent: Mapping[str, Tx]) -> int:
    """Inputs minus outputs, in satoshis; `spent` holds the transactions whose outputs `tx` spends."""
    total_in = 0
    for txin in tx.inputs:
        previous = spent.get(txin.prev_txid)
        if previous is None or txin.prev_index >= len(previous.outputs):
            raise MalformedChainData(f"transaction {tx.txid} spends an output that does not exist")
        total_in += previous.outputs[txin.prev_index].value
    fee = total_in - sum(out.value for out in tx.outputs)
    if fee < 0:
        raise MalformedChainData(f"transaction {tx.txid} pays out more than it spends")
    return fee


# --------------------------------------------------------------------------- histories and proofs


@dataclass(frozen=True)
class HistoryItem:
    txid: str
    #: The block height; 0 or -1 while in the mempool.
    height: int

    @property
    def mined(self) -> bool:
        return self.height > 0


def parse_history(raw: Any) -> list[HistoryItem]:
    if not isinstance(raw, list):
        raise MalformedChainData("get_history did not answer with a list")
    items = []
    for entry in raw:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("height"), int):
            raise MalformedChainData("a history entry is not {tx_hash, height}")
        txid = normalise_txid(str(entry.get("tx_hash", "")))
        if txid is None:
            raise MalformedChainData("a history entry has no valid tx_hash")
        items.append(HistoryItem(txid, entry["height"]))
    return items


def electrum_status(history: Sequence[HistoryItem]) -> str | None:
    """The protocol's status of a scripthash with this history, as the server computes it."""
    if not history:
        return None
    text = "".join(f"{item.txid}:{item.height}:" for item in history)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def merkle_root(txid: str, position: int, branch: Iterable[str]) -> str:
    node = bytes.fromhex(txid)[::-1]
    for sibling_hex in branch:
        sibling = bytes.fromhex(sibling_hex)[::-1]
        node = sha256d(sibling + node) if position & 1 else sha256d(node + sibling)
        position >>= 1
    return display_hex(node)


def proves_inclusion(raw: Any, txid: str, header: Header) -> bool:
    """Whether the answer of blockchain.transaction.get_merkle places `txid` in the block of `header`."""
    if not isinstance(raw, Mapping):
        return False
    position, branch = raw.get("pos"), raw.get("merkle")
    if not isinstance(position, int) or position < 0 or not isinstance(branch, list):
        return False
    if not all(isinstance(item, str) and len(item) == 64 for item in branch):
        return False
    try:
        return merkle_root(txid, position, branch) == header.merkle_root
    except ValueError:
        return False


# --------------------------------------------------------------------------- deposits


@dataclass(frozen=True)
class Deposit:
    """An output paying a watched escrow, in a block whose header the proof was checked against."""

    address: str
    txid: str
    index: int
    amount: int
    block: Header
