"""NATS JetStream: connection, provisioning, the outbox relay and the consumer runner.

Exactly-once effects come from the database, not from NATS: producers write
events in the same transaction as their state (outbox) and the relay publishes
them with `Nats-Msg-Id = event_id`; consumers record `(consumer, event_id)` in
the same transaction as their effects (inbox) and ack only after commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from otc_common import metrics
from otc_common.db import DATABASE_TRANSIENT, Connection, Pool
from otc_common.messages import (
    AlertRaised,
    Envelope,
    Message,
    UnknownMessageType,
    decode_envelope,
    encode_envelope,
)
from otc_common.subjects import STREAMS, ConsumerSpec, StreamSpec, alert

log = logging.getLogger("otc.bus")

Handler = Callable[[Connection, Envelope, Message], Awaitable[None]]

_RELAY_TRANSIENT: tuple[type[Exception], ...] = (*DATABASE_TRANSIENT, nats.errors.Error)


class Bus:
    """One NATS connection per process, reconnecting forever."""

    def __init__(self, nc: NatsClient, source: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.source = source

    @classmethod
    async def connect(cls, servers: str, source: str) -> Bus:
        async def on_disconnect() -> None:
            log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected")

        async def on_error(exc: Exception) -> None:
            log.warning("nats error: %s", exc)

        delay = 0.2
        while True:
            try:
                nc = await nats.connect(
                    servers=[s.strip() for s in servers.split(",") if s.strip()],
                    name=source,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    drain_timeout=5,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    error_cb=on_error,
                )
                return cls(nc, source)
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                log.warning("nats not reachable yet (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def provision_streams(self, streams: Sequence[StreamSpec] = STREAMS) -> None:
        for spec in streams:
            config = StreamConfig(
                name=spec.name,
                subjects=spec.subjects,
                storage=StorageType.FILE,
                max_age=spec.max_age_seconds,
                duplicate_window=spec.duplicate_window_seconds,
            )
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(config)

    async def provision_consumer(self, spec: ConsumerSpec) -> None:
        config = ConsumerConfig(
            name=spec.durable,
            durable_name=spec.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=spec.ack_wait_seconds,
            max_ack_pending=spec.max_ack_pending,
            filter_subjects=spec.filter_subjects,
        )
        await self.js.add_consumer(spec.stream, config)

    async def publish(self, subject: str, msg: Message, event_id: str | None = None) -> None:
        """Direct publish, for facts with no state behind them (alerts); the rest goes via the outbox."""
        data = encode_envelope(msg, event_id)
        envelope = msgspec.json.decode(data, type=Envelope)
        await self.js.publish(subject, data, headers={"Nats-Msg-Id": envelope.event_id})

    async def raise_alert(self, kind: str, detail: str, **fields: Any) -> None:
        metrics.ALERTS.labels(self.source, kind).inc()
        log.error("alert %s: %s", kind, detail, extra=fields)
        try:
            await self.publish(alert(self.source), AlertRaised(source=self.source, kind=kind, detail=detail, **fields))
        except (nats.errors.Error, TimeoutError) as exc:
            log.error("alert could not be published: %s", exc)

    async def close(self) -> None:
        """Consumers have stopped and the outbox is drained by now: flush what is buffered and close.

        (A drain would wait on the idle pull subscriptions until its timeout.)"""
        if not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self.nc.flush(timeout=2)
            await self.nc.close()


@dataclass(slots=True)
class _Emitted:
    conn: Connection
    rows: dict[str, tuple[str, bytes]]


#: The events emitted inside `emitted_together` on its connection, waiting to be stored with one statement.
_emitted: contextvars.ContextVar[_Emitted | None] = contextvars.ContextVar("otc_emitted", default=None)


async def emit(conn: Connection, subject: str, msg: Message, event_id: str | None = None) -> None:
    """Queues an event in the caller's transaction; the relay publishes it after commit."""
    data = encode_envelope(msg, event_id)
    envelope_id = msgspec.json.decode(data, type=Envelope).event_id
    pending = _emitted.get()
    if pending is not None and pending.conn is conn:
        # The first of two events with one id stands, as the outbox's ON CONFLICT DO NOTHING would have it.
        pending.rows.setdefault(envelope_id, (subject, data))
        return
    await _store(conn, {envelope_id: (subject, data)})


