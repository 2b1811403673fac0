"""Outbox → JetStream → inbox: every event takes effect exactly once, whatever is repeated."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import msgspec
import pytest

from otc_common import subjects
from otc_common.bus import Bus, ConsumerRunner, OutboxRelay, emit, emitted_together
from otc_common.db import Connection, Pool, create_pool, migrate
from otc_common.messages import (
    AlertRaised,
    Envelope,
    Message,
    Party,
    PartyDetailsFilled,
    SideFunded,
    decode_envelope,
)
from otc_common.subjects import ConsumerSpec

EFFECTS = ("001_effects", "CREATE TABLE effects (event_id text NOT NULL, deal_id text NOT NULL)")
SPEC = ConsumerSpec(durable="test-consumer", stream="DEALS", filter_subjects=["otc.deal.>"], ack_wait_seconds=1)


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


class CrashAfterPublish(OutboxRelay):
    """Publishes, then dies before deleting the rows: the restart publishes them again."""

    async def drain(self) -> int:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT event_id, subject, data FROM outbox ORDER BY id LIMIT 50")
        for row in rows:
            await self.bus.js.publish(row["subject"], row["data"], headers={"Nats-Msg-Id": row["event_id"]})
        raise ConnectionError("killed between publish and delete")


class LosesFirstAcks(ConsumerRunner):
    """Commits but never acks the first deliveries, as if the process died right after commit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = 0

    async def ack(self, msg: Any) -> None:
        if msg.metadata.num_delivered == 1 and self.skipped < 20:
            self.skipped += 1
            return
        await super().ack(msg)


@pytest.fixture
async def pools(database_url: str) -> Any:
    producer = await create_pool(database_url, "producer")
    consumer = await create_pool(database_url, "consumer")
    await migrate(producer, "producer", [])
    await migrate(consumer, "consumer", [EFFECTS])
    yield producer, consumer
    await producer.close()
    await consumer.close()


async def test_outbox_to_inbox_exactly_once(clean_nats: str, database_url: str, pools: tuple[Pool, Pool]) -> None:
    producer, consumer_pool = pools
    bus = await Bus.connect(clean_nats, "test")
    await bus.provision_streams()
    await bus.provision_consumer(SPEC)
    total = 120

    async with producer.acquire() as conn, conn.transaction():
        for i in range(total):
            await emit(conn, subjects.deal(f"d{i}"), PartyDetailsFilled(deal_id=f"d{i}", party=Party.ALICE))

    # A rolled-back transaction publishes nothing.
    with pytest.raises(RuntimeError):
        async with producer.acquire() as conn, conn.transaction():
            await emit(conn, subjects.deal("ghost"), PartyDetailsFilled(deal_id="ghost", party=Party.BOB))
            raise RuntimeError("rollback")

    crashing = CrashAfterPublish(producer, bus, "producer", database_url)
    with pytest.raises(ConnectionError):
        await crashing.drain()
    assert await producer.fetchval("SELECT count(*) FROM outbox") == total  # nothing was marked published

    failures = {"left": 5}

    async def handler(conn: Connection, envelope: Envelope, message: Message) -> None:
        assert isinstance(message, PartyDetailsFilled)
        await conn.execute("INSERT INTO effects VALUES ($1, $2)", envelope.event_id, message.deal_id)
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("transient failure after the effect was written")

    runner = LosesFirstAcks(bus, consumer_pool, SPEC, handler)
    relay = OutboxRelay(producer, bus, "producer", database_url)
    tasks = [asyncio.create_task(runner.run()), asyncio.create_task(relay.run())]
    try:

        async def all_effects() -> bool:
            return bool(await consumer_pool.fetchval("SELECT count(*) FROM effects") >= total)

        await wait_for(all_effects)

        # A producer restored from backup republishes old events under new message ids:
        # JetStream cannot tell, the inbox can.
        stream_count_before = (await bus.js.stream_info("DEALS")).state.messages
        first = await bus.js.get_msg("DEALS", seq=1)
        await bus.js.publish(first.subject or "", first.data or b"", headers={"Nats-Msg-Id": "restored-copy"})

        async def handled_copy() -> bool:
            info = await bus.js.consumer_info("DEALS", SPEC.durable)
            return bool(info.num_ack_pending == 0 and info.num_pending == 0)

        await wait_for(handled_copy)
        await asyncio.sleep(1.5)  # past ack_wait: any unacked message would have been redelivered
    finally:
        runner.stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert runner.skipped > 0, "the test must exercise redelivery"
    assert failures["left"] == 0
    assert stream_count_before == total, "JetStream deduplicated the relay's republished events"
    rows = await consumer_pool.fetch("SELECT event_id, count(*) AS n FROM effects GROUP BY event_id")
    assert len(rows) == total
    assert all(row["n"] == 1 for row in rows), "an event took effect twice"
    assert await producer.fetchval("SELECT count(*) FROM outbox") == 0
    deal_ids = {row["deal_id"] for row in await consumer_pool.fetch("SELECT deal_id FROM effects")}
    assert "ghost" not in deal_ids
    await bus.close()


