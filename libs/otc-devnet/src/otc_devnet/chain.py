"""The chain state: blocks, the UTXO set, the mempool, and the per-scripthash indexes Electrum serves.

Everything is in memory; blocks are handed to a sink (the block file) before they take effect, so
what is on disk is never behind what clients were told. Every change records the scripthashes it
touched and whether the tip moved, for the server to turn into notifications.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bitcoin.core import (
    CMutableTransaction,
    CMutableTxIn,
    CMutableTxOut,
    COutPoint,
    CTxInWitness,
    CTxWitness,
)
from bitcoin.core.script import OP_RETURN, CScript, CScriptWitness

from . import params as p
from .block import (
    ALPHA_VERSION,
    BITCOIN_VERSION,
    BlockError,
    block_hash,
    check_block,
    compact_target,
    make_header,
    parse_block,
    serialize_block,
)
from .merkle import merkle_branch, merkle_root
from .params import ChainParams, fee_rate
from .script import is_unspendable, scripthash
from .tx import MEMPOOL, Coin, Outpoint, Tx, sha256d, tx_from
from .validation import (
    Conflict,
    Rejected,
    check_fee,
    check_final,
    check_input_types,
    check_inputs,
    check_replacement,
    check_standard,
    check_transaction,
    signals_rbf,
    verify_scripts,
)

__all__ = ["Block", "BlockSink", "Chain", "ChainError", "MempoolEntry"]

GENESIS_TIME = 1_700_000_000
WITNESS_COMMITMENT_HEADER = b"\xaa\x21\xa9\xed"
WITNESS_RESERVED_VALUE = b"\x00" * 32
#: sendrawtransaction's default maxfeerate (0.10 coin per kvB) guards against fat-fingered fees.
MAX_FEE_RATE = 10_000_000
MAX_FEE_EXCEEDED = "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)"
ALREADY_IN_CHAIN = "Transaction outputs already in utxo set"


class ChainError(Exception):
    """A request the chain cannot carry out (bad reorg depth, stored blocks that do not fit...)."""


class BlockSink(Protocol):
    def append(self, raw: bytes) -> None: ...

    def truncate(self, height: int) -> None:
        """Keep the blocks below height."""


@dataclass(slots=True)
class Block:
    hash: bytes
    height: int
    header: bytes
    time: int
    txs: list[Tx]
    #: per transaction, the coins it spent, to put back when the block is disconnected
    undo: list[list[tuple[Outpoint, Coin]]]
    scripthashes: set[str]

    @property
    def hash_hex(self) -> str:
        return self.hash[::-1].hex()


@dataclass(slots=True)
class ChainTx:
    tx: Tx
    height: int
    pos: int


@dataclass(slots=True)
class MempoolEntry:
    tx: Tx
    fee: int
    #: the coins spent, in input order
    coins: tuple[Coin, ...]
    #: each output's scripthash, None for unspendable outputs
    out_scripthashes: tuple[str | None, ...]
    scripthashes: frozenset[str]
    parents: set[bytes]
    seq: int
    children: set[bytes] = field(default_factory=set)

    @property
    def electrum_height(self) -> int:
        """Electrum's mempool height: -1 while some input is itself unconfirmed, else 0."""
        return -1 if self.parents else 0


