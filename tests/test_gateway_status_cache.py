"""The gateway's `otc.status` cache: answers from memory that are the engine's own, and never stale for long.

Against real gateway and engine processes (one gateway keeping answers for 30 s, so that only the
cache's invalidation can explain a change seen sooner; one keeping them 3 s and at most 2), and the
cache's own rules with a clock the tests move.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient

from otc_common import subjects
from otc_common.errors import ErrorCode
from otc_common.messages import (
    ChainTip,
    DepositObserved,
    EngineRequest,
    FillPartyDetailsParams,
    Party,
    StatusParams,
    decode_envelope,
    encode_envelope,
)
from otc_gateway.status_cache import StatusCache
from tests.conftest import Stack, create_database, drop_database, reset_streams
from tests.support import ALICE_EVM, BOB_EVM, TEST_SEED_HEX, UNLIMITED_RATES, ServiceProcess

LONG_TTL = 30.0
SHORT_TTL = 3.0
SMALL_SIZE = 2
#: How soon a change the gateway was told about must show, far below LONG_TTL.
PROMPTLY = 3.0
#: Changes the engine makes only after handling a chain event: its own delay comes on top.
AFTER_ENGINE = 10.0

# ----------------------------------------------------------------------------- real processes


class Gateways:
    def __init__(self, stack: Stack, short: ServiceProcess, nc: NatsClient) -> None:
        self.stack = stack
        self.long_url = stack.gateway.url
        self.short_url = short.url
        self.nc = nc
        self.ids = iter(range(1, 1_000_000))

    async def rpc(self, url: str, method: str, params: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
        """The reply, and the exact bytes of its result (None for an error)."""
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{url}/rpc", json=body, timeout=10)
        assert response.status_code == 200, response.text
        raw = msgspec.json.decode(response.content, type=_RawReply)
        return response.json(), (None if raw.error is not None else bytes(raw.result))

    async def status(self, url: str, deal_id: str, token: str | None = None) -> tuple[dict[str, Any], bytes]:
        params = {"dealId": deal_id} if token is None else {"dealId": deal_id, "token": token}
        reply, raw = await self.rpc(url, "otc.status", params)
        assert raw is not None, reply
        result: dict[str, Any] = reply["result"]
        return result, raw

    async def engine(self, method: str, params: msgspec.Struct) -> bytes:
        """Straight to the engine over NATS, past every gateway: the result's bytes as the engine wrote them."""
        request = EngineRequest(method=method, params=msgspec.Raw(msgspec.json.encode(params)))
        msg = await self.nc.request(subjects.ENGINE_RPC, msgspec.json.encode(request), timeout=10)
        reply = msgspec.json.decode(msg.data, type=_RawReply)
        assert reply.error is None, reply.error
        return bytes(reply.result)

    async def publish(self, subject: str, message: Any) -> None:
        """As a watcher does: to JetStream, where the engine's consumer takes it."""
        data = encode_envelope(message)
        await self.nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": secrets.token_hex(8)})


class _RawReply(msgspec.Struct):
    result: msgspec.Raw = msgspec.Raw()
    error: dict[str, Any] | None = None


@pytest.fixture(scope="module")
async def gw(pg_url: str, nats_url: str, registry_file: Path, work_dir: Path) -> AsyncIterator[Gateways]:
    database_url = await create_database(pg_url)
    await reset_streams(nats_url)
    env = {
        "OTC_NATS_URL": nats_url,
        "OTC_DATABASE_URL": database_url,
        "OTC_REGISTRY_FILE": str(registry_file),
        "OTC_SEED": TEST_SEED_HEX,
        # The registry's chains are not running: no balance checks against them.
        "OTC_SOLVENCY_INTERVAL_SECONDS": "86400",
    }
    stack = Stack(env, work_dir, gateway_env={"OTC_STATUS_CACHE_SECONDS": str(LONG_TTL)})
    short = ServiceProcess(
        "gateway-short-cache",
        ["-m", "otc_gateway"],
        {
            **env,
            **UNLIMITED_RATES,
            "OTC_STATUS_CACHE_SECONDS": str(SHORT_TTL),
            "OTC_STATUS_CACHE_SIZE": str(SMALL_SIZE),
        },
        work_dir,
    )
    await stack.start()
    await short.start()
    nc = await nats.connect(nats_url)
    try:
        yield Gateways(stack, short, nc)
    finally:
        await nc.close()
        await short.stop()
        await stack.stop()
        await drop_database(pg_url, database_url)


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics", timeout=10)).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in the metrics"
    return float(found.group(1))