async def test_events_emitted_together_are_stored_in_order_with_one_statement(pools: tuple[Pool, Pool]) -> None:
    producer, _ = pools

    def filled(deal_id: str, party: Party = Party.ALICE) -> PartyDetailsFilled:
        return PartyDetailsFilled(deal_id=deal_id, party=party)

    async with producer.acquire() as conn, conn.transaction(), emitted_together(conn):
        await emit(conn, subjects.deal("a"), filled("a"), event_id="e-a")
        async with emitted_together(conn):  # nested on the same connection: the outer block stores
            await emit(conn, subjects.deal("b"), filled("b"), event_id="e-b")
        await emit(conn, subjects.deal("a"), filled("a", Party.BOB), event_id="e-a")  # the first of an id stands
        await emit(conn, subjects.deal("c"), filled("c"), event_id="e-c")
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0, "stored only when the block ends"
        async with producer.acquire() as other, other.transaction():
            await emit(other, subjects.deal("x"), filled("x"), event_id="e-x")  # another connection: stored at once
            assert await other.fetchval("SELECT count(*) FROM outbox") == 1
    rows = await producer.fetch("SELECT event_id, data FROM outbox ORDER BY id")
    assert [row["event_id"] for row in rows] == ["e-x", "e-a", "e-b", "e-c"]
    first = decode_envelope(rows[1]["data"])[1]
    assert isinstance(first, PartyDetailsFilled) and first.party is Party.ALICE

    with pytest.raises(RuntimeError):
        async with producer.acquire() as conn, conn.transaction(), emitted_together(conn):
            await emit(conn, subjects.deal("ghost"), filled("ghost"), event_id="e-ghost")
            raise RuntimeError("rollback")
    assert await producer.fetchval("SELECT count(*) FROM outbox WHERE event_id = 'e-ghost'") == 0


async def test_undecodable_message_is_terminated_and_alerted(clean_nats: str, pools: tuple[Pool, Pool]) -> None:
    _, consumer_pool = pools
    bus = await Bus.connect(clean_nats, "test")
    await bus.provision_streams()
    await bus.provision_consumer(SPEC)
    handled: list[str] = []

    async def handler(conn: Connection, envelope: Envelope, message: Message) -> None:
        handled.append(envelope.type)

    await bus.js.publish("otc.deal.broken", b"{not json", headers={"Nats-Msg-Id": "garbage-1"})
    await bus.js.publish(
        "otc.deal.future",
        b'{"event_id":"e-future","type":"deal.from_the_future","occurred_at":"2026-01-01T00:00:00Z","payload":{}}',
    )
    await bus.publish(subjects.deal("ok"), PartyDetailsFilled(deal_id="ok", party=Party.BOB))
    runner = ConsumerRunner(bus, consumer_pool, SPEC, handler)
    task = asyncio.create_task(runner.run())
    try:

        async def drained() -> bool:
            info = await bus.js.consumer_info("DEALS", SPEC.durable)
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await wait_for(drained)
    finally:
        runner.stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert handled == ["deal.party_filled"], "unknown types are skipped, garbage never reaches the handler"
    alert_msg = await bus.js.get_last_msg("ALERTS", subjects.alert("test"))
    _, alert = decode_envelope(alert_msg.data or b"")
    assert isinstance(alert, AlertRaised)
    assert alert.kind == "undecodable_message"
    await bus.close()


async def test_migrations_apply_once_under_concurrency(database_url: str) -> None:
    pools = [await create_pool(database_url, "svc") for _ in range(3)]
    migration = ("001_table", "CREATE TABLE thing (id int)")
    applied = await asyncio.gather(*(migrate(pool, "svc", [migration]) for pool in pools))
    assert sorted(len(a) for a in applied) == [0, 0, 2]
    conn = await asyncpg.connect(database_url)
    assert await conn.fetchval("SELECT count(*) FROM svc.schema_migrations") == 2
    await conn.close()
    for pool in pools:
        await pool.close()


async def bus_with_filled_deals(nats_url: str, count: int) -> Bus:
    """A bus with SPEC's consumer and `count` PartyDetailsFilled events (deals d0, d1, ...) waiting for it."""
    bus = await Bus.connect(nats_url, "test")
    await bus.provision_streams()
    await bus.provision_consumer(SPEC)
    for i in range(count):
        await bus.publish(subjects.deal(f"d{i}"), PartyDetailsFilled(deal_id=f"d{i}", party=Party.ALICE))
    return bus


async def run_until_effects(runner: ConsumerRunner, pool: Pool, count: int) -> None:
    """Runs the consumer until its handler has written `count` effects, then stops it."""
    task = asyncio.create_task(runner.run())
    try:

        async def all_effects() -> bool:
            return bool(await pool.fetchval("SELECT count(*) FROM effects") >= count)

        await wait_for(all_effects)
    finally:
        runner.stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class CountsTransactions(ConsumerRunner):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transactions = 0

    def before_transaction(self) -> None:
        self.transactions += 1


