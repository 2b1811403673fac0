"""The I/O shell: follows the chain's headers and the histories of the watched scripthashes.

The Electrum server tells us what changed (a new tip, a scripthash whose history changed) and we
react at once: headers are processed in order, each in one transaction with the events it causes,
then the changed histories are read and what they show is checked (merkle branches against the
stored headers) and recorded. A transaction that relies on blocks first checks they are still the
stored ones, so a SIGKILL or a rival replica between any two lines loses nothing and publishes
nothing twice; after a restart or a reconnect every watched history is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from otc_common import chainwatch, watchset
from otc_common import metrics as common_metrics
from otc_common.addresses import AddressError, electrum_scripthash, utxo_script_pubkey
from otc_common.bus import Bus, emitted_together
from otc_common.db import DATABASE_TRANSIENT, Connection, Pool
from otc_common.electrum import ElectrumClient, ElectrumError, ElectrumTimeout, ElectrumUnavailable
from otc_common.messages import ChainReorg, ChainTip, DepositObserved
from otc_common.registry import Chain
from otc_common.runtime import Loop
from otc_watcher_utxo import metrics, rules, store
from otc_watcher_utxo.rules import Deposit, Header, HistoryItem, MalformedChainData, Tx
from otc_watcher_utxo.store import Head

log = logging.getLogger("otc.watcher.utxo")

HEADERS_METHOD = "blockchain.headers.subscribe"
SCRIPTHASH_METHOD = "blockchain.scripthash.subscribe"
#: The most headers the protocol hands out per blockchain.block.headers call.
MAX_HEADERS = 2016
BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
#: Without news the loop still wakes this often: liveness, and retries of what had to wait.
IDLE_SECONDS = 1.0
#: The watch set and followed transactions are re-read this often even without a notification.
RELOAD_SECONDS = 5.0
#: A followed transaction the server does not know yet is asked for again after this long.
UNKNOWN_TX_RETRY_SECONDS = 2.0
WATCH_SET_CATCH_UP_SECONDS = 10.0
TX_CACHE = 20_000
#: A marker in `dirty`: read the history whatever the notified status.
FORCE = object()


class _Stale(Exception):
    """The blocks a scan relied on were replaced while it ran; it is done again later."""


class Watcher:
    def __init__(
        self,
        chain: Chain,
        pool: Pool,
        bus: Bus,
        client: ElectrumClient,
        *,
        database_url: str,
        schema: str,
        scan_concurrency: int = 16,
    ) -> None:
        assert chain.hrp is not None
        self.chain = chain
        self.id = chain.id
        self.hrp = chain.hrp
        self.pool = pool
        self.bus = bus
        self.client = client
        self.database_url = database_url
        self.channel = schema + store.CHANGED_CHANNEL_SUFFIX
        self.native = chain.native_asset.symbol
        self.stop_at = chainwatch.stop_at(chain.confirmations)
        self.scan_slots = asyncio.Semaphore(scan_concurrency)
        self.wake = asyncio.Event()
        #: The server's tip as last told (subscription result or notification).
        self.server_tip: Header | None = None
        self.headers_subscribed = False
        self.generation = 0
        self.reload_needed = True
        self.reloaded_at = 0.0
        #: address → (scripthash, scriptPubKey); addresses are immutable, so this only grows with the watch set.
        self.scripts: dict[str, tuple[str, bytes]] = {}
        #: scripthash → escrow address, for the watch set.
        self.escrows: dict[str, str] = {}
        #: scripthash → open followed txids whose first input spends from it.
        self.follows: dict[str, set[str]] = {}
        self.unresolved: list[str] = []
        self.unresolved_retry_at = 0.0
        self.subscribed: set[str] = set()
        #: scripthash → the status it was notified with (or FORCE): its history must be read.
        self.dirty: dict[str, object] = {}
        #: Histories with something that could not be settled yet (a block not processed yet).
        self.deferred: set[str] = set()
        self.rescans: set[str] = set()
        #: The head the last scan saw; deferred histories are read again once it changes.
        self.scanned_at: Head | None = None
        #: scripthash → the status of the history last read in full; a notification of the same is no news.
        self.scanned: dict[str, str | None] = {}
        self.txs: OrderedDict[str, Tx] = OrderedDict()
        #: (scripthash, txid) of history entries that pay that escrow nothing (payouts from it).
        self.no_deposit: set[tuple[str, str]] = set()
        self.old_headers: dict[int, Header] = {}
        client.on_notification(HEADERS_METHOD, self._on_header)
        client.on_notification(SCRIPTHASH_METHOD, self._on_scripthash)
        client.on_connect(self.wake.set)

    # ----------------------------------------------------------------- notifications

    def _on_header(self, params: list[Any]) -> None:
        try:
            self.server_tip = rules.parse_tip(params[0] if params else None)
        except MalformedChainData as exc:
            log.warning("ignoring a malformed tip notification: %s", exc, extra={"chain": self.id})
            return
        self.wake.set()

    def _on_scripthash(self, params: list[Any]) -> None:
        if len(params) < 2 or not isinstance(params[0], str):
            return
        scripthash, status = params[0], params[1]
        if scripthash not in self.escrows and scripthash not in self.follows:
            return
        if scripthash in self.scanned and self.scanned[scripthash] == status and scripthash not in self.deferred:
            return
        self.dirty[scripthash] = status
        self.wake.set()

    def _on_changed(self, *_: object) -> None:
        self.reload_needed = True
        self.wake.set()

    # ----------------------------------------------------------------- loop

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Connection]:
        """Reads that see one consistent state of the tables."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn

    async def run(self, loop: Loop) -> None:
        durable = watchset.consumer_spec("utxo", self.id).durable
        await chainwatch.await_consumer(self.bus, "DEALS", durable, loop.beat, WATCH_SET_CATCH_UP_SECONDS)
        await self.client.start()
        listener = asyncio.get_running_loop().create_task(self._listen(), name="watch-set-listener")
        failures = 0
        try:
            while True:
                loop.beat()
                self.wake.clear()
                try:
                    await self.step(loop)
                    failures = 0
                except (ElectrumError, ElectrumUnavailable, ElectrumTimeout, MalformedChainData) as exc:
                    common_metrics.RPC_ERRORS.labels(self.id).inc()
                    delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                    failures += 1
                    log.warning("electrum request failed: %s; retrying in %ss", exc, delay, extra={"chain": self.id})
                    await asyncio.sleep(delay)
                    continue
                except DATABASE_TRANSIENT as exc:
                    delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                    failures += 1
                    log.warning(
                        "database failed (%s: %s); retrying in %ss",
                        type(exc).__name__,
                        exc,
                        delay,
                        extra={"chain": self.id},
                    )
                    await asyncio.sleep(delay)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), IDLE_SECONDS)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await self.client.close()

    async def _listen(self) -> None:
        """Wakes the loop when the watch set or the followed transactions change, in any replica."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.database_url)
                await conn.add_listener(self.channel, self._on_changed)
                self._on_changed()
                while not conn.is_closed():
                    await asyncio.sleep(RELOAD_SECONDS)
                    await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except DATABASE_TRANSIENT as exc:
                log.warning("change listener interrupted (%s); resuming", type(exc).__name__, extra={"chain": self.id})
                await asyncio.sleep(1.0)
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()

    async def step(self, loop: Loop) -> None:
        """One round: take in changes of the sets, follow the headers, then read what changed."""
        if not self.client.connected:
            return
        if not self.headers_subscribed:
            await self._subscribe_headers()
        if self.client.generation != self.generation:
            # A new connection: whatever happened while there was none shows in the histories.
            self.generation = self.client.generation
            self._mark(self.escrows.keys() | self.follows.keys())
        if self.reload_needed or time.monotonic() - self.reloaded_at >= RELOAD_SECONDS:
            await self._reload()
        await self._subscribe_new()
        await self._follow_headers(loop)
        await self._resolve_follows()
        await self._scan()

    async def _subscribe_headers(self) -> None:
        told = self.server_tip
        answer = await self.client.subscribe(HEADERS_METHOD)
        # A block announced right behind the answer is handed over before this coroutine resumes;
        # the answer is then the older tip and must not replace it.
        if self.server_tip is told:
            self._on_header([answer])
        self.headers_subscribed = True

    def _mark(self, scripthashes: Iterable[str]) -> None:
        for scripthash in scripthashes:
            self.dirty[scripthash] = FORCE

    # ----------------------------------------------------------------- the sets

    def _script(self, address: str) -> tuple[str, bytes] | None:
        known = self.scripts.get(address)
        if known is None:
            try:
                script = utxo_script_pubkey(address, self.hrp)
            except AddressError as exc:
                log.error("cannot watch %s: %s", address, exc, extra={"chain": self.id})
                return None
            known = self.scripts[address] = (electrum_scripthash(script), script)
        return known

    async def _reload(self) -> None:
        self.reload_needed = False
        self.reloaded_at = time.monotonic()
        async with self._snapshot() as conn:
            addresses = await store.watched(conn)
            follows = await store.open_follows(conn)
            rescans = await store.rescans(conn)
        escrows: dict[str, str] = {}
        for address in addresses:
            known = self._script(address)
            if known is not None:
                escrows[known[0]] = address
        followed: dict[str, set[str]] = {}
        for txid, follow in follows.items():
            if follow.scripthash is not None:
                followed.setdefault(follow.scripthash, set()).add(txid)
        self.escrows, self.follows = escrows, followed
        self.unresolved = sorted(txid for txid, follow in follows.items() if follow.scripthash is None)
        self.rescans = set(rescans)
        self._mark(self.rescans)
        if self.deferred:
            self._mark(self.deferred)
            self.deferred.clear()
        metrics.WATCHED.labels(self.id).set(len(escrows))
        metrics.FOLLOWED.labels(self.id).set(len(follows))

    async def _subscribe_new(self) -> None:
        wanted = self.escrows.keys() | self.follows.keys()
        for scripthash in self.subscribed - wanted:
            self.client.forget(SCRIPTHASH_METHOD, scripthash)
            self.scanned.pop(scripthash, None)
        self.subscribed &= wanted
        fresh = sorted(wanted - self.subscribed)
        if not fresh:
            return

        async def subscribe(scripthash: str) -> None:
            async with self.scan_slots:
                await self.client.subscribe(SCRIPTHASH_METHOD, scripthash)

        # Remembered by the client even if the request fails, so a reconnect sends it again.
        self.subscribed.update(fresh)
        self._mark(fresh)
        results = await asyncio.gather(*(subscribe(sh) for sh in fresh), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # ----------------------------------------------------------------- headers

    async def _headers(self, first: int, count: int) -> list[Header]:
        raw = await self.client.request("blockchain.block.headers", first, count)
        return rules.parse_block_headers(raw, first)

    async def _header_at(self, height: int) -> Header:
        cached = self.old_headers.get(height)
        if cached is None:
            cached = rules.parse_header(await self.client.request("blockchain.block.header", height), height)
            if len(self.old_headers) > 10_000:
                self.old_headers.clear()
            self.old_headers[height] = cached
        return cached

    async def _follow_headers(self, loop: Loop) -> None:
        """Processes headers up to the server's tip, walking back first where a reorg replaced blocks."""
        while True:
            loop.beat()
            tip = self.server_tip
            if tip is None:
                return
            async with self.pool.acquire() as conn:
                head = await store.head(conn)
            if head is None:
                log.info("first start: following from the current tip", extra={"chain": self.id, "height": tip.height})
                await self._process_block(tip, None)
                continue
            if tip.height > head.number:
                headers = await self._headers(head.number + 1, min(tip.height - head.number, MAX_HEADERS))
                if not headers:
                    return  # the server's tip moved back under us; its notification follows
                if headers[0].prev_hash != head.hash:
                    if not await self._reorg(head):
                        return
                    continue
                current: Head | None = head
                for header in headers:
                    loop.beat()
                    assert current is not None
                    current = await self._process_block(header, current)
                    if current is None:
                        break  # another replica moved the head; start again from it
                continue
            if tip.height == head.number and tip.hash == head.hash:
                return
            async with self.pool.acquire() as conn:
                ours = (await store.blocks_at(conn, [tip.height])).get(tip.height)
            if ours is not None and ours.hash == tip.hash:
                return  # a server behind us on the same chain: wait for it
            if not await self._reorg(head):
                return

    async def _process_block(self, header: Header, head: Head | None) -> Head | None:
        """Records one block and what it means for the followed transactions; None if the head moved meanwhile."""
        started = time.perf_counter()
        async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
            if not await store.claim_head(conn, head):
                return None
            follows = await store.open_follows(conn)
            await store.insert_block(conn, header)
            for item, count in chainwatch.confirmations_at([f.item for f in follows.values()], header.height):
                await chainwatch.emit_confirmation(conn, self.id, item, count, self.chain.confirmations)
                if count >= self.stop_at:
                    await store.mark_done(conn, item)
            reorgs = await chainwatch.reorgs_followed(conn)
            await chainwatch.emit_tip(
                conn, ChainTip(chain=self.id, height=header.height, hash=header.hash, time=header.time, reorgs=reorgs)
            )
            await store.prune(conn, header.height - self.chain.reorg_window + 1)
            await store.set_head(conn, header.height, header.hash)
            matured = await store.confirm_deposits(conn, header.height - self.chain.confirmations + 1)
        metrics.BLOCKS.labels(self.id).inc()
        metrics.HEIGHT.labels(self.id).set(header.height)
        metrics.BLOCK_SECONDS.labels(self.id).observe(time.perf_counter() - started)
        for waited in matured:
            common_metrics.DEPOSIT_CONFIRMATION.labels(self.id).observe(waited)
        return Head(header.height, header.hash, 1 if head is None else head.version + 1)

    async def _reorg(self, head: Head) -> bool:
        """Walks back to the common ancestor, reports what was removed, and rewinds to it. False if nothing changed."""
        tip = self.server_tip
        assert tip is not None
        async with self._snapshot() as conn:
            stored = await store.window(conn)
        top = min(head.number, tip.height)
        candidates = [block for block in stored if block.height <= top]
        remote: dict[int, Header] = {}
        for first in range(candidates[0].height if candidates else top + 1, top + 1, MAX_HEADERS):
            for header in await self._headers(first, min(MAX_HEADERS, top + 1 - first)):
                remote[header.height] = header

        async def fetch(number: int) -> Header:
            found = remote.get(number)
            if found is None:
                raise MalformedChainData(f"the server has no header at {number}, below its tip {tip.height}")
            return found

        ancestor = await chainwatch.find_common_ancestor(
            [(block.height, block.hash) for block in candidates], fetch, lambda header: header.hash
        )
        deep = ancestor is None
        if ancestor is None:
            lowest = stored[0].height if stored else head.number
            ancestor = await self._header_at(max(lowest - 1, 0))
        depth = head.number - ancestor.height
        if depth <= 0:
            return False
        removed_hashes = [block.hash for block in stored if block.height > ancestor.height]

        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.claim_head(conn, head):
                return True
            await chainwatch.emit_reorg(
                conn,
                ChainReorg(
                    chain=self.id,
                    ancestor_height=ancestor.height,
                    ancestor_hash=ancestor.hash,
                    depth=depth,
                    removed_hashes=removed_hashes,
                    new_tip_height=tip.height,
                    new_tip_hash=tip.hash,
                    sequence=await chainwatch.count_reorg(conn),
                ),
            )
            unmined = await store.unmine(conn, removed_hashes)
            for follow in unmined:
                await chainwatch.emit_unmined(conn, self.id, follow.item)
            paid = await store.forget_above(conn, ancestor.height)
            if deep:
                await store.insert_block(conn, ancestor)
            rescan = [known[0] for address in paid if (known := self._script(address)) is not None]
            rescan += [follow.scripthash for follow in unmined if follow.scripthash is not None]
            await store.add_rescan(conn, rescan)
            await store.set_head(conn, ancestor.height, ancestor.hash)
            await store.notify_changed(conn)
        self.rescans.update(rescan)
        self._mark(rescan)
        metrics.REORGS.labels(self.id).inc()
        log.warning(
            "reorg: blocks replaced",
            extra={"chain": self.id, "ancestor": ancestor.height, "depth": depth, "new_tip": tip.height},
        )
        if deep:
            await self.bus.raise_alert(
                "reorg_beyond_window",
                f"{self.id}: no common ancestor within the last {len(stored)} blocks; rewound to {ancestor.height}",
                chain=self.id,
            )
        return True

    # ----------------------------------------------------------------- transactions

    async def _tx(self, txid: str) -> Tx:
        cached = self.txs.get(txid)
        if cached is not None:
            self.txs.move_to_end(txid)
            return cached
        tx = rules.parse_tx(await self.client.request("blockchain.transaction.get", txid), txid)
        self.txs[txid] = tx
        if len(self.txs) > TX_CACHE:
            self.txs.popitem(last=False)
        return tx

    async def _resolve_follows(self) -> None:
        """Finds, for each newly followed transaction, the scripthash whose history will show it mined."""
        if not self.unresolved or time.monotonic() < self.unresolved_retry_at:
            return
        waiting = False
        for txid in list(self.unresolved):
            try:
                tx = await self._tx(txid)
            except ElectrumError:
                waiting = True  # not broadcast yet, or a candidate that lost to a replacement
                continue
            if not tx.inputs:
                raise MalformedChainData(f"transaction {txid} has no inputs")
            spent = {txin.prev_txid: await self._tx(txin.prev_txid) for txin in tx.inputs}
            fee = rules.fee_paid(tx, spent)
            first = tx.inputs[0]
            scripthash = electrum_scripthash(spent[first.prev_txid].outputs[first.prev_index].script)
            async with self.pool.acquire() as conn:
                await store.resolve_follow(conn, txid, scripthash, fee)
            self.unresolved.remove(txid)
            self.follows.setdefault(scripthash, set()).add(txid)
            self.dirty[scripthash] = FORCE
        if waiting:
            self.unresolved_retry_at = time.monotonic() + UNKNOWN_TX_RETRY_SECONDS
        await self._subscribe_new()

    # ----------------------------------------------------------------- histories

    async def _scan(self) -> None:
        if not self.dirty and not self.deferred:
            return
        async with self._snapshot() as conn:
            head = await store.head(conn)
            window = {block.height: block for block in await store.window(conn)}
        if head is None:
            return
        if head != self.scanned_at:
            # What waited for a block may be settled now, whichever replica processed it.
            self.scanned_at = head
            self._mark(self.deferred)
            self.deferred.clear()
        if not self.dirty:
            return
        batch, self.dirty = self.dirty, {}
        relevant = [sh for sh in batch if sh in self.escrows or sh in self.follows]
        forgotten = [sh for sh in batch if sh in self.rescans and sh not in relevant]
        if forgotten:
            # Unwatched and settled since the reorg: nothing of theirs is published any more.
            async with self.pool.acquire() as conn:
                for scripthash in forgotten:
                    await store.clear_rescan(conn, scripthash)
            self.rescans.difference_update(forgotten)
        results = await asyncio.gather(*(self._scan_one(sh, head, window) for sh in relevant), return_exceptions=True)
        failure: BaseException | None = None
        for scripthash, result in zip(relevant, results, strict=True):
            if isinstance(result, BaseException):
                self.dirty.setdefault(scripthash, FORCE)
                failure = failure or result
        # A notification that came during the scan and shows what was just read is no news.
        for scripthash, status in list(self.dirty.items()):
            if status is not FORCE and scripthash in self.scanned and self.scanned[scripthash] == status:
                del self.dirty[scripthash]
        if failure is not None:
            raise failure

    async def _block(self, height: int, window: dict[int, Header]) -> Header | None:
        """The stored header at `height`; below the window the server's (deeper than any reorg we follow)."""
        if height in window:
            return window[height]
        if window and height > min(window):
            return None
        return await self._header_at(height)

    async def _proven(self, txid: str, block: Header) -> bool:
        try:
            proof = await self.client.request("blockchain.transaction.get_merkle", txid, block.height)
        except ElectrumError:
            return False  # the server no longer has it at that height: a reorg under way
        return rules.proves_inclusion(proof, txid, block)

    async def _scan_one(self, scripthash: str, head: Head, window: dict[int, Header]) -> None:
        async with self.scan_slots:
            history = rules.parse_history(await self.client.request("blockchain.scripthash.get_history", scripthash))
            mined = [item for item in history if item.mined and item.height <= head.number]
            deferred = any(item.mined and item.height > head.number for item in history)
            deposits: list[Deposit] = []
            address = self.escrows.get(scripthash)
            if address is not None:
                found, waiting = await self._deposits(scripthash, address, history, mined, window)
                deposits, deferred = found, deferred or waiting
            hits: list[tuple[str, Header]] = []
            for item in mined:
                if item.txid not in self.follows.get(scripthash, ()):
                    continue
                block = await self._block(item.height, window)
                if block is None or not await self._proven(item.txid, block):
                    deferred = True
                    continue
                hits.append((item.txid, block))
        if deposits or hits or scripthash in self.rescans:
            try:
                await self._record(scripthash, deposits, hits, settled=not deferred)
            except _Stale:
                deferred = True
        if deferred:
            self.deferred.add(scripthash)
        else:
            self.scanned[scripthash] = rules.electrum_status(history)
            self.rescans.discard(scripthash)
        metrics.SCANS.labels(self.id).inc()

    async def _deposits(
        self,
        scripthash: str,
        address: str,
        history: Sequence[HistoryItem],
        mined: Sequence[HistoryItem],
        window: dict[int, Header],
    ) -> tuple[list[Deposit], bool]:
        """The outputs paying `address` in mined history entries not published yet; and whether some must wait."""
        script = self.scripts[address][1]
        async with self.pool.acquire() as conn:
            published = await store.published_for(conn, address)
        in_history = {item.txid for item in history}
        found: list[Deposit] = []
        waiting = False
        for item in mined:
            if (scripthash, item.txid) in self.no_deposit:
                continue
            block = await self._block(item.height, window)
            if block is None:
                waiting = True
                continue
            if (item.txid, block.hash) in published:
                continue
            tx = await self._tx(item.txid)
            # Only the escrow's own coins can tell change from a deposit, and they are all in its history.
            spent = {
                txin.prev_txid: await self._tx(txin.prev_txid) for txin in tx.inputs if txin.prev_txid in in_history
            }
            outputs = rules.deposit_outputs(tx, script, rules.spends_script(tx, script, spent))
            if not outputs:
                if len(self.no_deposit) > 100_000:
                    self.no_deposit.clear()
                self.no_deposit.add((scripthash, item.txid))
                continue
            if not await self._proven(item.txid, block):
                waiting = True
                continue
            found.extend(Deposit(address, item.txid, index, amount, block) for index, amount in outputs)
        return found, waiting

    async def _record(
        self, scripthash: str, deposits: Sequence[Deposit], hits: Sequence[tuple[str, Header]], *, settled: bool
    ) -> None:
        """Publishes what a history showed, unless the blocks it was proved against were replaced meanwhile."""
        blocks = {d.block.height: d.block for d in deposits} | {block.height: block for _, block in hits}
        published: list[Deposit] = []
        async with self.pool.acquire() as conn, conn.transaction():
            head = await store.lock_head(conn)
            assert head is not None
            current = await store.blocks_at(conn, blocks)
            lowest = await store.lowest_block(conn)
            for height, block in blocks.items():
                stored = current.get(height)
                if (stored is not None and stored.hash != block.hash) or (
                    stored is None and lowest is not None and height >= lowest
                ):
                    raise _Stale
            reorgs = await chainwatch.reorgs_followed(conn)
            for deposit in deposits:
                if await store.record_published(
                    conn, deposit.txid, deposit.index, deposit.block, deposit.address, deposit.amount
                ):
                    await chainwatch.emit_deposit(conn, self._observed(deposit, reorgs))
                    published.append(deposit)
            for txid, block in hits:
                item = await store.mark_mined(conn, txid, block)
                if item is None:
                    continue
                count = head.number - block.height + 1
                # The first report of a transaction goes out whatever its count.
                await chainwatch.emit_confirmation(conn, self.id, item, count)
                if count >= self.stop_at:
                    await store.mark_done(conn, item)
            if settled:
                await store.clear_rescan(conn, scripthash)
        for deposit in published:
            metrics.DEPOSITS.labels(self.id, "native").inc()
            log.info(
                "deposit observed",
                extra={
                    "chain": self.id,
                    "address": deposit.address,
                    "amount": deposit.amount,
                    "txid": deposit.txid,
                    "index": deposit.index,
                    "height": deposit.block.height,
                },
            )

    def _observed(self, deposit: Deposit, reorgs: int) -> DepositObserved:
        return DepositObserved(
            chain=self.id,
            address=deposit.address,
            asset=self.native,
            txid=deposit.txid,
            index=deposit.index,
            amount=deposit.amount,
            block_number=deposit.block.height,
            block_hash=deposit.block.hash,
            block_time=deposit.block.time,
            reorgs=reorgs,
        )