HITS = 'otc_gateway_status_cache_lookups_total{outcome="hit"}'
ENTRIES = "otc_gateway_status_cache_entries"


async def eventually(check: Callable[[], Awaitable[Any]], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        outcome = await check()
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.02)


ETH_FOR_USDT = (
    {"chainId": "ETH", "asset": "ETH", "amount": "1.5"},
    {"chainId": "POLYGON", "asset": "USDT", "amount": "40000"},
)
#: On chains no test here sends events of: an answer about such a deal is kept for the whole time-to-live.
QUIET_CHAINS = (
    {"chainId": "UNICITY", "asset": "ALPHA", "amount": "3"},
    {"chainId": "POLYGON", "asset": "MATIC", "amount": "7"},
)


async def new_deal(
    gw: Gateways, url: str, sides: tuple[dict[str, str], dict[str, str]] = ETH_FOR_USDT
) -> dict[str, Any]:
    params = {"alice": sides[0], "bob": sides[1], "timeoutSeconds": 3600}
    reply, _ = await gw.rpc(url, "otc.createDeal", params)
    deal: dict[str, Any] = reply["result"]
    return deal


async def fill(gw: Gateways, url: str, deal: dict[str, Any], party: str) -> None:
    token = deal["aliceToken"] if party == "ALICE" else deal["bobToken"]
    payback, recipient = (ALICE_EVM, BOB_EVM) if party == "ALICE" else (BOB_EVM, ALICE_EVM)
    params = {
        "dealId": deal["dealId"],
        "party": party,
        "token": token,
        "paybackAddress": payback,
        "recipientAddress": recipient,
    }
    reply, _ = await gw.rpc(url, "otc.fillPartyDetails", params)
    assert reply.get("result") == {"ok": True}, reply