async def test_a_failing_event_in_a_run_delays_only_itself(
    clean_nats: str, database_url: str, pools: tuple[Pool, Pool]
) -> None:
    """Events are handled many to a transaction; one that fails is rolled back alone and retried."""
    _, consumer_pool = pools
    total = 60
    bus = await bus_with_filled_deals(clean_nats, total)
    attempts: dict[str, int] = {}

    async def handler(conn: Connection, envelope: Envelope, message: Message) -> None:
        assert isinstance(message, PartyDetailsFilled)
        await conn.execute("INSERT INTO effects VALUES ($1, $2)", envelope.event_id, message.deal_id)
        attempts[message.deal_id] = attempts.get(message.deal_id, 0) + 1
        if message.deal_id == "d17" and attempts["d17"] <= 3:
            raise ConnectionError("d17 fails for a while")

    runner = CountsTransactions(bus, consumer_pool, SPEC, handler)
    await run_until_effects(runner, consumer_pool, total)
    others = await consumer_pool.fetchval("SELECT count(*) FROM effects WHERE deal_id <> 'd17'")
    rows = await consumer_pool.fetch("SELECT deal_id, count(*) AS n FROM effects GROUP BY deal_id")
    assert {row["deal_id"] for row in rows} == {f"d{i}" for i in range(total)}
    assert all(row["n"] == 1 for row in rows), "a rolled-back run must leave no effect behind"
    assert others == total - 1
    assert attempts["d17"] == 4, "the failing event is retried until it succeeds"
    # Two runs' worth of transactions plus the retries, far fewer than one per event.
    assert runner.transactions < total / 2, runner.transactions
    await bus.close()


class ShortRuns(ConsumerRunner):
    """Every run ends after its first event: the rest of a fetch waits for the next runs."""

    MAX_RUN_SECONDS = 0.0


async def test_events_a_run_leaves_for_the_next_are_each_handled_once(
    clean_nats: str, database_url: str, pools: tuple[Pool, Pool]
) -> None:
    """A run records its events in the inbox up front; those it leaves for later runs are not taken as done."""
    _, consumer_pool = pools
    total = 12
    bus = await bus_with_filled_deals(clean_nats, total)

    async def handler(conn: Connection, envelope: Envelope, message: Message) -> None:
        assert isinstance(message, PartyDetailsFilled)
        await conn.execute("INSERT INTO effects VALUES ($1, $2)", envelope.event_id, message.deal_id)

    await run_until_effects(ShortRuns(bus, consumer_pool, SPEC, handler), consumer_pool, total)
    rows = await consumer_pool.fetch("SELECT deal_id, count(*) AS n FROM effects GROUP BY deal_id")
    assert sorted((row["deal_id"], row["n"]) for row in rows) == sorted((f"d{i}", 1) for i in range(total))
    assert await consumer_pool.fetchval("SELECT count(*) FROM inbox") == total
    await bus.close()


async def test_events_of_types_a_consumer_does_not_handle_are_acknowledged_without_a_transaction(
    clean_nats: str, database_url: str, pools: tuple[Pool, Pool]
) -> None:
    _, consumer_pool = pools
    total = 10
    bus = await bus_with_filled_deals(clean_nats, total)
    for i in range(total):
        await bus.publish(subjects.deal(f"d{i}"), SideFunded(deal_id=f"d{i}", party=Party.BOB, amount=1))
    seen: list[str] = []

    async def handler(conn: Connection, envelope: Envelope, message: Message) -> None:
        seen.append(envelope.type)
        await conn.execute("INSERT INTO effects VALUES ($1, $2)", envelope.event_id, getattr(message, "deal_id", ""))

    only_filled = msgspec.structs.replace(SPEC, types=frozenset({PartyDetailsFilled.TYPE}))
    runner = CountsTransactions(bus, consumer_pool, only_filled, handler)
    task = asyncio.create_task(runner.run())
    try:

        async def all_acknowledged() -> bool:
            info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
            return bool(info.delivered.stream_seq >= 2 * total and info.num_pending == 0 and info.num_ack_pending == 0)

        await wait_for(all_acknowledged)  # every event, handled or not
    finally:
        runner.stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert set(seen) == {PartyDetailsFilled.TYPE}
    assert await consumer_pool.fetchval("SELECT count(*) FROM effects") == total
    assert await consumer_pool.fetchval("SELECT count(*) FROM inbox") == total
    await bus.close()


async def test_provisioning_again_updates_a_consumers_filter(clean_nats: str) -> None:
    """A new release that narrows what a durable consumer reads takes effect on the existing consumer."""
    bus = await Bus.connect(clean_nats, "test")
    await bus.provision_streams()
    wide = ConsumerSpec(durable="narrowing", stream="CHAIN", filter_subjects=["otc.chain.>"])
    narrow = ConsumerSpec(
        durable="narrowing", stream="CHAIN", filter_subjects=["otc.chain.*.deposit", "otc.chain.*.tip"]
    )
    await bus.provision_consumer(wide)
    await bus.provision_consumer(narrow)
    info = await bus.js.consumer_info("CHAIN", "narrowing")
    assert sorted(info.config.filter_subjects or []) == sorted(narrow.filter_subjects)
    await bus.provision_consumer(narrow)  # and again, unchanged
    await bus.close()
