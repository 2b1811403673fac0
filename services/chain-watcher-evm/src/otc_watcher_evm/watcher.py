"""The I/O shell: follows the chain block by block and records what the rules find.

Each step reads the state, asks the node, and then, in one transaction that first checks the
state is unchanged (`store.claim_head`), records its result together with the events it causes.
A step whose view went stale (another replica moved on) is dropped and redone from the new state,
so a SIGKILL or a rival replica between any two lines loses nothing and publishes nothing twice.

What a block step reads (the watch set, the balance baselines, the open follows) is kept in memory
between blocks (`View`) and brought in step with what each block commits; it is read again whenever
the stored head's version or the count of others' changes (`feed`) differs from the copy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from otc_common import chainwatch, subjects, watchset
from otc_common import metrics as common_metrics
from otc_common.addresses import evm_checksum_address
from otc_common.bus import Bus, emit, emitted_together
from otc_common.db import DATABASE_TRANSIENT, Connection, Pool
from otc_common.evm_rpc import RpcFailure
from otc_common.messages import (
    ChainReorg,
    ChainTip,
    DepositObserved,
    UnregisteredTokenDeposit,
    stable_event_id,
)
from otc_common.registry import Chain
from otc_common.runtime import Loop
from otc_watcher_evm import metrics, rules, store
from otc_watcher_evm.heads import HeadSubscription
from otc_watcher_evm.rpc import EvmRpc
from otc_watcher_evm.rules import Baseline, Block, Followed, Found, Receipt
from otc_watcher_evm.store import Feed, Head, StoredBlock

log = logging.getLogger("otc.watcher.evm")

ZERO_HASH = "0x" + "0" * 64
#: Escrows re-checked, and followed transactions looked up, per step.
BATCH = 1000
BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
#: How long a start waits for the watch set to catch up with the deal events it missed.
WATCH_SET_CATCH_UP_SECONDS = 10.0
ASIDE_RETRY_SECONDS = 2.0
#: Before balances that found something are read again (see `Watcher._read_again`).
READ_AGAIN_PAUSE_SECONDS = 0.05
#: How far a chain's block times and the engine's clock may disagree: an escrow assigned at T is looked
#: at from the first block stamped T minus this (see `Watcher._before_window`).
ASSIGNMENT_CLOCK_SKEW_SECONDS = 120.0
#: Blocks per log query when looking back before the window (nodes cap the range of one query).
LOG_RANGE_BLOCKS = 2000


@dataclass
class View:
    """What a block step reads, as of one stored `head` and `feed` (`store.head_and_feed`)."""

    head: Head | None
    feed: Feed
    #: Lowercase address → the address as assigned.
    watched: dict[str, str]
    #: Lowercase address → balance baseline, for watched escrows already re-checked.
    baselines: dict[str, Baseline]
    #: Open followed transactions by txid.
    follows: dict[str, Followed]
    #: The baselines' addresses in the order the balance call reads them.
    known: list[str]
    #: The head block's balance read (`rules.balance_words` of `known`) while every baseline equals it.
    settled: bytes | None = None

    def current(self, head: Head | None, feed: Feed) -> bool:
        return head == self.head and feed == self.feed

    def caught_up(self, head: Head, feed: Feed, written: Mapping[str, Baseline], follows: dict[str, Followed]) -> None:
        """Takes in what others wrote since `self.head` (the watch set itself is as it was)."""
        self.head = head
        self.feed = feed
        fresh = written.keys() - self.baselines.keys()
        self.baselines.update(written)
        if fresh:
            self.known = sorted(self.baselines)
        self.follows = follows
        self.settled = None

    def after_block(
        self,
        head: Head,
        baselines: Mapping[str, Baseline],
        follows: dict[str, Followed],
        done: Iterable[Followed],
        words: bytes | None,
    ) -> None:
        """Applies what the block step committed: `set_baselines`, `mark_mined` and `mark_done`.

        `words` is the block's balance read, None if it was carried forward: a judged read leaves every
        baseline equal to it, a carried one leaves some with deposits or spending still to account for.
        """
        self.head = head
        self.baselines.update(baselines)
        self.settled = words
        for item in done:
            follows.pop(item.txid, None)
            for txid in [
                other.txid
                for other in follows.values()
                if other.transfer_id == item.transfer_id and other.block_hash is None
            ]:
                del follows[txid]
        self.follows = follows


class Watcher:
    def __init__(
        self,
        chain: Chain,
        pool: Pool,
        bus: Bus,
        rpc: EvmRpc,
        poll_interval: float,
        heads_url: str | None = None,
    ) -> None:
        self.chain = chain
        self.id = chain.id
        self.pool = pool
        self.bus = bus
        self.rpc = rpc
        self.poll_interval = poll_interval
        self.native = chain.native_asset.symbol
        self.tokens = {
            asset.contract.lower(): symbol for symbol, asset in chain.assets.items() if asset.contract is not None
        }
        self.stop_at = rules.stop_at(chain.confirmations)
        self.heads_url = heads_url
        self._aside_after: dict[str, float] = {}
        self._deferring = False
        self._view: View | None = None
        #: Per part of the feed, the count at which nothing was left to look up or to re-check.
        self._settled = Feed(watch_set=-1, followed=-1)
        #: Set when the node announces a new head: the idle wait ends early.
        self._woken = asyncio.Event()

    # ----------------------------------------------------------------- loop

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Connection]:
        """Reads that see one consistent state of the tables."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn

    def wake(self) -> None:
        self._woken.set()

    async def run(self, loop: Loop) -> None:
        self.rpc.on_answer = loop.beat
        heads: asyncio.Task[None] | None = None
        metrics.HEAD_SUBSCRIPTION_UP.labels(self.id).set(0)
        if self.heads_url is not None:
            subscription = HeadSubscription(self.id, self.heads_url, self.wake, self.rpc.timeout.total or 10.0)
            heads = asyncio.create_task(subscription.run(), name=f"new-heads:{self.id}")
        try:
            await self._follow(loop)
        finally:
            if heads is not None:
                heads.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heads

    async def _follow(self, loop: Loop) -> None:
        durable = watchset.consumer_spec("evm", self.id).durable
        await chainwatch.await_consumer(self.bus, "DEALS", durable, loop.beat, WATCH_SET_CATCH_UP_SECONDS)
        failures = 0
        while True:
            loop.beat()
            # Cleared before the step looks for a block: a head announced while it runs is not missed.
            self._woken.clear()
            try:
                progressed = await self.step()
                failures = 0
            except RpcFailure as exc:
                delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                failures += 1
                log.warning("chain rpc failed: %s; retrying in %ss", exc, delay, extra={"chain": self.id})
                await asyncio.sleep(delay)
                continue
            except DATABASE_TRANSIENT as exc:
                # A commit whose answer was lost may have happened: read everything again.
                self._view = None
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
            if not progressed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), self.poll_interval)

    async def step(self) -> bool:
        """One round: look up new follows, re-check new escrows, take the next block. True if it moved."""
        async with self.pool.acquire() as conn:
            head, feed = await store.head_and_feed(conn)
            # Work besides the blocks comes only from others' changes, which the feed counts.
            started = head is not None
            follows_pending = started and feed.followed != self._settled.followed and await store.follows_pending(conn)
            escrows_pending = (
                started and feed.watch_set != self._settled.watch_set and await store.escrows_pending(conn)
            )
        if head is None:
            return await self._first_block(feed)
        if follows_pending:
            await self._aside("looking up followed transactions", self._look_up_follows)
        if escrows_pending:
            await self._aside("re-checking new escrows", self._recheck_new_escrows)
        # Settled only once a look shows nothing left: work done just now is looked for again next step.
        self._settled = Feed(
            watch_set=self._settled.watch_set if escrows_pending else feed.watch_set,
            followed=self._settled.followed if follows_pending else feed.followed,
        )
        if follows_pending or escrows_pending:
            async with self.pool.acquire() as conn:
                head, feed = await store.head_and_feed(conn)
            if head is None:
                return False
        return await self._next_block(head, feed)

    async def _aside(self, what: str, work: Callable[[], Awaitable[None]]) -> None:
        """Work besides the next block: its failure is retried later and never holds the chain up."""
        if time.monotonic() < self._aside_after.get(what, 0.0):
            return
        try:
            await work()
        except RpcFailure as exc:
            self._aside_after[what] = time.monotonic() + ASIDE_RETRY_SECONDS
            log.warning("%s deferred: %s", what, exc, extra={"chain": self.id})

    async def _read_again(self, block: Block, first: Mapping[str, int], addresses: list[str]) -> None:
        """Findings count only if a second read of the same block, a moment later, agrees with the first.

        A node that is in the middle of adding its next block may answer for an older block with the
        new block's state (anvil does, for the block that is its head until then): such a read would
        credit the next block's deposits to this one, or count them twice."""
        await asyncio.sleep(READ_AGAIN_PAUSE_SECONDS)
        again = await self.rpc.balances(sorted(addresses), block.hash)
        if any(again[address] != first[address] for address in addresses):
            raise RpcFailure(f"balances of block {block.number} changed between two reads; reading again")

    async def _measure(self, addresses: list[str], block: Block) -> dict[str, int] | None:
        """Balances at the end of `block`; None when the node no longer serves that old state."""
        words = await self._measure_words(addresses, block)
        return None if words is None else rules.balances_from_words(addresses, words)

    async def _measure_words(self, addresses: list[str], block: Block) -> bytes | None:
        """The same as the reader's undecoded words (`rules.balance_words`)."""
        try:
            words = await self.rpc.balance_words(addresses, block.hash)
        except RpcFailure:
            # The same call at the tip tells an old block's missing state from a failing node.
            await self.rpc.balance_words(addresses, None)
            metrics.BALANCE_DEFERRED.labels(self.id).inc()
            if not self._deferring:
                log.warning(
                    "the node no longer serves the state of old blocks; balance checks are carried forward",
                    extra={"chain": self.id, "height": block.number},
                )
            self._deferring = True
            return None
        if self._deferring:
            log.info("balance checks resumed", extra={"chain": self.id, "height": block.number})
        self._deferring = False
        return words

    # ----------------------------------------------------------------- blocks

    async def _view_of(self, head: Head | None, feed: Feed) -> View:
        """The in-memory copy, read again in part or in whole if the tables moved on since."""
        view = self._view
        if view is not None and view.current(head, feed):
            return view
        if (
            view is not None
            and view.head is not None
            and feed.watch_set == view.feed.watch_set
            and await self._catch_up(view)
        ):
            return view
        self._view = None  # the stale copy's memory goes before the new one is read
        metrics.STATE_RELOADS.labels(self.id, "all").inc()
        async with self._snapshot() as conn:
            head, feed = await store.head_and_feed(conn)
            watched = await store.watched(conn)
            baselines = await store.baselines(conn)
            follows = await store.open_follows(conn)
        self._view = View(head, feed, watched, baselines, follows, sorted(baselines))
        return self._view

    async def _catch_up(self, view: View) -> bool:
        """Reads only what others wrote since the copy's head, when the watch set stayed as it was.

        Whoever writes baselines claims the head (another replica's block, a re-check, a rescan), so
        they carry the version it claimed; the open follows are few and read whole. False when the
        watch set changed after all, or the head went back: then everything is read again.
        """
        assert view.head is not None
        async with self._snapshot() as conn:
            head, feed = await store.head_and_feed(conn)
            if head is None or feed.watch_set != view.feed.watch_set or head.version < view.head.version:
                return False
            written = await store.baselines_written_since(conn, view.head.version)
            follows = await store.open_follows(conn)
        metrics.STATE_RELOADS.labels(self.id, "changes").inc()
        view.caught_up(head, feed, written, follows)
        return True

    async def _first_block(self, feed: Feed) -> bool:
        number = await self.rpc.block_number()
        block = await self.rpc.block(number, full=True)
        if block is None:
            return False
        view = await self._view_of(None, feed)
        if view.head is not None:
            return True  # another replica took the first block meanwhile: follow on from its head
        log.info("first start: following from the current tip", extra={"chain": self.id, "height": number})
        await self._process(block, view)
        return True

    async def _next_block(self, head: Head, feed: Feed) -> bool:
        cpu, wall = time.process_time(), time.perf_counter()
        view = await self._view_of(head, feed)
        if view.head is None:
            return False  # the head row is new or gone since it was read: the next step starts over
        block = await self.rpc.block(view.head.number + 1, full=True)
        if block is None:
            metrics.IDLE_POLLS.labels(self.id).inc()
            return False
        if block.parent_hash != view.head.hash:
            await self._reorg(view.head, block)
            return True
        await self._process(block, view, cpu, wall)
        return True

    async def _process(self, block: Block, view: View, cpu: float | None = None, wall: float | None = None) -> None:
        cpu = time.process_time() if cpu is None else cpu
        wall = time.perf_counter() if wall is None else wall
        watched, previous, follows = view.watched, view.baselines, view.follows
        logs = await self.rpc.logs_in_block(block.hash)
        if any(entry.block_hash != block.hash for entry in logs):
            raise RpcFailure(f"logs of block {block.number} came from another block (reorg under way)")
        words = await self._measure_words(view.known, block) if view.known else b""
        ours = [tx for tx in block.txs if tx.hash in follows]
        receipts: dict[str, Receipt] = {}
        for tx, receipt in zip(
            ours, await self.rpc.receipts([tx.hash for tx in ours], [tx.gas_price for tx in ours]), strict=True
        ):
            if receipt is None or receipt.block_hash != block.hash:
                raise RpcFailure(f"receipt of {tx.hash} is not in block {block.number} (reorg under way)")
            receipts[tx.hash] = receipt

        native = rules.native_deposits(block, watched, self.native)
        tokens = rules.token_deposits(logs, watched, self.tokens)
        direct = rules.sum_by_address(native)
        outflows = {a: spent for a, spent in rules.known_outflows(block, receipts).items() if a in watched}
        measured = None if words is None else rules.balances_to_judge(view.known, words, view.settled, direct, outflows)
        verdict = rules.judge_balances(previous, measured, direct, outflows)
        if measured is not None and (verdict.credits or verdict.shortfalls):
            await self._read_again(block, measured, [*verdict.credits, *verdict.shortfalls])
        # What the judgement saw, for the log of an alert (the view's baselines move on at commit).
        short_of = {a: (previous[a], None if measured is None else measured.get(a)) for a in verdict.shortfalls}
        internal = [
            Found(
                address=address,
                txid=rules.internal_txid(block.hash, address),
                index=rules.INTERNAL_INDEX,
                amount=amount,
                asset=self.native,
            )
            for address, amount in sorted(verdict.credits.items())
        ]
        mined = {
            txid: Followed(
                txid=txid,
                transfer_id=follows[txid].transfer_id,
                block_number=block.number,
                block_hash=block.hash,
                success=receipt.success,
                fee_paid=receipt.fee_paid,
            )
            for txid, receipt in receipts.items()
        }
        open_follows = {**follows, **mined}
        confirmations = rules.confirmations_at(open_follows.values(), block.number)
        done = [item for item, count in confirmations if count >= self.stop_at]

        async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
            if not await store.claim_head(conn, view.head):
                return  # another writer moved on: the next step catches up with what it wrote
            reorgs = await chainwatch.reorgs_followed(conn)
            await store.insert_block(conn, block)
            published = 0
            for found in [*native, *tokens, *internal]:
                published += await self._publish(conn, block, found, watched[found.address], reorgs)
            for item in mined.values():
                assert item.block_number is not None and item.block_hash is not None
                await store.mark_mined(conn, item.txid, item.block_number, item.block_hash, item.success, item.fee_paid)
            # Block by block, up to the threshold; a look-up's first report goes out whatever its count.
            await self._confirmations(conn, confirmations, self.chain.confirmations)
            await store.set_baselines(conn, {watched[a]: b for a, b in verdict.baselines.items()})
            await chainwatch.emit_tip(
                conn, ChainTip(chain=self.id, height=block.number, hash=block.hash, time=block.time, reorgs=reorgs)
            )
            await store.prune(conn, block.number - self.chain.reorg_window + 1)
            new_head = await store.set_head(conn, block.number, block.hash)
            matured = await store.confirm_deposits(conn, block.number - self.chain.confirmations + 1)
        view.after_block(new_head, verdict.baselines, open_follows, done, words)

        metrics.BLOCKS.labels(self.id).inc()
        metrics.HEIGHT.labels(self.id).set(block.number)
        metrics.WATCHED.labels(self.id).set(len(watched))
        metrics.FOLLOWED.labels(self.id).set(len(view.follows))
        metrics.BLOCK_CPU.labels(self.id).observe(time.process_time() - cpu)
        metrics.BLOCK_SECONDS.labels(self.id).observe(time.perf_counter() - wall)
        for waited in matured:
            common_metrics.DEPOSIT_CONFIRMATION.labels(self.id).observe(waited)
        for address, missing in verdict.shortfalls.items():
            baseline, balance = short_of[address]
            log.error(
                "balance below what its deposits explain",
                extra={
                    "chain": self.id,
                    "address": watched[address],
                    "height": block.number,
                    "baseline": baseline.balance,
                    "direct_since": baseline.direct_since,
                    "spent_since": baseline.spent_since,
                    "measured": balance,
                    "arrived": direct.get(address, 0),
                    "head_version": view.head.version if view.head else None,
                },
            )
            await self.bus.raise_alert(
                "balance_below_deposits",
                f"{watched[address]} on {self.id} holds {missing} wei less than its deposits in block "
                f"{block.number} explain",
                chain=self.id,
            )
        if published:
            log.debug("block processed", extra={"chain": self.id, "height": block.number, "published": published})

    async def _publish(self, conn: Connection, block: Block, found: Found, address: str, reorgs: int) -> int:
        """Records and emits one deposit unless it was already published for this block (`reorgs`: see
        `chainwatch.reorgs_followed`)."""
        if not await store.record_published(conn, found, address, block):
            return 0
        if found.asset is not None:
            await chainwatch.emit_deposit(
                conn,
                DepositObserved(
                    chain=self.id,
                    address=address,
                    asset=found.asset,
                    txid=found.txid,
                    index=found.index,
                    amount=found.amount,
                    block_number=block.number,
                    block_hash=block.hash,
                    block_time=block.time,
                    reorgs=reorgs,
                ),
            )
            kind = {rules.NATIVE_INDEX: "native", rules.INTERNAL_INDEX: "internal"}.get(found.index, "token")
            metrics.DEPOSITS.labels(self.id, kind).inc()
            log.info(
                "deposit observed",
                extra={
                    "chain": self.id,
                    "address": address,
                    "asset": found.asset,
                    "amount": found.amount,
                    "txid": found.txid,
                    "height": block.number,
                },
            )
            return 1
        assert found.contract is not None
        contract = evm_checksum_address(found.contract)
        await emit(
            conn,
            subjects.chain_event(self.id, "token_ignored"),
            UnregisteredTokenDeposit(
                chain=self.id,
                address=address,
                contract=contract,
                txid=found.txid,
                index=found.index,
                amount=found.amount,
                block_number=block.number,
            ),
            event_id=stable_event_id(self.id, "token_ignored", found.txid, found.index, block.hash),
        )
        log.warning(
            "unregistered token arrived at an escrow; not counted",
            extra={"chain": self.id, "address": address, "contract": contract, "amount": found.amount},
        )
        return 1

    async def _confirmations(
        self, conn: Connection, updates: Iterable[tuple[Followed, int]], threshold: int | None = None
    ) -> None:
        for item, count in updates:
            await chainwatch.emit_confirmation(conn, self.id, item, count, threshold)
            if count >= self.stop_at:
                await store.mark_done(conn, item)

    # ----------------------------------------------------------------- reorgs

    async def _reorg(self, head: Head, new_block: Block) -> None:
        """Walks back to the common ancestor, reports what was removed, and rewinds to it."""
        async with self._snapshot() as conn:
            stored = await store.window(conn)
            previous = await store.baselines(conn)

        async def remote_block(number: int) -> Block:
            remote = await self.rpc.block(number, full=False)
            if remote is None:
                raise RpcFailure(f"block {number} vanished while looking for the common ancestor")
            return remote

        ancestor = await chainwatch.find_common_ancestor(
            [(row.number, row.hash) for row in stored], remote_block, lambda block: block.hash
        )
        deep = ancestor is None
        if ancestor is None:
            lowest = stored[0].number if stored else head.number
            ancestor = await self.rpc.block(max(lowest - 1, 0), full=False)
            if ancestor is None:
                raise RpcFailure("the block below the reorg window is missing")
        depth = head.number - ancestor.number
        if depth <= 0:
            return  # the node changed its mind again; the next step sees a consistent chain
        rewound = await self._measure(sorted(previous), ancestor) if previous else {}
        if rewound is None:
            # Without the ancestor's state the baselines cannot be rewound: re-measure without judging.
            baselines = {a: Baseline(b.balance, b.direct_since, None) for a, b in previous.items()}
        else:
            baselines = {a: Baseline(balance) for a, balance in rewound.items()}
        removed = [row for row in stored if row.number > ancestor.number]
        removed_hashes = [row.hash for row in removed]

        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.claim_head(conn, head):
                return
            watched = await store.watched(conn)
            await chainwatch.emit_reorg(
                conn,
                ChainReorg(
                    chain=self.id,
                    ancestor_height=ancestor.number,
                    ancestor_hash=ancestor.hash,
                    depth=depth,
                    removed_hashes=removed_hashes,
                    new_tip_height=new_block.number,
                    new_tip_hash=new_block.hash,
                    sequence=await chainwatch.count_reorg(conn),
                ),
            )
            for item in await store.unmine(conn, removed_hashes):
                await chainwatch.emit_unmined(conn, self.id, item)
            await store.forget_above(conn, ancestor.number)
            if deep:
                await store.insert_block(conn, ancestor)
            await store.set_baselines(conn, {watched[a]: b for a, b in baselines.items() if a in watched})
            await store.set_head(conn, ancestor.number, ancestor.hash)
        self._view = None  # rare, and much of it rewritten: read it all again

        metrics.REORGS.labels(self.id).inc()
        log.warning(
            "reorg: blocks replaced",
            extra={"chain": self.id, "ancestor": ancestor.number, "depth": depth, "new_tip": new_block.number},
        )
        if rewound is None:
            await self.bus.raise_alert(
                "balances_not_rewound",
                f"{self.id}: the node no longer serves the state of block {ancestor.number}; internal transfers "
                f"into escrows in the re-scanned blocks may go unnoticed",
                chain=self.id,
            )
        if deep:
            await self.bus.raise_alert(
                "reorg_beyond_window",
                f"{self.id}: no common ancestor within the last {len(stored)} blocks; rewound to {ancestor.number}",
                chain=self.id,
            )

    # ----------------------------------------------------------------- followed transactions

    async def _look_up_follows(self) -> None:
        """A followed transaction may have been mined before the watcher heard of it."""
        async with self._snapshot() as conn:
            head = await store.head(conn)
            txids = await store.unchecked_follows(conn, BATCH)
            follows = await store.open_follows(conn)
            hashes = {row.number: row.hash for row in await store.window(conn)}
        assert head is not None
        receipts = dict(zip(txids, await self.rpc.receipts(txids), strict=True))
        checked: list[str] = []
        updates: list[tuple[Followed, int]] = []
        for txid, receipt in receipts.items():
            if receipt is None or receipt.block_number > head.number:
                checked.append(txid)  # the block scan finds it when it is mined
                continue
            ours = hashes.get(receipt.block_number)
            if ours is not None and ours != receipt.block_hash:
                continue  # the node is on another branch; after the reorg step it is looked up again
            item = Followed(
                txid=txid,
                transfer_id=follows[txid].transfer_id,
                block_number=receipt.block_number,
                block_hash=receipt.block_hash,
                success=receipt.success,
                fee_paid=receipt.fee_paid,
            )
            updates.append((item, head.number - receipt.block_number + 1))
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.claim_head(conn, head):
                return
            await store.mark_checked(conn, checked)
            for item, _ in updates:
                assert item.block_number is not None and item.block_hash is not None
                await store.mark_mined(conn, item.txid, item.block_number, item.block_hash, item.success, item.fee_paid)
            await self._confirmations(conn, updates)
            await store.bump_version(conn)

    # ----------------------------------------------------------------- newly watched escrows

    async def _recheck_new_escrows(self) -> None:
        """Looks for what reached newly watched escrows before they were watched.

        Within the window the block scan may have passed them by; before it, when the watch set learned
        of an escrow only after the window had moved past its assignment (a watcher that was down or
        behind on deal events), deposits are looked for back to the assignment (`_before_window`).
        Deposits the block scan already published are recorded, so they are not published again, and
        a native rise is split into direct deposits and an internal credit only for the part they do
        not explain.
        """
        async with self._snapshot() as conn:
            head = await store.head(conn)
            fresh = await store.unchecked_escrows(conn, BATCH)
            stored = await store.window(conn)
        assert head is not None
        if not fresh:
            async with self.pool.acquire() as conn, conn.transaction():
                if await store.claim_head(conn, head):
                    await store.drop_unwatched_balances(conn)
            return
        canonical = {escrow.address.lower(): escrow.address for escrow in fresh}
        addresses = sorted(canonical)
        by_number = {row.number: row for row in stored}
        scan = [row for row in stored if row.number <= head.number]
        if scan and scan[0].parent_hash == ZERO_HASH:
            base_hash, scan = scan[0].hash, scan[1:]  # genesis has no parent state to compare with
        else:
            base_hash = scan[0].parent_hash if scan else head.hash
        at_head = await self.rpc.balances(addresses, head.hash)
        at_base = await self.rpc.balances(addresses, base_hash)
        logs = await self.rpc.transfers_to(scan[0].number, head.number, addresses) if scan else []
        for entry in logs:
            row = by_number.get(entry.block_number)
            if row is None or row.hash != entry.block_hash:
                return  # another branch; the block step handles the reorg first
        earlier = await self._before_window(fresh, at_base, scan[0] if scan else None)
        if earlier is None:
            return
        async with self.pool.acquire() as conn:
            had_native = await store.addresses_with_published(conn, [e.address for e in fresh], self.native)
        moved = [a for a in addresses if at_head[a] != at_base[a] or canonical[a] in had_native]
        natives: list[tuple[Block, Found]] = []
        if moved and scan:
            natives_or_none = await self._attribute(moved, at_base, scan, (head.hash, at_head))
            if natives_or_none is None:
                return
            natives = natives_or_none
        tokens = [
            (by_number[found_log.block_number].as_block(), found)
            for found_log in logs
            for found in rules.token_deposits([found_log], canonical, self.tokens)
        ]
        # The head's state read while the node was adding the next block may be that block's (see `_read_again`).
        await asyncio.sleep(READ_AGAIN_PAUSE_SECONDS)
        if await self.rpc.balances(addresses, head.hash) != at_head:
            return  # read again in the next step

        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.claim_head(conn, head):
                return
            reorgs = await chainwatch.reorgs_followed(conn)
            for block, found in [*earlier, *natives, *tokens]:
                await self._publish(conn, block, found, canonical[found.address], reorgs)
            await store.set_baselines(conn, {canonical[a]: Baseline(v) for a, v in at_head.items()})
            await store.drop_unwatched_balances(conn)
            await store.bump_version(conn)
        self._view = None  # the watch set changed: read it all again
        log.info(
            "new escrows re-checked",
            extra={
                "chain": self.id,
                "height": head.number,
                "escrows": len(addresses),
                "moved": len(moved),
                "found_before_window": len(earlier),
            },
        )
        explained = rules.sum_by_address(found for _, found in earlier if found.asset == self.native)
        for address in addresses:
            unexplained = at_base[address] - explained.get(address, 0)
            if unexplained > 0:
                await self.bus.raise_alert(
                    "escrow_funded_before_window",
                    f"{canonical[address]} on {self.id} held {unexplained} wei before the last {len(scan)} blocks "
                    "that no transaction to it since its assignment explains; that amount is not attributed",
                    chain=self.id,
                )

    async def _before_window(
        self, fresh: list[store.Unchecked], at_base: Mapping[str, int], first: StoredBlock | None
    ) -> list[tuple[Block, Found]] | None:
        """Deposits into `fresh` escrows from their assignment up to the window's `first` block.

        Token transfers come from the logs; coin sent straight to an escrow from the blocks, read only for
        escrows that held coin when the window began (`at_base`). Blocks this old are deeper than any
        reorg followed, so they are taken as the node has them. None if the node changed its mind meanwhile.
        """
        assigned = [escrow.assigned_at.timestamp() for escrow in fresh if escrow.assigned_at is not None]
        if first is None or not assigned or first.time < min(assigned) - ASSIGNMENT_CLOCK_SKEW_SECONDS:
            return []
        since = await self._first_block_at(min(assigned) - ASSIGNMENT_CLOCK_SKEW_SECONDS, first.number)
        if since >= first.number:
            return []
        canonical = {escrow.address.lower(): escrow.address for escrow in fresh}
        blocks: dict[int, Block] = {}

        async def block_at(number: int, full: bool) -> Block:
            known = blocks.get(number)
            if known is not None and (known.txs or not full):
                return known
            block = await self.rpc.block(number, full=full)
            if block is None:
                raise RpcFailure(f"block {number} is missing")
            blocks[number] = block
            return block

        found: list[tuple[Block, Found]] = []
        for start in range(since, first.number, LOG_RANGE_BLOCKS):
            end = min(start + LOG_RANGE_BLOCKS, first.number) - 1
            for entry in await self.rpc.transfers_to(start, end, sorted(canonical)):
                block = await block_at(entry.block_number, full=False)
                if block.hash != entry.block_hash:
                    return None
                found += [(block, item) for item in rules.token_deposits([entry], canonical, self.tokens)]
        holding = {address for address in canonical if at_base[address] > 0}
        if holding:
            for number in range(since, first.number):
                block = await block_at(number, full=True)
                found += [(block, item) for item in rules.native_deposits(block, holding, self.native)]
        if found:
            log.warning(
                "deposits found from before the window: the watch set learned of these escrows late",
                extra={"chain": self.id, "deposits": len(found), "from_height": since, "window_from": first.number},
            )
        return found

    async def _first_block_at(self, since: float, below: int) -> int:
        """The lowest block number under `below` whose time is at or after `since`; `below` if none is."""
        low, high = 0, below
        while low < high:
            middle = (low + high) // 2
            block = await self.rpc.block(middle, full=False)
            if block is None:
                raise RpcFailure(f"block {middle} is missing")
            if block.time >= since:
                high = middle
            else:
                low = middle + 1
        return low

    async def _attribute(
        self,
        addresses: list[str],
        base: Mapping[str, int],
        scan: list[StoredBlock],
        head: tuple[str, Mapping[str, int]],
    ) -> list[tuple[Block, Found]] | None:
        """Native deposits of `addresses` block by block over the window; None if the chain moved.

        `head`: the head block's hash and the balances already read at it (read again before use)."""
        per_block: dict[str, dict[str, int]] = {}
        blocks: list[Block] = []
        before: Mapping[str, int] = base
        head_hash, at_head = head
        for row in scan:
            if row.hash == head_hash:
                after = {address: at_head[address] for address in addresses}
            else:
                after = await self.rpc.balances(addresses, row.hash)
            per_block[row.hash] = after
            if any(after[a] != before[a] for a in addresses):
                block = await self.rpc.block(row.number, full=True)
                if block is None or block.hash != row.hash:
                    return None
                blocks.append(block)
            else:
                blocks.append(row.as_block())
            before = after
        return rules.attribute_window(addresses, base, blocks, per_block, self.native)
