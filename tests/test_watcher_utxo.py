"""The UTXO chain watcher as a real process against the Unicity devnet, NATS and PostgreSQL.

The tests feed it the way the engine and the queue processor do (EscrowAssigned, TransferSubmitted
on JetStream), drive the chain through the devnet's control methods, and read what the watcher
publishes from the CHAIN stream. The devnet runs with the production Alpha rules (112-byte headers,
one input per transaction) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import nats
import pytest
from nats.aio.msg import Msg

from otc_common import subjects
from otc_common.addresses import electrum_scripthash, utxo_script_pubkey
from otc_common.bus import Bus
from otc_common.keys import EscrowKeyring
from otc_common.messages import (
    ChainReorg,
    ChainTip,
    DepositObserved,
    EscrowAssigned,
    Message,
    Party,
    TransferSubmitted,
    TxConfirmation,
    decode_envelope,
)
from otc_common.signing_keys import account_xpub, escrow_private_key, load_seed
from tests.devnet_support import Key, Utxo, build, txid_of
from tests.support import TEST_SEED_HEX, UTXO_PATH, ServiceProcess
from tests.utxo_support import UnicityDevnet

M = TypeVar("M", bound=Message)
SCHEMA = "watcher_utxo_unicity"
CHAIN = "UNICITY"
COIN = 100_000_000
#: UNICITY's threshold in the test registry is 2: a followed tx is reported up to 2 confirmations, followed up to 4.
STOP_AT = 4
THRESHOLD = 2

# --------------------------------------------------------------------------- helpers


@dataclass
class Feed:
    """Everything published on the CHAIN stream, in stream order, with the time it arrived."""

    events: list[tuple[str, Message, float]] = field(default_factory=list)

    async def on_message(self, msg: Msg) -> None:
        envelope, message = decode_envelope(msg.data)
        self.events.append((envelope.event_id, message, time.monotonic()))

    def of(self, kind: type[M]) -> list[M]:
        return [message for _, message, _ in self.events if isinstance(message, kind)]

    def deposits(self, txid: str | None = None) -> list[DepositObserved]:
        return [d for d in self.of(DepositObserved) if txid is None or d.txid == txid]

    def arrival(self, predicate: Callable[[Message], bool]) -> float:
        return next(at for _, message, at in self.events if predicate(message))

    def confirmations(self, txid: str) -> list[int]:
        return [c.confirmations for c in self.of(TxConfirmation) if c.txid == txid]

    def tip(self) -> int:
        tips = self.of(ChainTip)
        return tips[-1].height if tips else -1

    async def wait(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not observed within {timeout}s: {what}")

    async def wait_tip(self, height: int, timeout: float = 20.0) -> None:
        await self.wait(lambda: self.tip() >= height, f"chain tip {height}", timeout)


def scripthash_of(address: str) -> str:
    return electrum_scripthash(utxo_script_pubkey(address, "alpha"))


@dataclass
class Harness:
    env: dict[str, str]
    work_dir: Path
    devnet: UnicityDevnet
    bus: Bus
    feed: Feed
    db: asyncpg.Connection
    keyring: EscrowKeyring = field(
        default_factory=lambda: EscrowKeyring(account_xpub(load_seed(TEST_SEED_HEX), UTXO_PATH), UTXO_PATH)
    )
    indexes: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def watcher(self) -> ServiceProcess:
        return ServiceProcess("watcher-utxo", ["-m", "otc_watcher_utxo", "--chain", CHAIN], self.env, self.work_dir)

    def escrow(self) -> tuple[str, int]:
        index = next(self.indexes)
        return self.keyring.utxo_address(index, "alpha"), index

    def escrow_key(self, index: int) -> Key:
        return Key(escrow_private_key(load_seed(TEST_SEED_HEX), UTXO_PATH, index))

    async def assign(self, address: str, index: int) -> None:
        await self.bus.publish(
            subjects.deal(f"deal-{index}"),
            EscrowAssigned(
                deal_id=f"deal-{index}",
                party=Party.ALICE,
                chain=CHAIN,
                asset="ALPHA",
                address=address,
                escrow_index=index,
            ),
        )

    async def new_escrow(self) -> tuple[str, int]:
        address, index = self.escrow()
        await self.assign(address, index)
        return address, index

    async def follow(self, *txids: str, transfer_id: str = "transfer-1") -> None:
        await self.bus.publish(
            subjects.queue_result(CHAIN),
            TransferSubmitted(
                transfer_id=transfer_id, deal_id="deal-x", chain=CHAIN, txid=txids[0], candidates=list(txids)
            ),
        )

    async def wait_db(self, query: str, expected: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = await self.db.fetchval(query)
            except asyncpg.UndefinedTableError:
                value = None
            if value == expected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{query} = {value!r}, expected {expected!r}")

    async def wait_watching(self, count: int) -> None:
        await self.wait_db(f"SELECT count(*) FROM {SCHEMA}.watch_set", count)

    async def wait_resolved(self, txid: str) -> None:
        """The watcher found the followed transaction on the server and knows where to look for it."""
        await self.wait_db(f"SELECT scripthash IS NOT NULL FROM {SCHEMA}.followed WHERE txid = '{txid}'", True)

    async def wait_idle(self, process: ServiceProcess, baseline: float, timeout: float = 10.0) -> None:
        """The watcher has read, and acted on, at least one more history since `baseline` scans."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await scans(process) > baseline:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the watcher did not read the changed history")

    async def fund_key(self, amount: int) -> tuple[Key, Utxo]:
        """A key of our own holding one mined coin of `amount`."""
        key = Key()
        txid = await self.devnet.faucet(key.address, amount)
        await self.devnet.mine(1)
        return key, Utxo(txid, 0, amount, key)


