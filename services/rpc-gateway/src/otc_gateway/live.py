"""Live deal updates as server-sent events, pushed from the bus.

Each open stream reads its deal's events from the JetStream stream DEALS with an ordered
(ephemeral) consumer filtered on `otc.deal.<dealId>`; the SSE `id` of every frame is the
stream sequence of the newest deal event it reflects. A client that reconnects sends that
id back (`Last-Event-ID`, or `?lastEventId=` where it cannot set headers) and the consumer
starts right after it, so no deal event is ever skipped.

The engine also changes what `otc.status` shows without a deal event (deposits seen,
confirmations, payouts submitted): a stream therefore re-reads the status when a new
chain tip arrives for one of its deal's chains, or a queue/tank result names its deal,
and pushes a `status` frame only when the answer differs. Every reconnect starts with a
fresh status too, so what changed while a client was away is never lost either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Gauge

from otc_common import subjects
from otc_common.errors import AppError, ErrorCode
from otc_common.messages import Stage, StatusParams, UnknownMessageType, decode_envelope
from otc_gateway.rpc import RpcHandler
from otc_gateway.views import BLOCK_DRIVEN

log = logging.getLogger("otc.gateway.live")

DEALS_STREAM = "DEALS"
#: After a tip, read the status once more this much later: the engine handles the same tip concurrently.
RECHECK_SECONDS = 1.0
#: When the engine does not answer, try again after this long.
RETRY_SECONDS = 2.0
#: The browser's reconnection delay after a dropped connection.
CLIENT_RETRY_MS = 2000
MAX_LAST_EVENT_ID_CHARS = 20

STREAMS_OPEN = Gauge("otc_gateway_sse_streams", "Open server-sent event streams")
FRAMES = Counter("otc_gateway_sse_frames_total", "Server-sent event frames pushed", ["event"])
REFRESHES = Counter("otc_gateway_status_refreshes_total", "otc.status re-reads for live streams", ["cause"])

_encoder = msgspec.json.Encoder()

Render = Callable[[dict[str, Any]], dict[str, Any]]


def parse_last_event_id(value: str | None) -> int:
    """The stream sequence a client has seen; 0 (replay everything) for anything that is not one."""
    if value is None:
        return 0
    value = value.strip()
    if not value or len(value) > MAX_LAST_EVENT_ID_CHARS or not value.isascii() or not value.isdigit():
        return 0
    return int(value)


def frame(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One SSE frame. JSON never holds a raw newline, so `data` is always a single line."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: ".encode() + _encoder.encode(data) + b"\n\n"


class Feed:
    """The wake-up side of one open stream: pokes from tips and results, deal messages from JetStream."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.messages: list[Msg] = []
        self.poked: str | None = None
        self.recheck_at: float | None = None

    def poke(self, cause: str) -> None:
        self.poked = cause
        self.recheck_at = time.monotonic() + RECHECK_SECONDS
        self.wake.set()

    async def on_message(self, msg: Msg) -> None:
        self.messages.append(msg)
        self.wake.set()


class LiveHub:
    """One subscription per process to chain tips and payout results, fanned out to the open streams."""

    def __init__(self) -> None:
        self._by_chain: dict[str, set[Feed]] = defaultdict(set)
        self._by_deal: dict[str, set[Feed]] = defaultdict(set)
        self.stopping = asyncio.Event()
        self._subscriptions: list[Subscription] = []

    async def start(self, nc: NatsClient) -> None:
        self._subscriptions = [
            await nc.subscribe(subjects.chain_event("*", "tip"), cb=self._on_tip),
            await nc.subscribe(subjects.queue_result("*"), cb=self._on_result),
            await nc.subscribe(subjects.tank_result("*"), cb=self._on_result),
        ]

    def stop(self) -> None:
        """Ends every open stream, so that the HTTP server can drain."""
        self.stopping.set()
        for feeds in (*self._by_chain.values(), *self._by_deal.values()):
            for feed in feeds:
                feed.wake.set()

    async def _on_tip(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) == 4:
            for feed in list(self._by_chain.get(parts[2], ())):
                feed.poke("tip")

    async def _on_result(self, msg: Msg) -> None:
        try:
            _, payload = decode_envelope(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnknownMessageType):
            return
        deal_id = getattr(payload, "deal_id", None)
        if isinstance(deal_id, str):
            for feed in list(self._by_deal.get(deal_id, ())):
                feed.poke("payout")

    def watch_deal(self, deal_id: str, feed: Feed) -> None:
        self._by_deal[deal_id].add(feed)

    def watch_chains(self, feed: Feed, chains: set[str]) -> None:
        for chain, feeds in list(self._by_chain.items()):
            if chain not in chains:
                feeds.discard(feed)
                if not feeds:
                    del self._by_chain[chain]
        for chain in chains:
            self._by_chain[chain].add(feed)

    def forget(self, deal_id: str, feed: Feed) -> None:
        self.watch_chains(feed, set())
        feeds = self._by_deal.get(deal_id)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._by_deal[deal_id]


def _chains_to_watch(status: dict[str, Any]) -> set[str]:
    if Stage(status["stage"]) not in BLOCK_DRIVEN:
        return set()
    return {status["alice"]["chainId"], status["bob"]["chainId"]}