async def next_deal_event(subscription: Any, wanted: str) -> Any:
    """The next deal event of type `wanted` the engine published (earlier ones of other types skipped)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = await subscription.next_msg(timeout=max(0.1, deadline - time.monotonic()))
        envelope, payload = decode_envelope(msg.data)
        if envelope.type == wanted:
            return payload
    raise AssertionError(f"no {wanted} event")


async def test_cached_status_is_the_engines_answer_and_follows_stage_and_deposit_events(gw: Gateways) -> None:
    url = gw.long_url
    deal = await new_deal(gw, url)
    deal_id, alice_token = deal["dealId"], deal["aliceToken"]
    await fill(gw, url, deal, "ALICE")

    first, first_raw = await gw.status(url, deal_id, alice_token)
    assert (first["stage"], first["viewer"]) == ("CREATED", "ALICE")
    hits = await metric(url, HITS)
    _, again_raw = await gw.status(url, deal_id, alice_token)
    assert await metric(url, HITS) == hits + 1, "the second call was not answered from memory"
    # Byte for byte the engine's own answer, asked directly.
    engine_raw = await gw.engine("otc.status", StatusParams(deal_id=deal_id, token=alice_token))
    assert again_raw == first_raw == engine_raw

    # Bob fills his details at the engine itself, past this gateway: only the deal events can tell it.
    events = await gw.nc.subscribe(subjects.deal(deal_id))
    fill_bob = FillPartyDetailsParams(
        deal_id=deal_id,
        party=Party.BOB,
        payback_address=BOB_EVM,
        recipient_address=ALICE_EVM,
        token=deal["bobToken"],
    )
    await gw.engine("otc.fillPartyDetails", fill_bob)
    changed = await next_deal_event(events, "deal.stage_changed")
    assert changed.stage == "COLLECTION"

    async def in_collection() -> dict[str, Any] | None:
        status, _ = await gw.status(url, deal_id, alice_token)
        return status if status["stage"] == "COLLECTION" else None

    status = await eventually(in_collection, PROMPTLY, "the cached status shows the stage change")
    escrow = status["instructions"]["alice"]["to"]
    required = status["instructions"]["alice"]["amount"]
    assert required == "1.5055"

    # Alice's whole deposit, seen in block 10 by the ETH watcher: the engine tells the side is funded.
    await gw.publish(
        subjects.chain_event("ETH", "deposit"),
        DepositObserved(
            chain="ETH",
            address=escrow,
            asset="ETH",
            txid="0x" + secrets.token_hex(32),
            index=-1,
            amount=1_505_500_000_000_000_000,
            block_number=10,
            block_hash="0x" + secrets.token_hex(32),
            block_time=int(time.time()),
        ),
    )
    funded = await next_deal_event(events, "deal.side_funded")
    assert funded.party == "ALICE"

    async def deposited() -> dict[str, Any] | None:
        status, _ = await gw.status(url, deal_id, alice_token)
        return status if status["collection"]["alice"]["deposited"] == required else None

    status = await eventually(deposited, PROMPTLY, "the cached status shows the deposit")
    [deposit] = status["collection"]["alice"]["deposits"]
    assert deposit["blockHeight"] == 10 and deposit["confirmations"] == 0  # no tip of ETH known yet
    await events.unsubscribe()

    # Confirmations change with each tip and no deal event announces them (ETH needs 2).
    for height, confirmations in ((10, 1), (11, 2)):
        await gw.publish(
            subjects.chain_event("ETH", "tip"),
            ChainTip(chain="ETH", height=height, hash="0x" + secrets.token_hex(32), time=int(time.time())),
        )

        async def confirmed(expected: int = confirmations) -> dict[str, Any] | None:
            status, _ = await gw.status(url, deal_id, alice_token)
            counts = [d["confirmations"] for d in status["collection"]["alice"]["deposits"]]
            return status if counts == [expected] else None

        status = await eventually(confirmed, AFTER_ENGINE, f"the cached status shows {confirmations} confirmations")
    assert status["collection"]["alice"]["locked"] is True
    engine_raw = await gw.engine("otc.status", StatusParams(deal_id=deal_id, token=alice_token))
    _, cached_raw = await gw.status(url, deal_id, alice_token)
    assert cached_raw == engine_raw


async def test_a_wrong_token_is_refused_and_never_kept(gw: Gateways) -> None:
    url = gw.long_url
    deal = await new_deal(gw, url)
    await fill(gw, url, deal, "ALICE")
    deal_id = deal["dealId"]
    for _ in range(2):
        alice, _ = await gw.status(url, deal_id, deal["aliceToken"])
    assert alice["viewer"] == "ALICE" and alice["alice"]["email"] is None
    entries = await metric(url, ENTRIES)
    wrong = secrets.token_urlsafe(24)
    for _ in range(3):
        reply, raw = await gw.rpc(url, "otc.status", {"dealId": deal_id, "token": wrong})
        assert raw is None and reply["error"]["code"] == ErrorCode.INVALID_TOKEN, reply
    # Another deal's valid token is just as wrong here.
    other = await new_deal(gw, url)
    reply, _ = await gw.rpc(url, "otc.status", {"dealId": deal_id, "token": other["aliceToken"]})
    assert reply["error"]["code"] == ErrorCode.INVALID_TOKEN, reply
    assert await metric(url, ENTRIES) == entries, "a refused token's answer was kept"
    bob, _ = await gw.status(url, deal_id, deal["bobToken"])
    assert bob["viewer"] == "BOB"
    public, _ = await gw.status(url, deal_id)
    assert public["viewer"] is None and "email" not in public["alice"]


async def test_the_time_to_live_bounds_what_no_event_announces(gw: Gateways) -> None:
    url = gw.short_url
    deal = await new_deal(gw, url, QUIET_CHAINS)
    deal_id = deal["dealId"]
    conn = await asyncpg.connect(gw.stack.database_url)
    try:
        # The deal's own events (created, escrows assigned) drop what was kept of it: let them pass first.
        await eventually(lambda: conn.fetchval("SELECT count(*) = 0 FROM engine.outbox"), 30, "the outbox drained")
        while True:
            cached_at = time.monotonic()
            before, _ = await gw.status(url, deal_id)
            hits = await metric(url, HITS)
            await gw.status(url, deal_id)
            if await metric(url, HITS) == hits + 1:
                break
        # A change behind the engine's back: no event tells any gateway.
        await conn.execute("UPDATE engine.deals SET name = 'renamed quietly' WHERE deal_id = $1", deal_id)
    finally:
        await conn.close()
    stale, _ = await gw.status(url, deal_id)
    assert stale["name"] == before["name"], "not served from memory"

    async def renamed() -> bool:
        status, _ = await gw.status(url, deal_id)
        return bool(status["name"] == "renamed quietly")

    await eventually(renamed, SHORT_TTL + PROMPTLY, "the time-to-live ends the stale answer")
    assert time.monotonic() - cached_at >= SHORT_TTL * 0.9, "the answer was not kept for its time-to-live"


async def test_the_cache_holds_no_more_answers_than_its_size(gw: Gateways) -> None:
    url = gw.short_url
    deals = [await new_deal(gw, url) for _ in range(SMALL_SIZE + 2)]
    for deal in deals:
        await gw.status(url, deal["dealId"])
        await gw.status(url, deal["dealId"], deal["aliceToken"])
        assert await metric(url, ENTRIES) <= SMALL_SIZE
    assert await metric(url, ENTRIES) == SMALL_SIZE


# ----------------------------------------------------------------------------- a gateway and a stand-in engine
# A NATS server of their own, where the test answers the engine's requests itself and publishes no deal
# event unless it says so: what the gateway then serves can only come from its own rules.


class StandInEngine:
    """Answers otc.status and otc.cancelDeal for one deal, counting the calls and holding answers on request."""

    DEAL = "deal-1"
    TOKENS = {"A" * 32: "ALICE", "B" * 32: "BOB"}

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.stage = "CREATED"
        self.calls: dict[str, int] = {}
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()

    async def on_request(self, msg: Any) -> None:
        request = msgspec.json.decode(msg.data, type=EngineRequest)
        params = msgspec.json.decode(request.params)
        self.calls[request.method] = self.calls.get(request.method, 0) + 1
        token = params.get("token")
        if token is not None and token not in self.TOKENS:
            await msg.respond(msgspec.json.encode({"error": {"code": 1002, "message": "the token is not valid"}}))
            return
        if request.method == "otc.cancelDeal":
            self.stage = "CLOSED"
            await msg.respond(msgspec.json.encode({"result": {"ok": True, "stage": "CLOSED"}}))
            return
        viewer = None if token is None else self.TOKENS[token]
        document = answer(viewer=viewer, stage=self.stage)
        self.holding.set()
        await self.hold.wait()
        await msg.respond(b'{"result":' + document + b"}")


class LoneGateway:
    def __init__(self, process: ServiceProcess, engine: StandInEngine) -> None:
        self.process = process
        self.engine = engine
        self.ids = iter(range(1, 1_000_000))

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{self.process.url}/rpc", json=body, timeout=10)
        reply: dict[str, Any] = response.json()
        return reply

    async def status(self, token: str | None = None) -> dict[str, Any]:
        params = {"dealId": StandInEngine.DEAL, **({"token": token} if token else {})}
        return await self.call("otc.status", params)


@pytest.fixture
async def lone(work_dir: Path, registry_file: Path) -> AsyncIterator[LoneGateway]:
    from otc_cli.servers import free_port, start_nats

    name = secrets.token_hex(4)
    server = start_nats(work_dir / f"nats-{name}", free_port(), work_dir / f"nats-{name}.log")
    nc = await nats.connect(server.url)
    engine = StandInEngine(nc)
    await nc.subscribe(subjects.ENGINE_RPC, cb=engine.on_request)
    process = ServiceProcess(
        "gateway-stand-in-engine",
        ["-m", "otc_gateway"],
        {
            "OTC_NATS_URL": server.url,
            "OTC_REGISTRY_FILE": str(registry_file),
            "OTC_STATUS_CACHE_SECONDS": str(LONG_TTL),
            **UNLIMITED_RATES,
        },
        work_dir,
    )
    try:
        await process.start()
        yield LoneGateway(process, engine)
    finally:
        await process.stop()
        await nc.close()
        server.stop()


async def test_a_command_through_the_gateway_shows_in_its_next_status(lone: LoneGateway) -> None:
    for _ in range(3):
        assert (await lone.status())["result"]["stage"] == "CREATED"
    assert lone.engine.calls["otc.status"] == 1
    reply = await lone.call("otc.cancelDeal", {"dealId": StandInEngine.DEAL, "token": "B" * 32})
    assert reply["result"]["stage"] == "CLOSED"
    # No deal event was published: the gateway knows from the command it forwarded itself.
    assert (await lone.status())["result"]["stage"] == "CLOSED"
    assert lone.engine.calls["otc.status"] == 2


async def test_an_answer_overtaken_by_a_deal_event_is_not_served_again(lone: LoneGateway) -> None:
    lone.engine.hold.clear()
    first = asyncio.create_task(lone.status())
    await asyncio.wait_for(lone.engine.holding.wait(), 10)
    # The deal changes while the engine's answer is on its way: that answer is already out of date.
    await lone.engine.nc.publish(subjects.deal(StandInEngine.DEAL), b"{}")
    lone.engine.hold.set()
    assert (await first)["result"]["stage"] == "CREATED"
    await lone.status()
    assert lone.engine.calls["otc.status"] == 2, "an answer older than the deal event was served"
    await lone.status()
    assert lone.engine.calls["otc.status"] == 2


async def test_only_tokens_the_engine_accepted_are_answered_from_memory(lone: LoneGateway) -> None:
    alice = (await lone.status("A" * 32))["result"]
    assert alice["viewer"] == "ALICE"
    assert (await lone.status("A" * 32))["result"] == alice
    assert lone.engine.calls["otc.status"] == 1
    wrong = "C" * 32
    for attempt in range(1, 4):
        reply = await lone.status(wrong)
        assert reply["error"]["code"] == ErrorCode.INVALID_TOKEN
        assert lone.engine.calls["otc.status"] == 1 + attempt, "a wrong token was not taken to the engine"
    bob = (await lone.status("B" * 32))["result"]
    assert bob["viewer"] == "BOB"
    public = (await lone.status())["result"]
    assert public["viewer"] is None
    assert lone.engine.calls["otc.status"] == 6


# ----------------------------------------------------------------------------- the cache's own rules


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += timedelta(seconds=seconds)


class FakeNats:
    """The parts of a NATS connection the cache looks at."""

    def __init__(self) -> None:
        self.is_connected = True
        self.stats = {"reconnects": 0}
        self.subjects: list[str] = []

    async def subscribe(self, subject: str, cb: Any) -> None:
        self.subjects.append(subject)


def answer(viewer: str | None = None, stage: str = "COLLECTION", **fields: Any) -> bytes:
    document = {
        "dealId": "d1",
        "name": "d1",
        "stage": stage,
        "outcome": None,
        "expiresAt": None,
        "remainingSeconds": None,
        "alice": {"chainId": "ETH"},
        "bob": {"chainId": "POLYGON"},
        "viewer": viewer,
        **fields,
    }
    return msgspec.json.encode(document)


def cache(ttl: float = 2.0, size: int = 100) -> tuple[StatusCache, Clock]:
    clock = Clock()
    return StatusCache(ttl, size, clock=clock, wall_clock=lambda: clock.wall), clock


TOKEN_A = "a" * 32
TOKEN_B = "b" * 32


def test_tokens_are_kept_only_as_the_engine_accepted_them() -> None:
    kept, _ = cache()
    # An answer that names no viewer (the engine did not accept the token) is not kept for that token.
    kept.store("d1", TOKEN_A, kept.started(), answer(viewer=None))
    assert len(kept) == 0 and kept.lookup("d1", TOKEN_A) is None
    kept.store("d1", TOKEN_A, kept.started(), answer(viewer="ALICE"))
    assert kept.lookup("d1", TOKEN_A) == answer(viewer="ALICE")
    assert kept.lookup("d1", TOKEN_B) is None  # Bob's token, or a wrong one: the engine decides
    assert kept.lookup("d1", None) is None  # the public view is another answer
    assert kept.lookup("d2", TOKEN_A) is None
    # A token-less answer naming a viewer is not what a token-less call gets: never kept.
    kept.store("d1", None, kept.started(), answer(viewer="ALICE"))
    assert kept.lookup("d1", None) is None
    for entry in kept._entries.values():
        for value in (getattr(entry, name) for name in entry.__slots__):
            assert TOKEN_A not in str(value)  # as text or as bytes


def test_an_answer_fetched_before_a_deal_change_is_never_served() -> None:
    kept, clock = cache()
    started = kept.started()
    clock.advance(0.01)
    kept.deal_changed("d1")  # a deal event arrives while the engine call is in flight
    clock.advance(0.01)
    kept.store("d1", None, started, answer())
    assert kept.lookup("d1", None) is None
    kept.store("d1", None, kept.started(), answer())
    assert kept.lookup("d1", None) is not None
    kept.deal_changed("d2")
    assert kept.lookup("d1", None) is not None
    clock.advance(0.01)
    kept.deal_changed("d1")
    assert kept.lookup("d1", None) is None


def test_after_a_chain_event_answers_are_trusted_as_long_as_the_deal_was_quiet() -> None:
    kept, clock = cache(ttl=2.0)
    kept.store("d1", None, kept.started(), answer())
    clock.advance(0.5)
    kept.chain_touched("POLYGON")  # a tip of one of the deal's chains
    assert kept.lookup("d1", None) is None
    clock.advance(0.2)
    kept.store("d1", None, kept.started(), answer())  # fetched 0.2 s after the tip: served for 0.2 s
    clock.advance(0.19)
    assert kept.lookup("d1", None) is not None
    clock.advance(0.02)
    assert kept.lookup("d1", None) is None
    kept.store("d1", None, kept.started(), answer())  # 0.41 s after: served for 0.41 s
    clock.advance(0.4)
    assert kept.lookup("d1", None) is not None
    clock.advance(0.02)
    assert kept.lookup("d1", None) is None
    # Another chain's events do not concern this deal.
    kept.store("d1", None, kept.started(), answer())
    kept.chain_touched("UNICITY")
    clock.advance(0.5)
    assert kept.lookup("d1", None) is not None
    # A payout result naming the deal works the same way.
    kept.deal_touched("d1")
    assert kept.lookup("d1", None) is None


def test_the_time_to_live_bounds_every_answer() -> None:
    kept, clock = cache(ttl=1.5)
    kept.store("d1", None, kept.started(), answer())
    clock.advance(1.49)
    assert kept.lookup("d1", None) is not None
    clock.advance(0.02)
    assert kept.lookup("d1", None) is None
    assert len(kept) == 0
    off, _ = cache(ttl=0)
    off.store("d1", None, off.started(), answer())
    assert off.lookup("d1", None) is None


def test_the_least_recently_used_answers_go_first_beyond_the_size() -> None:
    kept, _ = cache(size=3)
    for index in range(10):
        kept.store(f"d{index}", None, kept.started(), answer())
        assert len(kept) <= 3
    assert [kept.lookup(f"d{index}", None) is not None for index in (7, 8, 9)] == [True] * 3
    assert kept.lookup("d6", None) is None
    kept.lookup("d7", None)  # used: d8 is now the oldest
    kept.store("d10", None, kept.started(), answer())
    assert kept.lookup("d8", None) is None and kept.lookup("d7", None) is not None


async def test_a_reconnected_bus_drops_everything_and_a_lost_one_bypasses_memory() -> None:
    kept, clock = cache()
    nc = FakeNats()
    await kept.start(nc)
    assert subjects.ALL_DEALS in nc.subjects
    clock.advance(0.01)
    kept.store("d1", None, kept.started(), answer())
    assert kept.lookup("d1", None) is not None
    nc.is_connected = False
    assert kept.lookup("d1", None) is None
    nc.is_connected = True
    nc.stats["reconnects"] += 1
    assert kept.lookup("d1", None) is None and len(kept) == 0
    clock.advance(0.01)
    kept.store("d1", None, kept.started(), answer())
    assert kept.lookup("d1", None) is not None


def test_remaining_seconds_of_a_running_deadline_are_worked_out_when_served() -> None:
    kept, clock = cache(ttl=10)
    deadline = clock.wall + timedelta(seconds=100)
    kept.store("d1", None, kept.started(), answer(expiresAt=deadline.isoformat(), remainingSeconds=100))
    clock.advance(3.4)
    served = kept.lookup("d1", None)
    assert served is not None
    document = msgspec.json.decode(served)
    assert document["remainingSeconds"] == 96
    assert served == answer(expiresAt=deadline.isoformat(), remainingSeconds=96)
    # A paused deadline (WAITING) keeps the engine's figure as it is.
    kept.store("d2", None, kept.started(), answer(stage="WAITING", remainingSeconds=40))
    clock.advance(2)
    assert kept.lookup("d2", None) == answer(stage="WAITING", remainingSeconds=40)