async def metric_values(process: ServiceProcess) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{process.url}/metrics", timeout=5)).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def scans(process: ServiceProcess) -> float:
    return (await metric_values(process)).get(f'otc_watcher_history_scans_total{{chain="{CHAIN}"}}', 0.0)


@contextlib.asynccontextmanager
async def open_harness(env: dict[str, str], work_dir: Path, devnet: UnicityDevnet) -> AsyncIterator[Harness]:
    bus = await Bus.connect(env["OTC_NATS_URL"], "test")
    await bus.provision_streams()
    feed = Feed()
    nc = await nats.connect(env["OTC_NATS_URL"])
    subscription = await nc.jetstream().subscribe("otc.chain.>", ordered_consumer=True, cb=feed.on_message)
    db = await asyncpg.connect(env["OTC_DATABASE_URL"])
    try:
        yield Harness(env, work_dir, devnet, bus, feed, db)
    finally:
        await subscription.unsubscribe()
        await nc.close()
        await bus.close()
        await db.close()


@pytest.fixture
async def harness(utxo_env: dict[str, str], unicity_devnet: UnicityDevnet, work_dir: Path) -> AsyncIterator[Harness]:
    async with open_harness(utxo_env, work_dir, unicity_devnet) as opened:
        yield opened


@pytest.fixture
async def watcher(harness: Harness) -> AsyncIterator[ServiceProcess]:
    process = harness.watcher()
    await process.start()
    # The first block it processes is the tip it found at its start.
    await harness.feed.wait_tip(await harness.devnet.height())
    try:
        yield process
    finally:
        await process.stop()


# --------------------------------------------------------------------------- deposits