class Chain:
    def __init__(
        self,
        params: ChainParams,
        coinbase_script: bytes,
        sink: BlockSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.params = params
        self.coinbase_script = coinbase_script
        self._sink = sink
        self._clock = clock
        self.blocks: list[Block] = []
        self._by_hash: dict[bytes, int] = {}
        self.utxos: dict[Outpoint, Coin] = {}
        self._sh_utxos: dict[str, set[Outpoint]] = {}
        self._history: dict[str, list[tuple[int, int, bytes]]] = {}
        self._txs: dict[bytes, ChainTx] = {}
        self.mempool: dict[bytes, MempoolEntry] = {}
        self._spenders: dict[Outpoint, bytes] = {}
        self._mempool_by_sh: dict[str, set[bytes]] = {}
        self._seq = itertools.count()
        #: scripthashes whose status may have changed since the server last looked
        self.touched: set[str] = set()
        self.tip_changed = False

    # --- start-up -----------------------------------------------------------------------

    def load(self, raw_blocks: Iterable[bytes]) -> None:
        """Rebuild the state from stored blocks (our own, so their scripts are not re-verified)."""
        genesis_header, genesis_txs = self._genesis()
        for height, raw in enumerate(raw_blocks):
            try:
                header, txs = parse_block(raw)
                check_block(header, txs)
            except BlockError as exc:
                raise ChainError(f"stored block {height}: {exc}") from None
            if height == 0 and header != genesis_header:
                raise ChainError("the stored chain has another genesis block; use a new data directory")
            if height > 0 and header[4:36] != self.blocks[-1].hash:
                raise ChainError(f"stored block {height} does not extend block {height - 1}")
            self._connect(header, txs, raw, persist=False)
        if not self.blocks:
            self._connect(genesis_header, genesis_txs, serialize_block(genesis_header, genesis_txs), persist=True)
        self.touched.clear()
        self.tip_changed = False

    def _genesis(self) -> tuple[bytes, list[Tx]]:
        """A fixed genesis block with an 80-byte header (on Alpha, RandomX headers came later too)."""
        coinbase = tx_from(
            CMutableTransaction(
                [CMutableTxIn(COutPoint(), CScript([b"otc-devnet genesis"]))],
                [CMutableTxOut(self.params.subsidy, CScript([OP_RETURN]))],
                nVersion=1,
            )
        )
        nonce = self._solve(1, b"\x00" * 32, coinbase.txid, GENESIS_TIME)
        return make_header(1, b"\x00" * 32, coinbase.txid, GENESIS_TIME, p.POW_BITS, nonce), [coinbase]

    # --- tip ----------------------------------------------------------------------------

    @property
    def height(self) -> int:
        return len(self.blocks) - 1

    @property
    def tip(self) -> Block:
        return self.blocks[-1]

    @property
    def genesis_hash(self) -> bytes:
        return self.blocks[0].hash

    def median_time_past(self) -> int:
        times = sorted(block.time for block in self.blocks[-11:])
        return times[len(times) // 2]

    def header(self, height: int) -> bytes:
        return self.blocks[height].header

    def block_at(self, height: int) -> Block:
        return self.blocks[height]

    # --- connecting and disconnecting blocks --------------------------------------------

    def _connect(self, header: bytes, txs: list[Tx], raw: bytes, *, persist: bool) -> Block:
        if persist and self._sink is not None:
            self._sink.append(raw)
        height = len(self.blocks)
        record = Block(
            hash=block_hash(header),
            height=height,
            header=header,
            time=struct.unpack_from("<I", header, 68)[0],
            txs=txs,
            undo=[],
            scripthashes=set(),
        )
        self.blocks.append(record)
        self._by_hash[record.hash] = height
        self.tip_changed = True
        if height == 0:
            # Like Bitcoin's, the genesis coinbase is neither spendable nor indexed.
            record.undo.append([])
            return record
        for pos, tx in enumerate(txs):
            record.undo.append(self._connect_tx(tx, height, pos, record.scripthashes))
        self.touched |= record.scripthashes
        return record

    def _connect_tx(self, tx: Tx, height: int, pos: int, block_scripthashes: set[str]) -> list[tuple[Outpoint, Coin]]:
        if tx.txid in self.mempool:
            self._remove_entry(tx.txid)
        spent: list[tuple[Outpoint, Coin]] = []
        touched: set[str] = set()
        if not tx.is_coinbase:
            for outpoint in tx.outpoints():
                # A mined double spend pushes the mempool transaction (and its descendants) out.
                rival = self._spenders.get(outpoint)
                if rival is not None:
                    self._evict({rival, *self._descendants(rival)})
                coin = self.utxos.pop(outpoint)
                self._sh_utxos[coin.scripthash].discard(outpoint)
                spent.append((outpoint, coin))
                touched.add(coin.scripthash)
        for n, out in enumerate(tx.ctx.vout):
            script = bytes(out.scriptPubKey)
            if is_unspendable(script):
                continue
            coin = Coin(out.nValue, script, scripthash(script), height, tx.is_coinbase, pos)
            self.utxos[(tx.txid, n)] = coin
            self._sh_utxos.setdefault(coin.scripthash, set()).add((tx.txid, n))
            touched.add(coin.scripthash)
        for sh in touched:
            self._history.setdefault(sh, []).append((height, pos, tx.txid))
        self._txs[tx.txid] = ChainTx(tx, height, pos)
        block_scripthashes |= touched
        return spent

    def _disconnect_tip(self) -> Block:
        record = self.blocks.pop()
        del self._by_hash[record.hash]
        for tx, spent in zip(reversed(record.txs), reversed(record.undo), strict=True):
            for n in range(len(tx.ctx.vout)):
                coin = self.utxos.pop((tx.txid, n), None)
                if coin is not None:
                    self._sh_utxos[coin.scripthash].discard((tx.txid, n))
            for outpoint, coin in spent:
                self.utxos[outpoint] = coin
                self._sh_utxos.setdefault(coin.scripthash, set()).add(outpoint)
            del self._txs[tx.txid]
        for sh in record.scripthashes:
            history = self._history[sh]
            while history and history[-1][0] == record.height:
                history.pop()
        self.touched |= record.scripthashes
        self.tip_changed = True
        return record

    # --- mining ---------------------------------------------------------------------------

    @staticmethod
    def _solve(version: int, prev: bytes, root: bytes, block_time: int) -> int:
        """The first nonce whose work hash meets the target (sha256d of the 80 bytes in both formats)."""
        target = compact_target(p.POW_BITS)
        base = struct.pack("<i32s32sII", version, prev, root, block_time, p.POW_BITS)
        for nonce in range(2**32):
            if int.from_bytes(sha256d(base + struct.pack("<I", nonce)), "little") <= target:
                return nonce
        raise ChainError("no nonce meets the target")  # unreachable at this difficulty

    def _template(self, include_mempool: bool) -> list[MempoolEntry]:
        """Mempool transactions for the next block, parents before children (the mempool's own order)."""
        if not include_mempool:
            return []
        chosen: list[MempoolEntry] = []
        taken: set[bytes] = set()
        weight = 4000  # room for the coinbase
        for txid, entry in self.mempool.items():
            if not entry.parents <= taken or weight + entry.tx.weight > p.MAX_BLOCK_WEIGHT:
                continue
            chosen.append(entry)
            taken.add(txid)
            weight += entry.tx.weight
        return chosen

    def _make_block(self, entries: Sequence[MempoolEntry], script: bytes) -> tuple[bytes, list[Tx]]:
        height = self.height + 1
        wtxids = [b"\x00" * 32] + [entry.tx.wtxid for entry in entries]
        commitment = sha256d(merkle_root(wtxids) + WITNESS_RESERVED_VALUE)
        coinbase = CMutableTransaction(
            [CMutableTxIn(COutPoint(), CScript([height, os.urandom(8)]))],
            [
                CMutableTxOut(self.params.subsidy + sum(entry.fee for entry in entries), CScript(script)),
                CMutableTxOut(0, CScript([OP_RETURN, WITNESS_COMMITMENT_HEADER + commitment])),
            ],
            nVersion=2,
            witness=CTxWitness([CTxInWitness(CScriptWitness([WITNESS_RESERVED_VALUE]))]),
        )
        txs = [tx_from(coinbase), *(entry.tx for entry in entries)]
        root = merkle_root([tx.txid for tx in txs])
        block_time = max(int(self._clock()), self.median_time_past() + 1)
        version = ALPHA_VERSION if self.params.alpha else BITCOIN_VERSION
        nonce = self._solve(version, self.tip.hash, root, block_time)
        return make_header(version, self.tip.hash, root, block_time, p.POW_BITS, nonce), txs

    def mine(self, count: int, script: bytes | None = None, include_mempool: bool = True) -> list[Block]:
        mined: list[Block] = []
        for _ in range(count):
            header, txs = self._make_block(self._template(include_mempool), script or self.coinbase_script)
            mined.append(self._connect(header, txs, serialize_block(header, txs), persist=True))
        return mined

    # --- reorgs ---------------------------------------------------------------------------

    def reorg(
        self,
        depth: int,
        drop_txids: Iterable[bytes] = (),
        include_mempool: bool = False,
        script: bytes | None = None,
    ) -> list[Block]:
        """Replace the last depth blocks with depth + 1 new ones (a longer chain, as a real reorg needs).

        Transactions of the replaced blocks go back to the mempool, except drop_txids and whatever
        spends them, which leave the chain entirely. The new blocks carry the mempool only when
        include_mempool is set, so by default the returned transactions stay unconfirmed.
        """
        if not 1 <= depth <= self.height:
            raise ChainError(f"depth must be between 1 and the chain height ({self.height})")
        replaced = [tx for block in self.blocks[-depth:] for tx in block.txs[1:]]
        drop = set(drop_txids)
        unknown = drop - {tx.txid for tx in replaced}
        if unknown:
            listed = ", ".join(sorted(txid[::-1].hex() for txid in unknown))
            raise ChainError(f"not in the last {depth} blocks: {listed}")
        waiting = [entry.tx for entry in self.mempool.values()]
        self._evict(set(self.mempool))
        for _ in range(depth):
            self._disconnect_tip()
        if self._sink is not None:
            self._sink.truncate(len(self.blocks))
        # bitcoind re-admits the disconnected transactions without fee limits, then drops whatever
        # no longer fits; here the dropped ones are simply not offered again.
        for tx in [tx for tx in replaced if tx.txid not in drop] + waiting:
            with contextlib.suppress(Rejected):
                self.accept(tx, bypass_limits=True, verify=False)
        return self.mine(depth + 1, script, include_mempool)

    # --- the mempool ----------------------------------------------------------------------

    def _coin(self, outpoint: Outpoint) -> Coin | None:
        coin = self.utxos.get(outpoint)
        if coin is not None:
            return coin
        entry = self.mempool.get(outpoint[0])
        if entry is None or outpoint[1] >= len(entry.tx.ctx.vout):
            return None
        sh = entry.out_scripthashes[outpoint[1]]
        if sh is None:
            return None
        out = entry.tx.ctx.vout[outpoint[1]]
        return Coin(out.nValue, bytes(out.scriptPubKey), sh, MEMPOOL, False)

    def _ancestors(self, parents: Iterable[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        stack = list(parents)
        while stack:
            txid = stack.pop()
            if txid not in found:
                found.add(txid)
                stack.extend(self.mempool[txid].parents)
        return found

    def _descendants(self, txid: bytes) -> set[bytes]:
        found: set[bytes] = set()
        stack = list(self.mempool[txid].children)
        while stack:
            child = stack.pop()
            if child not in found:
                found.add(child)
                stack.extend(self.mempool[child].children)
        return found

    def accept(self, tx: Tx, *, bypass_limits: bool = False, verify: bool = True) -> MempoolEntry:
        """Admit tx to the mempool or raise Rejected with bitcoind's reason.

        The same transaction again (same wtxid) is accepted as a no-op, as sendrawtransaction
        does, so a client may safely re-broadcast the bytes it stored.
        """
        existing = self.mempool.get(tx.txid)
        if existing is not None and existing.tx.wtxid == tx.wtxid:
            return existing
        if any((tx.txid, n) in self.utxos for n in range(len(tx.ctx.vout))):
            raise Rejected(ALREADY_IN_CHAIN)
        params = self.params
        check_transaction(tx, single_input=params.alpha)
        if tx.is_coinbase:
            raise Rejected("coinbase")
        check_standard(tx, params)
        check_final(tx, self.height + 1, self.median_time_past())
        if existing is not None:
            raise Rejected("txn-same-nonwitness-data-in-mempool")
        outpoints = tx.outpoints()
        direct: dict[bytes, MempoolEntry] = {}
        for outpoint in outpoints:
            spender = self._spenders.get(outpoint)
            if spender is not None and spender not in direct:
                entry = self.mempool[spender]
                if not signals_rbf(entry.tx):
                    raise Rejected("txn-mempool-conflict")
                direct[spender] = entry
        coins: list[Coin] = []
        for outpoint in outpoints:
            coin = self._coin(outpoint)
            if coin is None:
                raise Rejected("bad-txns-inputs-missingorspent")
            coins.append(coin)
        fee = check_inputs(tx, coins, self.height + 1, params.coinbase_maturity)
        check_input_types(coins)
        if not bypass_limits:
            check_fee(fee, tx.vsize, params)
        parents = {txid for txid, _n in outpoints if txid in self.mempool}
        ancestors = self._ancestors(parents)
        if not bypass_limits:
            self._check_package_limits(ancestors)
        evicted: set[bytes] = set()
        if direct:
            for txid in direct:
                evicted |= {txid, *self._descendants(txid)}
            spent_conflict = sorted(ancestors & evicted)
            if spent_conflict:
                raise Rejected(
                    "bad-txns-spends-conflicting-tx",
                    f"{tx.txid_hex} spends conflicting transaction {spent_conflict[0][::-1].hex()}",
                )
            check_replacement(
                tx,
                fee,
                [Conflict(entry.tx.txid_hex, entry.fee, entry.tx.vsize) for entry in direct.values()],
                len(evicted),
                sum(self.mempool[txid].fee for txid in evicted),
                {txin.prevout.hash for entry in direct.values() for txin in entry.tx.ctx.vin},
                self.mempool.__contains__,
                params,
            )
        if verify:
            verify_scripts(tx, coins)
        if not bypass_limits and fee_rate(fee, tx.vsize) > MAX_FEE_RATE:
            raise Rejected(MAX_FEE_EXCEEDED)
        self._evict(evicted)
        out_scripthashes = tuple(
            None if is_unspendable(bytes(out.scriptPubKey)) else scripthash(bytes(out.scriptPubKey))
            for out in tx.ctx.vout
        )
        entry = MempoolEntry(
            tx=tx,
            fee=fee,
            coins=tuple(coins),
            out_scripthashes=out_scripthashes,
            scripthashes=frozenset({coin.scripthash for coin in coins} | {sh for sh in out_scripthashes if sh}),
            parents=parents,
            seq=next(self._seq),
        )
        self._add_entry(entry)
        return entry

    def _check_package_limits(self, ancestors: set[bytes]) -> None:
        if len(ancestors) + 1 > p.ANCESTOR_LIMIT:
            raise Rejected("too-long-mempool-chain", f"too many unconfirmed ancestors [limit: {p.ANCESTOR_LIMIT}]")
        for txid in ancestors:
            if len(self._descendants(txid)) + 2 > p.DESCENDANT_LIMIT:
                raise Rejected(
                    "too-long-mempool-chain",
                    f"too many descendants for tx {txid[::-1].hex()} [limit: {p.DESCENDANT_LIMIT}]",
                )

    def _add_entry(self, entry: MempoolEntry) -> None:
        txid = entry.tx.txid
        self.mempool[txid] = entry
        for outpoint in entry.tx.outpoints():
            self._spenders[outpoint] = txid
        for parent in entry.parents:
            self.mempool[parent].children.add(txid)
        for sh in entry.scripthashes:
            self._mempool_by_sh.setdefault(sh, set()).add(txid)
        self.touched |= entry.scripthashes

    def _remove_entry(self, txid: bytes) -> None:
        """Take one transaction out; children that stay see their parent as confirmed."""
        entry = self.mempool.pop(txid)
        for outpoint in entry.tx.outpoints():
            if self._spenders.get(outpoint) == txid:
                del self._spenders[outpoint]
        for parent in entry.parents:
            if parent in self.mempool:
                self.mempool[parent].children.discard(txid)
        for child in entry.children:
            if child in self.mempool:
                self.mempool[child].parents.discard(txid)
                # Its Electrum height may go from -1 to 0.
                self.touched |= self.mempool[child].scripthashes
        for sh in entry.scripthashes:
            members = self._mempool_by_sh[sh]
            members.discard(txid)
            if not members:
                del self._mempool_by_sh[sh]
        self.touched |= entry.scripthashes

    def _evict(self, txids: set[bytes]) -> None:
        for txid in txids:
            if txid in self.mempool:
                self._remove_entry(txid)

    # --- what Electrum asks -----------------------------------------------------------------

    def confirmed_history(self, sh: str) -> list[tuple[bytes, int]]:
        return [(txid, height) for height, _pos, txid in self._history.get(sh, ())]

    def mempool_history(self, sh: str) -> list[MempoolEntry]:
        """Unconfirmed transactions touching sh: height 0 before -1, then by txid bytes (protocol 1.5 order)."""
        entries = [self.mempool[txid] for txid in self._mempool_by_sh.get(sh, ())]
        return sorted(entries, key=lambda entry: (-entry.electrum_height, entry.tx.txid))

    def status(self, sh: str) -> str | None:
        """Electrum's status: sha256 of "txid:height:" for the history in order; None without history."""
        parts = [f"{txid[::-1].hex()}:{height}:" for txid, height in self.confirmed_history(sh)]
        parts += [f"{entry.tx.txid_hex}:{entry.electrum_height}:" for entry in self.mempool_history(sh)]
        if not parts:
            return None
        return hashlib.sha256("".join(parts).encode()).hexdigest()

    def balance(self, sh: str) -> tuple[int, int]:
        confirmed = sum(self.utxos[outpoint].value for outpoint in self._sh_utxos.get(sh, ()))
        unconfirmed = 0
        for txid in self._mempool_by_sh.get(sh, ()):
            entry = self.mempool[txid]
            unconfirmed += sum(
                out.nValue
                for out, out_sh in zip(entry.tx.ctx.vout, entry.out_scripthashes, strict=True)
                if out_sh == sh
            )
            unconfirmed -= sum(coin.value for coin in entry.coins if coin.scripthash == sh)
        return confirmed, unconfirmed

    def unspent(self, sh: str) -> list[tuple[Outpoint, Coin]]:
        """Outputs to sh not spent in the mempool: confirmed ones in blockchain order, then unconfirmed."""
        confirmed = [
            (outpoint, self.utxos[outpoint])
            for outpoint in self._sh_utxos.get(sh, ())
            if outpoint not in self._spenders
        ]
        confirmed.sort(key=lambda item: (item[1].height, item[1].tx_pos, item[0][1]))
        unconfirmed: list[tuple[Outpoint, Coin]] = []
        entries = sorted((self.mempool[txid] for txid in self._mempool_by_sh.get(sh, ())), key=lambda e: e.seq)
        for entry in entries:
            for n, out_sh in enumerate(entry.out_scripthashes):
                outpoint = (entry.tx.txid, n)
                if out_sh == sh and outpoint not in self._spenders:
                    coin = self._coin(outpoint)
                    assert coin is not None
                    unconfirmed.append((outpoint, coin))
        return confirmed + unconfirmed

    def find_tx(self, txid: bytes) -> tuple[Tx, Block | None]:
        """A transaction of the chain or the mempool, with its block; KeyError if neither has it."""
        confirmed = self._txs.get(txid)
        if confirmed is not None:
            return confirmed.tx, self.blocks[confirmed.height]
        return self.mempool[txid].tx, None

    def tx_merkle(self, txid: bytes, height: int) -> tuple[int, list[bytes]]:
        """Position and merkle branch of txid in the block at height; LookupError when it is not there."""
        if not 0 <= height <= self.height:
            raise LookupError(f"No transaction matching the requested hash found at height {height}")
        txids = [tx.txid for tx in self.blocks[height].txs]
        try:
            pos = txids.index(txid)
        except ValueError:
            raise LookupError(f"No transaction matching the requested hash found at height {height}") from None
        return pos, merkle_branch(txids, pos)

    def header_merkle(self, height: int, cp_height: int) -> tuple[list[bytes], bytes]:
        """Branch and root proving the header at height is among the headers up to cp_height."""
        hashes = [block.hash for block in self.blocks[: cp_height + 1]]
        return merkle_branch(hashes, height), merkle_root(hashes)

    def fee_histogram(self) -> list[tuple[int, int]]:
        by_rate: dict[int, int] = {}
        for entry in self.mempool.values():
            rate = entry.fee // entry.tx.vsize
            by_rate[rate] = by_rate.get(rate, 0) + entry.tx.vsize
        return sorted(by_rate.items(), reverse=True)

    def take_changes(self) -> tuple[set[str], bool]:
        """The scripthashes touched and whether the tip moved since the last call."""
        touched, tip_changed = self.touched, self.tip_changed
        self.touched, self.tip_changed = set(), False
        return touched, tip_changed
