"""`otc.status` answers kept in this process's memory, so that polling clients cost no engine call.

The engine stays the authority: an answer is kept only as the engine gave it, and only as long as
nothing it could depend on may have changed.

- Keyed by deal and viewer: no token, or the party whose token the engine accepted. Of a token only
  its SHA-256 is kept, and only once the engine has accepted it; a token is matched against both
  parties' digests in constant time. An unknown or wrong token always goes to the engine, and the
  engine's refusal is never kept.
- Each answer remembers when the call that fetched it *started*. Anything that may change a deal
  leaves a mark with the time it was seen, and an answer whose call started before a mark of its
  deal (or of a chain the deal uses) is stale. A call still in flight when its deal changes is
  therefore never served, which plain deletion could not guarantee.
- Deal events (`otc.deal.<id>`, published only after the engine committed them) and the commands
  this gateway forwarded for a deal change it *now*. Chain tips, deposits and reorgs of the deal's
  chains, and payout and gas results naming the deal, change it only once the engine has handled
  them, a moment later that nothing here can observe: what was fetched before such an event is
  dropped, and what is fetched after it is trusted for as long as the deal had been quiet before
  it was fetched (at least MIN_TRUST_SECONDS): an answer fetched 0.1 s after a tip is served for
  0.1 s, the next one, fetched 0.2 s after the tip, for 0.2 s, and so on up to the time-to-live.
  However long the engine takes to handle the event, an answer that predates its effect is
  therefore not served for much longer than that.
- A time-to-live bounds the rest (a lost core NATS message, a change no event announces); every
  answer is dropped when the NATS connection has been re-established, since messages may have been
  missed while it was down, and nothing is served from memory while it is down.
- At most `max_entries` answers, the least recently used dropped first.
- `remainingSeconds` counts down while a deadline runs: where the engine gives it next to a running
  deadline (`expiresAt` in COLLECTION), it is worked out again from `expiresAt` when served.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Gauge

from otc_common import subjects

log = logging.getLogger("otc.gateway.status_cache")

#: The least time an answer fetched right after a chain or payout event of its deal is served for.
MIN_TRUST_SECONDS = 0.05
#: Viewer slot of answers given without a token.
ANONYMOUS = ""
PARTIES = ("ALICE", "BOB")
DEAL_SUBJECT_PREFIX = subjects.deal("")
CHAIN_EVENT_KINDS = ("tip", "deposit", "reorg")

LOOKUPS = Counter("otc_gateway_status_cache_lookups_total", "otc.status answers looked up in memory", ["outcome"])
ENTRIES = Gauge("otc_gateway_status_cache_entries", "otc.status answers held in memory")
_HIT = LOOKUPS.labels("hit")
_MISS = LOOKUPS.labels("miss")
_STALE = LOOKUPS.labels("stale")


class Connection(Protocol):
    """What the cache needs of the NATS connection."""

    @property
    def is_connected(self) -> bool: ...

    stats: dict[str, int]

    async def subscribe(self, subject: str, *, cb: Callable[[Msg], Awaitable[None]]) -> Any: ...


class _Side(msgspec.Struct, rename="camel"):
    chain_id: str


class _Head(msgspec.Struct, rename="camel"):
    """The fields of an answer the cache itself looks at; the rest is kept as bytes."""

    stage: str
    alice: _Side
    bob: _Side
    viewer: str | None = None
    expires_at: str | None = None
    remaining_seconds: int | None = None


class _DealRef(msgspec.Struct):
    deal_id: str | None = None


class _Result(msgspec.Struct):
    payload: _DealRef


_head_decoder = msgspec.json.Decoder(_Head)
_result_decoder = msgspec.json.Decoder(_Result)
_encoder = msgspec.json.Encoder()


class _Entry:
    __slots__ = ("body", "chains", "deadline", "started", "token_digest")

    def __init__(
        self, body: bytes, started: float, chains: tuple[str, ...], token_digest: bytes, deadline: datetime | None
    ) -> None:
        self.body = body
        self.started = started
        self.chains = chains
        self.token_digest = token_digest
        #: Set where remainingSeconds counts down to it and is worked out when served.
        self.deadline = deadline


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def remaining_seconds(deadline: datetime, now: datetime) -> int:
    return max(0, int((deadline - now).total_seconds()))


class _Marks:
    """When each key was last seen to change; marks older than any live answer are forgotten."""

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self._at: OrderedDict[str, float] = OrderedDict()

    def set(self, key: str, now: float) -> None:
        self._at[key] = now
        self._at.move_to_end(key)
        while self._at:
            oldest = next(iter(self._at.values()))
            if now - oldest <= self.keep:
                break
            self._at.popitem(last=False)

    def get(self, key: str) -> float | None:
        return self._at.get(key)


class StatusCache:
    def __init__(
        self,
        ttl: float,
        max_entries: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        min_trust: float = MIN_TRUST_SECONDS,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self.wall_clock = wall_clock
        self.min_trust = min_trust
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        # An answer lives at most `ttl`; one fetched more than `ttl` after a mark is not shortened by it.
        self._changed = _Marks(ttl)  # deals changed now: deal events, commands forwarded
        self._touched = _Marks(2 * ttl)  # deals changed once the engine handles a result naming them
        self._chains = _Marks(2 * ttl)  # chains whose tip, deposits or reorg the engine is handling
        self._cleared_at = float("-inf")
        self._connection: Connection | None = None
        self._reconnects = 0
        self._subscriptions: list[Subscription] = []
        self._shape_warned = False

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self._entries)

    # ----------------------------------------------------------------- serving

    def lookup(self, deal_id: str, token: str | None) -> bytes | None:
        """The kept answer for this deal and token, or None: then ask the engine (and `store` its answer)."""
        if not self.enabled or not self._connection_sound():
            return None
        if token is None:
            key = (deal_id, ANONYMOUS)
            entry = self._entries.get(key)
        else:
            digest = token_digest(token)
            key, entry = (deal_id, ANONYMOUS), None
            # Both parties' digests are compared every time, so the time taken tells nothing.
            for party in PARTIES:
                candidate = self._entries.get((deal_id, party))
                if candidate is not None and hmac.compare_digest(candidate.token_digest, digest):
                    key, entry = (deal_id, party), candidate
        if entry is None:
            _MISS.inc()
            return None
        if not self._fresh(deal_id, entry, self.clock()):
            del self._entries[key]
            ENTRIES.set(len(self._entries))
            _STALE.inc()
            return None
        self._entries.move_to_end(key)
        _HIT.inc()
        if entry.deadline is None:
            return entry.body
        document = msgspec.json.decode(entry.body)
        document["remainingSeconds"] = remaining_seconds(entry.deadline, self.wall_clock())
        return _encoder.encode(document)

    def started(self) -> float:
        """The time to hand back to `store` with the answer of an engine call starting now."""
        return self.clock()

    def store(self, deal_id: str, token: str | None, started: float, body: bytes) -> None:
        """Keeps the engine's answer to a call that began at `started`, unless something changed since."""
        if not self.enabled:
            return
        try:
            head = _head_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not self._shape_warned:
                # Once per process: every later answer of that shape would say the same.
                self._shape_warned = True
                log.warning("otc.status answers are not kept: unexpected shape (%s)", exc)
            return
        if token is None:
            if head.viewer is not None:
                return
            viewer, digest = ANONYMOUS, b""
        else:
            # Only a token the engine accepted, and for the party it named, is ever remembered.
            if head.viewer not in PARTIES:
                return
            viewer, digest = head.viewer, token_digest(token)
        deadline = None
        if head.stage == "COLLECTION" and head.expires_at is not None and head.remaining_seconds is not None:
            try:
                deadline = datetime.fromisoformat(head.expires_at)
            except ValueError:
                return
            if deadline.tzinfo is None:
                return
        entry = _Entry(bytes(body), started, (head.alice.chain_id, head.bob.chain_id), digest, deadline)
        if not self._fresh(deal_id, entry, self.clock()):
            return
        key = (deal_id, viewer)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        ENTRIES.set(len(self._entries))

    def _fresh(self, deal_id: str, entry: _Entry, now: float) -> bool:
        started = entry.started
        age = now - started
        if age >= self.ttl or started <= self._cleared_at:
            return False
        changed = self._changed.get(deal_id)
        if changed is not None and started <= changed:
            return False
        touches = [self._touched.get(deal_id), *(self._chains.get(chain) for chain in entry.chains)]
        touched = max((t for t in touches if t is not None), default=None)
        if touched is not None:
            if started <= touched:
                return False
            if age >= max(self.min_trust, started - touched):
                return False
        return True

    def _connection_sound(self) -> bool:
        connection = self._connection
        if connection is None:
            return True
        if not connection.is_connected:
            return False
        reconnects = connection.stats.get("reconnects", 0)
        if reconnects != self._reconnects:
            # Messages published while the connection was down never reached the subscriptions.
            self._reconnects = reconnects
            self.clear()
        return True

    # ----------------------------------------------------------------- what changes a deal

    def deal_changed(self, deal_id: str) -> None:
        """The deal has changed, and the engine already shows it (a deal event, a command's reply)."""
        self._changed.set(deal_id, self.clock())

    def deal_touched(self, deal_id: str) -> None:
        """The engine is about to handle something about this deal (a payout or gas result)."""
        self._touched.set(deal_id, self.clock())

    def chain_touched(self, chain: str) -> None:
        """The engine is about to handle a tip, deposit or reorg of this chain."""
        self._chains.set(chain, self.clock())

    def clear(self) -> None:
        self._entries.clear()
        self._cleared_at = self.clock()
        ENTRIES.set(0)

    # ----------------------------------------------------------------- the bus

    async def start(self, nc: Connection) -> None:
        """Subscribes to everything that changes what `otc.status` shows (core NATS, no consumer state)."""
        self._connection = nc
        self._reconnects = nc.stats.get("reconnects", 0)
        if not self.enabled:
            return
        self._subscriptions = [await nc.subscribe(subjects.ALL_DEALS, cb=self._on_deal_event)]
        for kind in CHAIN_EVENT_KINDS:
            self._subscriptions.append(await nc.subscribe(subjects.chain_event("*", kind), cb=self._on_chain_event))
        self._subscriptions.append(await nc.subscribe(subjects.queue_result("*"), cb=self._on_result))
        self._subscriptions.append(await nc.subscribe(subjects.tank_result("*"), cb=self._on_result))
        # Anything published before the subscriptions existed was never seen.
        self.clear()

    async def _on_deal_event(self, msg: Msg) -> None:
        deal_id = msg.subject[len(DEAL_SUBJECT_PREFIX) :]
        if deal_id:
            self.deal_changed(deal_id)

    async def _on_chain_event(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) == 4:
            self.chain_touched(parts[2])

    async def _on_result(self, msg: Msg) -> None:
        try:
            deal_id = _result_decoder.decode(msg.data).payload.deal_id
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if deal_id:
            self.deal_touched(deal_id)