@pytest.mark.parametrize("unicity_devnet", [True, False], ids=["alpha", "bitcoin"], indirect=True)
async def test_deposit_is_published_once_mined_and_not_before(
    harness: Harness, watcher: ServiceProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    devnet, feed = harness.devnet, harness.feed
    escrow, _ = await harness.new_escrow()
    await harness.wait_watching(1)
    baseline = await scans(watcher)
    txid = await devnet.faucet(escrow, 123_456_789)
    await harness.wait_idle(watcher, baseline)
    assert feed.deposits() == [], "a deposit in the mempool is not published"

    [block_hash] = await devnet.mine(1)
    mined_at = time.monotonic()
    await feed.wait(lambda: bool(feed.deposits(txid)), "the deposit")
    latency = feed.arrival(lambda m: isinstance(m, DepositObserved)) - mined_at
    verbose = await devnet.tx(txid)
    height = await devnet.tx_height(txid, scripthash_of(escrow))
    [deposit] = feed.deposits()
    assert (deposit.chain, deposit.address, deposit.asset) == (CHAIN, escrow, "ALPHA")
    assert (deposit.txid, deposit.index, deposit.amount) == (txid, 0, 123_456_789)
    assert deposit.block_number == height == await devnet.height()
    assert deposit.block_hash == verbose["blockhash"] == block_hash
    assert deposit.block_time == verbose["blocktime"]
    await feed.wait_tip(height)
    [tip] = [t for t in feed.of(ChainTip) if t.height == height]
    assert (tip.hash, tip.time) == (block_hash, verbose["blocktime"])
    heights = [t.height for t in feed.of(ChainTip)]
    assert heights == list(range(heights[0], heights[0] + len(heights))), "a tip per block, in order"
    with capsys.disabled():
        mode = "alpha" if devnet.alpha else "bitcoin"
        print(f"\n[{mode}] block mined -> DepositObserved received: {latency * 1000:.1f} ms")


async def test_deposits_split_over_transactions_and_change_that_is_no_deposit(
    harness: Harness, watcher: ServiceProcess
) -> None:
    devnet, feed = harness.devnet, harness.feed
    escrow, index = await harness.new_escrow()
    other, _ = await harness.new_escrow()
    await harness.wait_watching(2)
    escrow_script = utxo_script_pubkey(escrow, "alpha")
    payer, coin = await harness.fund_key(5 * COIN)
    # Paid at output 1, beside an output to the other escrow (another deposit) and change.
    spread = build(
        [coin],
        [(payer.script, 7 * COIN // 2 - 2_000), (escrow_script, COIN), (utxo_script_pubkey(other, "alpha"), COIN // 2)],
    )
    first = await devnet.faucet(escrow, 10_000_000)
    second = await devnet.broadcast(spread.serialize().hex())
    await devnet.mine(1)
    third = await devnet.faucet(escrow, 30_000_000)
    await devnet.mine(1)
    await feed.wait(lambda: len(feed.deposits()) >= 4, "four deposits")

    mine = sorted((d.txid, d.index, d.amount) for d in feed.deposits() if d.address == escrow)
    assert mine == sorted([(first, 0, 10_000_000), (second, 1, COIN), (third, 0, 30_000_000)])
    [to_other] = [d for d in feed.deposits() if d.address == other]
    assert (to_other.txid, to_other.index, to_other.amount) == (second, 2, COIN // 2)
    heights = {d.txid: d.block_number for d in feed.deposits()}
    assert heights[first] == heights[second] == heights[third] - 1

    # A payout from the escrow with its change back to the escrow: the change is not a deposit.
    key = harness.escrow_key(index)
    assert key.address == escrow
    payout = build([Utxo(third, 0, 30_000_000, key)], [(Key().script, 10_000_000), (escrow_script, 19_990_000)])
    payout_txid = await devnet.broadcast(payout.serialize().hex())
    await devnet.mine(1)
    later = await devnet.faucet(escrow, 40_000_000)
    await devnet.mine(1)
    await feed.wait(lambda: bool(feed.deposits(later)), "the deposit after the payout")
    assert [d.txid for d in feed.deposits() if d.address == escrow][-1] == later
    assert feed.deposits(payout_txid) == [], "a payout's change is not a deposit"
    assert len(feed.deposits()) == 5


async def test_followed_transactions_are_confirmed_up_to_the_threshold(
    harness: Harness, watcher: ServiceProcess
) -> None:
    devnet, feed = harness.devnet, harness.feed
    # Mined before the watcher hears of it, as when the chain is faster than the bus.
    _, coin = await harness.fund_key(COIN)
    early_tx = build([coin], [(Key().script, COIN - 1_000)])
    early = await devnet.broadcast(early_tx.serialize().hex())
    await devnet.mine(1)
    await harness.follow(early, transfer_id="t-early")

    # Broadcast while already followed, with a fee-bump candidate that is never broadcast.
    key2, coin2 = await harness.fund_key(2 * COIN)
    late_tx = build([coin2], [(Key().script, COIN), (key2.script, COIN - 2_345)])
    late = txid_of(late_tx)
    never = "ab" * 32
    await harness.follow(late, never, transfer_id="t-late")
    await harness.wait_db(f"SELECT count(*) FROM {SCHEMA}.followed", 3)
    assert await devnet.broadcast(late_tx.serialize().hex()) == late
    await harness.wait_resolved(late)
    for _ in range(STOP_AT + 2):
        await devnet.mine(1)
        await feed.wait_tip(await devnet.height())
    await harness.wait_db(f"SELECT count(*) FROM {SCHEMA}.followed WHERE done", 2)

    assert feed.confirmations(late) == [1, 2], "counted per block up to the threshold"
    early_counts = feed.confirmations(early)
    assert early_counts == list(range(early_counts[0], THRESHOLD + 1))
    verbose = await devnet.tx(late)
    [one] = [c for c in feed.of(TxConfirmation) if c.txid == late and c.confirmations == 1]
    assert (one.block_hash, one.success, one.fee_paid) == (verbose["blockhash"], True, 2_345)
    assert one.block_number == await devnet.tx_height(late, key2.scripthash)
    assert {c.fee_paid for c in feed.of(TxConfirmation) if c.txid == early} == {1_000}
    assert feed.confirmations(never) == []
    await harness.wait_db(f"SELECT count(*) FROM {SCHEMA}.followed WHERE NOT done", 0)


# --------------------------------------------------------------------------- reorgs


async def test_reorg_unpublishes_removed_deposits_and_republishes_survivors(
    harness: Harness, watcher: ServiceProcess
) -> None:
    devnet, feed = harness.devnet, harness.feed
    dropped_to, _ = await harness.new_escrow()
    kept_to, _ = await harness.new_escrow()
    await harness.wait_watching(2)
    _, coin = await harness.fund_key(COIN)
    followed_tx = build([coin], [(Key().script, COIN - 1_000)])
    followed = await devnet.broadcast(followed_tx.serialize().hex())
    await harness.follow(followed, transfer_id="t-reorged")
    dropped = await devnet.faucet(dropped_to, 11_000_000)
    kept = await devnet.faucet(kept_to, 22_000_000)
    [old_hash] = await devnet.mine(1)
    height = await devnet.height()
    await feed.wait(
        lambda: bool(feed.deposits(kept)) and bool(feed.deposits(dropped)) and bool(feed.confirmations(followed)),
        "deposits and the confirmation",
    )
    await feed.wait_tip(height)

    # The block with both deposits and the followed transaction is replaced by two new ones; only
    # `kept` goes back to the mempool.
    new_hashes = await devnet.reorg(1, [dropped, followed])
    await feed.wait(lambda: bool(feed.of(ChainReorg)), "the reorg")
    [reorg] = feed.of(ChainReorg)
    assert (reorg.depth, reorg.ancestor_height, reorg.removed_hashes) == (1, height - 1, [old_hash])
    assert (reorg.new_tip_height, reorg.new_tip_hash) == (height + 1, new_hashes[-1])
    assert reorg.sequence == 1, "numbered, so that the engine takes tips only after the reorgs before them"
    await feed.wait(lambda: feed.confirmations(followed)[-1] == 0, "the followed transaction unmined")
    [zero] = [c for c in feed.of(TxConfirmation) if c.txid == followed and c.confirmations == 0]
    assert zero.block_hash is None and zero.block_number is None

    [remined_hash] = await devnet.mine(1)
    await feed.wait(lambda: len(feed.deposits(kept)) == 2, "the surviving deposit, re-published")
    assert [d.block_hash for d in feed.deposits(kept)] == [old_hash, remined_hash]
    assert feed.deposits(kept)[1].block_number == height + 2
    assert len(feed.deposits(dropped)) == 1, "a removed deposit is not published again"

    # The same bytes broadcast again and mined count anew.
    assert await devnet.broadcast(followed_tx.serialize().hex()) == followed
    [again] = await devnet.mine(1)
    await feed.wait(lambda: feed.confirmations(followed)[-1] == 1, "confirmation after the re-broadcast")
    assert [c for c in feed.of(TxConfirmation) if c.txid == followed][-1].block_hash == again

    # Re-mined at the same height (its history's status does not change): re-published all the same.
    top = await devnet.height()
    await feed.wait_tip(top)
    before = len(feed.of(ChainReorg))
    replaced = await devnet.reorg(2, include_mempool=True)
    await feed.wait(lambda: len(feed.of(ChainReorg)) > before, "the second reorg")
    await feed.wait(lambda: len(feed.deposits(kept)) == 3, "the deposit in its replacement block")
    assert feed.deposits(kept)[2].block_hash == replaced[0]
    assert feed.deposits(kept)[2].block_number == height + 2
    assert [d.reorgs for d in feed.deposits(kept)] == [0, 1, 2]
    assert [r.sequence for r in feed.of(ChainReorg)] == [1, 2]
    await feed.wait(lambda: feed.confirmations(followed)[-1] >= 1, "the followed transaction mined again")
    assert len(feed.deposits(dropped)) == 1
    events = [type(m).__name__ for _, m, _ in feed.events]
    assert events.index("ChainReorg") < len(events) - 1 - events[::-1].index("DepositObserved")


# --------------------------------------------------------------------------- restarts and replicas


async def test_catches_up_after_downtime(harness: Harness) -> None:
    devnet, feed = harness.devnet, harness.feed
    process = harness.watcher()
    await process.start()
    await feed.wait_tip(await devnet.height())
    escrows = [await harness.new_escrow() for _ in range(3)]
    await harness.wait_watching(3)
    await process.stop()

    stopped_at = await devnet.height()
    txids = [await devnet.faucet(escrows[i % 3][0], (i + 1) * 1_000_000) for i in range(6)]
    newcomer, _ = await harness.new_escrow()  # assigned while the watcher is down
    newcomer_tx = await devnet.faucet(newcomer, 7_000_000)
    await devnet.mine(4)
    txids.append(await devnet.faucet(escrows[0][0], 9_000_000))
    await devnet.mine(6)
    assert await devnet.height() == stopped_at + 10

    restarted = harness.watcher()
    await restarted.start()
    try:
        await feed.wait_tip(stopped_at + 10)
        await feed.wait(lambda: len(feed.deposits()) == len(txids) + 1, "every deposit")
    finally:
        await restarted.stop()

    for i, txid in enumerate(txids[:6]):
        [deposit] = feed.deposits(txid)
        assert (deposit.address, deposit.amount, deposit.block_number) == (
            escrows[i % 3][0],
            (i + 1) * 1_000_000,
            stopped_at + 1,
        )
    assert [d.block_number for d in feed.deposits(txids[6])] == [stopped_at + 5]
    assert [d.amount for d in feed.deposits(newcomer_tx)] == [7_000_000]
    tips = [t.height for t in feed.of(ChainTip) if t.height > stopped_at]
    assert tips == list(range(stopped_at + 1, stopped_at + 11)), "every missed block, once, in order"


async def test_reconnects_when_the_server_restarts(harness: Harness, watcher: ServiceProcess) -> None:
    devnet, feed = harness.devnet, harness.feed
    escrow, _ = await harness.new_escrow()
    await harness.wait_watching(1)
    before = await devnet.height()
    waiting = await devnet.faucet(escrow, 4_000_000)
    await devnet.close()
    devnet.stop()  # gracefully: the mempool survives the restart
    await asyncio.sleep(0.5)
    devnet.restart()

    [block_hash] = await devnet.mine(1)
    await feed.wait(lambda: bool(feed.deposits(waiting)), "the deposit mined after the restart")
    assert feed.deposits(waiting)[0].block_hash == block_hash
    later = await devnet.faucet(escrow, 5_000_000)
    await devnet.mine(1)
    await feed.wait(lambda: bool(feed.deposits(later)), "a deposit on the new connection")
    await feed.wait_tip(before + 2)
    assert [d.txid for d in feed.deposits()] == [waiting, later]
    log = watcher.log_path.read_text()
    assert log.count("connected to the Electrum server") >= 2
    assert "Traceback" not in log


async def test_two_replicas_publish_each_fact_once(harness: Harness) -> None:
    devnet, feed = harness.devnet, harness.feed
    first, second = harness.watcher(), harness.watcher()
    await asyncio.gather(first.start(), second.start())
    try:
        await feed.wait_tip(await devnet.height())
        escrows = [await harness.new_escrow() for _ in range(4)]
        await harness.wait_watching(4)
        txids = [await devnet.faucet(escrows[i % 4][0], 1_000_000 + i) for i in range(6)]
        _, coin = await harness.fund_key(COIN)
        followed_tx = build([coin], [(Key().script, COIN - 1_000)])
        followed = await devnet.broadcast(followed_tx.serialize().hex())
        await harness.follow(followed, transfer_id="t-replicas")
        await devnet.mine(1)
        await feed.wait(lambda: len(feed.deposits()) == len(txids), "the first deposits")
        # One replica dies mid-stream; the other carries on alone.
        first.kill()
        txids += [await devnet.faucet(escrows[i % 4][0], 2_000_000 + i) for i in range(4)]
        for _ in range(STOP_AT):
            await devnet.mine(1)
        await feed.wait_tip(await devnet.height())
        await feed.wait(lambda: len(feed.deposits()) >= len(txids), "all deposits")
        await harness.wait_db(f"SELECT count(*) FROM {SCHEMA}.followed WHERE done", 1)
        await asyncio.sleep(0.5)  # room for any duplicate to arrive
    finally:
        await asyncio.gather(first.stop(), second.stop())

    event_ids = [event_id for event_id, _, _ in feed.events]
    assert len(event_ids) == len(set(event_ids))
    facts = [(d.txid, d.index, d.block_hash) for d in feed.deposits()]
    assert len(facts) == len(set(facts)) == len(txids)
    assert {d.txid for d in feed.deposits()} == set(txids)
    heights = [t.height for t in feed.of(ChainTip)]
    assert len(heights) == len(set(heights))
    # The survivor may first see it several blocks deep (it was mined while the other one died).
    counts = feed.confirmations(followed)
    assert counts == sorted(set(counts)) and counts[-1] >= THRESHOLD > max([0, *counts[:-1]])