@contextlib.asynccontextmanager
async def emitted_together(conn: Connection) -> AsyncIterator[None]:
    """Inside a transaction on `conn`: the events emitted on it within are stored, in emission order, with one
    statement when the block ends without an error (a block that fails stores none, as its transaction rolls
    back). Not for a block that rolls back to a savepoint and carries on: what it emitted would stay."""
    outer = _emitted.get()
    if outer is not None and outer.conn is conn:
        yield
        return
    pending = _Emitted(conn, {})
    token = _emitted.set(pending)
    try:
        yield
    finally:
        _emitted.reset(token)
    if pending.rows:
        await _store(conn, pending.rows)


async def _store(conn: Connection, rows: dict[str, tuple[str, bytes]]) -> None:
    # The relay's wake-up rides along (NOTIFY is delivered at commit, once per transaction).
    if len(rows) == 1:
        [(event_id, (subject, data))] = rows.items()
        await conn.execute(
            """WITH stored AS (
                   INSERT INTO outbox(event_id, subject, data) VALUES ($1, $2, $3) ON CONFLICT (event_id) DO NOTHING
               )
               SELECT pg_notify(current_schema() || '_outbox', '')""",
            event_id,
            subject,
            data,
        )
        return
    await conn.execute(
        """WITH stored AS (
               INSERT INTO outbox(event_id, subject, data)
               SELECT e, s, d FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY AS t(e, s, d, n)
               ORDER BY n
               ON CONFLICT (event_id) DO NOTHING
           )
           SELECT pg_notify(current_schema() || '_outbox', '')""",
        list(rows),
        [subject for subject, _ in rows.values()],
        [data for _, data in rows.values()],
    )


class OutboxRelay:
    """Publishes committed outbox rows in order; woken by LISTEN/NOTIFY, with a slow safety poll."""

    BATCH = 500
    SAFETY_POLL_SECONDS = 5.0

    def __init__(self, pool: Pool, bus: Bus, schema: str, database_url: str) -> None:
        self.pool = pool
        self.bus = bus
        self.schema = schema
        self.database_url = database_url
        self.channel = f"{schema}_outbox"
        self._wake = asyncio.Event()
        self.last_beat = time.monotonic()

    async def run(self) -> None:
        while True:
            listener: asyncpg.Connection | None = None
            try:
                listener = await asyncpg.connect(self.database_url)
                await listener.add_listener(self.channel, lambda *_: self._wake.set())
                self._wake.set()
                while not listener.is_closed():
                    self.last_beat = time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=self.SAFETY_POLL_SECONDS)
                    self._wake.clear()
                    await self.drain()
            except asyncio.CancelledError:
                raise
            except _RELAY_TRANSIENT as exc:
                log.warning("outbox relay interrupted (%s: %s); resuming", type(exc).__name__, exc)
                await asyncio.sleep(0.5)
            finally:
                if listener is not None and not listener.is_closed():
                    await listener.close()

    async def drain(self) -> int:
        """Publishes until the outbox is empty. One relay at a time per schema keeps the order."""
        published = 0
        contended = 0
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                locked = await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", self.channel)
                if not locked:
                    # Another replica is publishing; it may have read before our row committed.
                    contended += 1
                    if contended > 40:
                        return published
                    await asyncio.sleep(0.05)
                    continue
                rows = await conn.fetch(
                    "SELECT id, event_id, subject, data FROM outbox ORDER BY id LIMIT $1", self.BATCH
                )
                if not rows:
                    return published
                acks = [
                    self.bus.js.publish(row["subject"], row["data"], headers={"Nats-Msg-Id": row["event_id"]})
                    for row in rows
                ]
                await asyncio.gather(*acks)
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [row["id"] for row in rows])
                published += len(rows)
                metrics.OUTBOX_PUBLISHED.labels(self.schema).inc(len(rows))
            if len(rows) < self.BATCH:
                # That was all there was. Rows committed since then have notified: the relay drains again.
                return published


class TransientError(Exception):
    """Retry later: the message is nak'ed with backoff (an event that must wait for an earlier one)."""