class DealStream:
    """One client's stream of one deal.

    With `render` (the party pages) status frames become `view` frames holding the page's
    re-rendered live section, and raw deal events are not sent; without it (the API) every
    deal event is sent as it was published, followed by a `status` frame.
    """

    def __init__(
        self,
        hub: LiveHub,
        rpc: RpcHandler,
        deal_id: str,
        token: str,
        last_seq: int,
        status: dict[str, Any],
        heartbeat: float,
        render: Render | None = None,
    ) -> None:
        self.hub = hub
        self.rpc = rpc
        self.deal_id = deal_id
        self.token = token
        self.seq = last_seq
        self.status = status
        self.heartbeat = heartbeat
        self.render = render
        self.feed = Feed()
        self.last_event_at: str | None = None

    async def _subscribe(self) -> Any:
        config = ConsumerConfig(inactive_threshold=30.0)
        if self.seq:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.seq + 1
        else:
            config.deliver_policy = DeliverPolicy.ALL
        return await self.rpc.service.nats.js.subscribe(
            subjects.deal(self.deal_id),
            stream=DEALS_STREAM,
            cb=self.feed.on_message,
            ordered_consumer=True,
            idle_heartbeat=5.0,
            config=config,
        )

    async def _fetch(self) -> dict[str, Any] | None:
        """A fresh status, or None to try again a little later (the stream itself stays up)."""
        try:
            result: dict[str, Any] = await self.rpc.forward(
                "otc.status", StatusParams(deal_id=self.deal_id, token=self.token)
            )
            return result
        except AppError as exc:
            if exc.code is not ErrorCode.TEMPORARILY_UNAVAILABLE:
                log.warning("live status refresh refused", extra={"deal_id": self.deal_id, "code": int(exc.code)})
        except Exception as exc:  # a refresh must never take the stream down with it
            log.warning("live status refresh failed: %s", type(exc).__name__, extra={"deal_id": self.deal_id})
        return None

    def _status_frame(self) -> bytes:
        if self.render is None:
            FRAMES.labels("status").inc()
            return frame("status", {"seq": self.seq, "status": self.status}, self.seq)
        FRAMES.labels("view").inc()
        view = {"seq": self.seq, "eventAt": self.last_event_at, **self.render(self.status)}
        return frame("view", view, self.seq)

    def _deal_frames(self, messages: list[Msg]) -> tuple[list[bytes], bool]:
        """Frames for new deal events (none for pages) and whether the replay backlog is drained."""
        frames: list[bytes] = []
        caught_up = True
        for msg in messages:
            meta = msg.metadata
            seq = meta.sequence.stream
            caught_up = meta.num_pending == 0
            if seq <= self.seq:
                continue  # an ordered consumer that re-created itself may repeat what it already gave
            self.seq = seq
            try:
                envelope, _ = decode_envelope(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError, UnknownMessageType):
                continue
            self.last_event_at = envelope.occurred_at.isoformat()
            if self.render is None:
                FRAMES.labels("deal").inc()
                payload = msgspec.json.decode(envelope.payload)
                data = {
                    "seq": seq,
                    "eventId": envelope.event_id,
                    "type": envelope.type,
                    "occurredAt": self.last_event_at,
                    "payload": payload,
                }
                frames.append(frame(envelope.type, data, seq))
        return frames, caught_up

    async def events(self) -> AsyncIterator[bytes]:
        STREAMS_OPEN.inc()
        self.hub.watch_deal(self.deal_id, self.feed)
        self.hub.watch_chains(self.feed, _chains_to_watch(self.status))
        subscription = None
        try:
            yield f"retry: {CLIENT_RETRY_MS}\n\n".encode()
            try:
                subscription = await self._subscribe()
            except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
                # Ending the stream makes the browser reconnect (with its Last-Event-ID) shortly.
                log.warning("deal stream not opened: %s", type(exc).__name__, extra={"deal_id": self.deal_id})
                return
            yield self._status_frame()
            sent_seq, sent_status = self.seq, self.status
            next_beat = time.monotonic() + self.heartbeat
            retry_at: float | None = None
            while not self.hub.stopping.is_set():
                now = time.monotonic()
                due = [next_beat] + [t for t in (self.feed.recheck_at, retry_at) if t is not None]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.feed.wake.wait(), timeout=max(0.0, min(due) - now))
                self.feed.wake.clear()
                if self.hub.stopping.is_set():
                    return
                now = time.monotonic()
                messages, self.feed.messages = self.feed.messages, []
                frames, caught_up = self._deal_frames(messages)
                for item in frames:
                    yield item
                cause = "event" if messages else self.feed.poked
                self.feed.poked = None
                if cause is None and self.feed.recheck_at is not None and now >= self.feed.recheck_at:
                    cause, self.feed.recheck_at = "recheck", None
                if cause is None and retry_at is not None and now >= retry_at:
                    cause = "retry"
                fetched = False
                if cause is not None and caught_up:
                    REFRESHES.labels(cause).inc()
                    fresh = await self._fetch()
                    if fresh is None:
                        retry_at = time.monotonic() + RETRY_SECONDS
                    else:
                        fetched, retry_at = True, None
                        self.status = fresh
                        self.hub.watch_chains(self.feed, _chains_to_watch(fresh))
                # A status frame goes out only after a fresh read, so that its id (the newest deal
                # event received) never claims more than the status it carries reflects.
                if fetched and (self.seq != sent_seq or self.status != sent_status):
                    sent_seq, sent_status = self.seq, self.status
                    yield self._status_frame()
                    next_beat = time.monotonic() + self.heartbeat
                elif time.monotonic() >= next_beat:
                    yield b": keep-alive\n\n"
                    next_beat = time.monotonic() + self.heartbeat
        finally:
            STREAMS_OPEN.dec()
            self.hub.forget(self.deal_id, self.feed)
            if subscription is not None:
                with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, OSError):
                    await subscription.unsubscribe()