class ConsumerRunner:
    """A durable pull consumer whose handler runs inside the inbox transaction.

    The messages of one fetch are handled together, several to a transaction, so a busy consumer
    pays one commit (one WAL flush) per run of messages instead of one per message. When anything
    in a run fails, the whole run is rolled back and its messages are handled one by one, so only
    the failing one is retried and the others take effect as they would alone.
    """

    BACKOFF_SECONDS = (0.2, 0.5, 1, 2, 5, 10, 30)
    ALERT_AFTER_DELIVERIES = 5
    #: A run commits after this many messages or this long, whichever comes first: row locks the
    #: handlers take are held until the commit, and replicas and API calls may be waiting on them.
    MAX_RUN = 50
    MAX_RUN_SECONDS = 0.2

    def __init__(self, bus: Bus, pool: Pool, spec: ConsumerSpec, handler: Handler, batch: int = 100) -> None:
        self.bus = bus
        self.pool = pool
        self.spec = spec
        self.handler = handler
        self.batch = batch
        self.last_beat = time.monotonic()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        subscription: _Puller | None = None
        while not self.stopping.is_set():
            self.last_beat = time.monotonic()
            try:
                if subscription is None:
                    subscription = _Puller(
                        await self.bus.js.pull_subscribe_bind(durable=self.spec.durable, stream=self.spec.stream),
                        self.batch,
                    )
                messages = await subscription.pull(wait_seconds=1)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                continue
            except (nats.errors.Error, OSError) as exc:
                log.warning("consumer %s fetch failed (%s); retrying", self.spec.durable, exc)
                await asyncio.sleep(0.5)
                continue
            await self.process_many(messages)
        if subscription is not None:
            # Delivered but not taken: given back now rather than after the ack timeout.
            for msg in subscription.leftovers():
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()

    async def process(self, msg: Msg) -> None:
        await self.process_many([msg])

    async def process_many(self, messages: Sequence[Msg]) -> None:
        decoded = [item for msg in messages if (item := await self._decode(msg)) is not None]
        if self.spec.types is not None:
            for item in decoded:
                if item.envelope.type not in self.spec.types:
                    await self.ack(item.msg)
            decoded = [item for item in decoded if item.envelope.type in self.spec.types]
        position = 0
        while position < len(decoded):
            if self.stopping.is_set():
                # Unacked messages come back after ack_wait to whichever replica is alive.
                for item in decoded[position:]:
                    await item.msg.nak()
                return
            taken, failure = await self._run(decoded[position:], self.MAX_RUN)
            if failure is None:
                position += taken
                continue
            if taken == 1:
                await self._retry_later(decoded[position], failure)
            else:
                for item in decoded[position : position + taken]:
                    _, alone = await self._run([item], 1)
                    if alone is not None:
                        await self._retry_later(item, alone)
            position += taken
            self.last_beat = time.monotonic()

    async def _decode(self, msg: Msg) -> _Delivery | None:
        try:
            envelope, payload = decode_envelope(msg.data)
        except UnknownMessageType as exc:
            log.info("skipping unknown message type %s", exc)
            await self.ack(msg)
            return None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            metrics.CONSUMER_TERMINATED.labels(self.spec.durable).inc()
            await msg.term()
            await self.bus.raise_alert("undecodable_message", f"{self.spec.durable} on {msg.subject}: {exc}")
            return None
        return _Delivery(msg, envelope, payload)

    async def _run(self, items: Sequence[_Delivery], limit: int) -> tuple[int, Exception | None]:
        """Handles up to `limit` of `items` in one transaction: (how many it took, the failure if any).

        On failure nothing of the run took effect."""
        consumer = self.spec.durable
        started = time.perf_counter()
        handled: list[tuple[_Delivery, float]] = []
        taken = items[:limit]
        self.before_transaction()
        try:
            # The run's inbox rows in one statement, and the events it emits in another: a round trip per event
            # costs more than most handlers.
            async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
                fresh = {
                    row["event_id"]
                    for row in await conn.fetch(
                        """INSERT INTO inbox (consumer, event_id) SELECT $1, unnest($2::text[])
                           ON CONFLICT DO NOTHING RETURNING event_id""",
                        self.spec.inbox_name,
                        [item.envelope.event_id for item in taken],
                    )
                }
                await self.before_handling(
                    conn, [(item.envelope, item.payload) for item in taken if item.envelope.event_id in fresh]
                )
                for position, item in enumerate(taken):
                    item_started = time.perf_counter()
                    if item.envelope.event_id in fresh:
                        fresh.discard(item.envelope.event_id)  # a duplicate later in the run is not fresh
                        await self.handler(conn, item.envelope, item.payload)
                    handled.append((item, time.perf_counter() - item_started))
                    if position + 1 < len(taken) and time.perf_counter() - started >= self.MAX_RUN_SECONDS:
                        # The rest go to the next run: their inbox rows, inserted above, must not stay.
                        await conn.execute(
                            "DELETE FROM inbox WHERE consumer = $1 AND event_id = ANY($2::text[])",
                            self.spec.inbox_name,
                            list(fresh),
                        )
                        break
                await self.before_commit(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Unknown failures are retried rather than dropped: losing an event loses money.
            return len(handled) + 1, exc
        finally:
            self.after_transaction()
        for item, seconds in handled:
            metrics.CONSUMER_HANDLED.labels(consumer, item.envelope.type).observe(seconds)
            await self.ack(item.msg)
        last = handled[-1][0].msg
        if last.metadata is not None and last.metadata.num_pending is not None:
            metrics.CONSUMER_LAG.labels(consumer).set(last.metadata.num_pending)
        return len(handled), None

    async def _retry_later(self, item: _Delivery, failure: Exception) -> None:
        consumer = self.spec.durable
        deliveries = item.msg.metadata.num_delivered if item.msg.metadata else 1
        delay = self.BACKOFF_SECONDS[min(deliveries - 1, len(self.BACKOFF_SECONDS) - 1)]
        metrics.CONSUMER_REDELIVERED.labels(consumer).inc()
        log.warning(
            "handler failed; retrying in %ss",
            delay,
            extra={
                "consumer": consumer,
                "type": item.envelope.type,
                "event_id": item.envelope.event_id,
                "error": repr(failure),
            },
        )
        # An event waiting for an earlier one (TransientError) may wait out another consumer's ack timeout first.
        alert_at = self.ALERT_AFTER_DELIVERIES * (2 if isinstance(failure, TransientError) else 1)
        if deliveries == alert_at:
            await self.bus.raise_alert("handler_failing", f"{consumer} {item.envelope.type}: {failure!r}")
        await item.msg.nak(delay=delay)

    async def ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except nats.errors.Error as exc:
            # The inbox row makes the redelivery harmless.
            log.warning("ack failed (%s); the redelivery will be deduplicated", exc)

    def before_transaction(self) -> None:
        """Called before each handling transaction begins."""

    async def before_handling(self, conn: Connection, fresh: Sequence[tuple[Envelope, Message]]) -> None:
        """Called inside each handling transaction with the run's events not handled before, before the first is
        handled, to read what they need at once. Reads only: a run that runs out of time leaves the rest of its
        events to the next run, so a write here could take effect for an event not handled. A failure fails the
        run."""

    async def before_commit(self, conn: Connection) -> None:
        """Called inside each handling transaction once its run of events is handled; a failure fails the run."""

    def after_transaction(self) -> None:
        """Called when each handling transaction has ended, committed or not."""


class _Puller:
    """Pulls a durable consumer's messages with one wait per batch instead of one per message.

    nats.py's fetch() awaits each message of a batch in a task of its own; on a busy event loop each of
    those waits behind all other ready work, and pulling 100 messages took up to a second. Here a lingering
    pull request asks for a batch, the first message is awaited, and whatever arrived with it is taken from
    the subscription's queue at once; the rest of the batch is taken by the next pulls. (It reads the
    subscription's queue and pull subject as fetch() itself does: nats.py offers no public way to.)
    """

    def __init__(self, subscription: JetStreamContext.PullSubscription, batch: int) -> None:
        self._subscription = subscription
        self._batch = batch
        #: Messages the outstanding pull request may still deliver, and until when (monotonic seconds).
        self._outstanding = 0
        self._expires_at = 0.0

    def _take(self, first: Msg | None = None) -> list[Msg]:
        """`first`, if given, then everything already in the subscription's queue, in delivery order."""
        sub = self._subscription._sub
        taken: list[Msg] = []
        while first is not None or not sub._pending_queue.empty():
            msg = first if first is not None else sub._pending_queue.get_nowait()
            first = None
            sub._pending_size -= len(msg.data)
            status = JetStreamContext.is_status_msg(msg)
            if status is None:
                taken.append(msg)
                self._outstanding -= 1
            elif status != api.StatusCode.CONTROL_MESSAGE:
                self._outstanding = 0  # the request ended: expired (408), nothing left (404), or refused (409)
        return taken

    async def pull(self, wait_seconds: float) -> list[Msg]:
        taken = self._take()
        if taken:
            return taken
        now = time.monotonic()
        if self._outstanding <= 0 or now >= self._expires_at:
            request = {"batch": self._batch, "expires": int(wait_seconds * 1e9) - 100_000}
            await self._subscription._nc.publish(
                self._subscription._nms, json.dumps(request).encode(), reply=self._subscription._deliver
            )
            self._outstanding, self._expires_at = self._batch, now + wait_seconds
        sub = self._subscription._sub
        try:
            first = await asyncio.wait_for(sub._pending_queue.get(), wait_seconds)
        except TimeoutError:
            return []
        return self._take(first)

    def leftovers(self) -> list[Msg]:
        """Delivered and not taken yet (on stopping: to be given back)."""
        return self._take()


@dataclass(frozen=True, slots=True)
class _Delivery:
    msg: Msg
    envelope: Envelope
    payload: Message
