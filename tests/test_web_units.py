"""The gateway's pure pieces: rate-limit buckets, page decisions, header and origin rules, SSE framing, OpenRPC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from otc_common.errors import AppError, ErrorCode
from otc_common.messages import RPC_PARAMS, Party
from otc_common.registry import load_registry
from otc_gateway.live import frame, parse_last_event_id
from otc_gateway.openrpc import DISCOVER, build_document
from otc_gateway.ratelimit import Limits, TokenBuckets, retry_after_seconds
from otc_gateway.rpc import retry_after
from otc_gateway.security import is_json, origin_allowed, origin_of
from otc_gateway.views import (
    countdown,
    describe_event,
    explorer_link,
    format_duration,
    outcome_banner,
    party_view,
    valid_link,
)
from otc_gateway.web import qr_svg

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------- rate limits


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("x") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.take("x")
    assert wait == pytest.approx(0.5)
    assert buckets.take("y") == 0.0  # keys are independent
    clock.now += 0.5
    assert buckets.take("x") == 0.0
    assert buckets.take("x") > 0
    clock.now += 100
    assert [buckets.take("x") for _ in range(3)] == [0.0, 0.0, 0.0]  # never more than the burst
    assert buckets.take("x") > 0


def test_refused_calls_are_not_charged_and_costs_above_the_burst_stay_payable() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=4, clock=clock)
    assert buckets.take("x", cost=3) == 0.0
    assert buckets.take("x", cost=3) == pytest.approx(2.0)
    assert buckets.take("x", cost=3) == pytest.approx(2.0)  # the refusal cost nothing
    clock.now += 2
    assert buckets.take("x", cost=3) == 0.0
    clock.now += 10
    assert buckets.take("x", cost=50) == 0.0  # charged as the whole burst


def test_buckets_are_pruned_when_keys_pile_up() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=2, clock=clock, max_keys=10)
    for i in range(50):
        buckets.take(f"k{i}")
        clock.now += 0.01
    assert len(buckets) <= 10


def test_limits_raise_1011_with_retry_after() -> None:
    clock = Clock()
    limits = Limits(1.0, 2, 0.5, 1, clock=clock)
    limits.check_client("1.2.3.4", 2)
    with pytest.raises(AppError) as refused:
        limits.check_client("1.2.3.4")
    assert refused.value.code is ErrorCode.RATE_LIMITED
    assert refused.value.data == {"retryAfterSeconds": 1}
    limits.check_deal("d1")
    with pytest.raises(AppError) as deal:
        limits.check_deal("d1")
    assert deal.value.data == {"retryAfterSeconds": 2} and "deal" in deal.value.message
    assert retry_after_seconds(0.01) == 1 and retry_after_seconds(2.2) == 3


def test_retry_after_of_a_response_document() -> None:
    error = {"code": 1011, "message": "x", "data": {"retryAfterSeconds": 3}}
    limited: dict[str, Any] = {"jsonrpc": "2.0", "error": error, "id": 1}
    other = {"jsonrpc": "2.0", "error": {"code": 1001, "message": "y"}, "id": 2}
    assert retry_after(limited) == 3
    longer = {**limited, "error": {**limited["error"], "data": {"retryAfterSeconds": 7}}}
    assert retry_after([other, limited, longer]) == 7
    assert retry_after(other) is None and retry_after([other]) is None
    # The engine's own 1011 (invitations per hour) says nothing about when: no header then.
    assert retry_after({"jsonrpc": "2.0", "error": {"code": 1011, "message": "z"}, "id": 3}) is None
    assert retry_after({"jsonrpc": "2.0", "error": {"code": 1011, "message": "z", "data": "soon"}, "id": 3}) is None


# ----------------------------------------------------------------------------- security rules


def test_origin_and_content_type_rules() -> None:
    allowed = origin_of("https://otc.example/")
    assert allowed == "https://otc.example"
    assert origin_of("https://OTC.example:443/x") == allowed
    assert origin_of("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert origin_allowed(None, allowed)
    assert origin_allowed("https://otc.example", allowed)
    for foreign in ("https://evil.example", "null", "http://otc.example", "https://otc.example:8443", "", "x"):
        assert not origin_allowed(foreign, allowed), foreign
    assert is_json("application/json") and is_json("Application/JSON; charset=utf-8")
    refused = (None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/jsonx")
    for other in refused:
        assert not is_json(other), other


def test_links_are_checked_before_anything_is_asked() -> None:
    assert valid_link("a1b2c3", "A" * 32)
    assert not valid_link("a.b", "A" * 32)
    assert not valid_link("a1", "short")
    assert not valid_link("a1", "A" * 31 + "/")
    assert not valid_link("a1", "\uff21" * 32)  # fullwidth letters are not ASCII


# ----------------------------------------------------------------------------- SSE framing


def test_last_event_id_parsing_and_frames() -> None:
    assert parse_last_event_id(None) == 0
    assert parse_last_event_id(" 42 ") == 42
    for junk in ("", "-1", "1.5", "abc", "1" * 21, "١٢"):
        assert parse_last_event_id(junk) == 0, junk
    data = frame("status", {"text": "two\nlines"}, 7)
    assert data == b'id: 7\nevent: status\ndata: {"text":"two\\nlines"}\n\n'
    assert frame("view", {}, 0).startswith(b"event: view\n")


# ----------------------------------------------------------------------------- page decisions


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support import write_test_registry

    path = write_test_registry(Path(tmp_path_factory.mktemp("reg")) / "registry.toml")
    return load_registry(str(path), environ={"OTC_CHAIN_ETH_EXPLORER_TX_URL": "https://etherscan.io/tx/{txid}"})


def status(stage: str = "CREATED", **overrides: Any) -> dict[str, Any]:
    side = {"filled": False, "paybackAddress": None, "recipientAddress": None}
    body: dict[str, Any] = {
        "dealId": "d1",
        "name": "test",
        "stage": stage,
        "outcome": None,
        "timeoutSeconds": 3600,
        "expiresAt": None,
        "remainingSeconds": None,
        "alice": {**side, "chainId": "ETH", "asset": "ETH", "amount": "1.5"},
        "bob": {**side, "chainId": "POLYGON", "asset": "USDT", "amount": "40000"},
        "instructions": {"alice": None, "bob": None},
        "collection": {
            party: {"deposited": "0", "confirmed": "0", "locked": False, "deposits": []} for party in ("alice", "bob")
        },
        "transfers": [],
        "events": [{"type": "deal.created", "at": NOW.isoformat(), "detail": {"name": "test"}}],
    }
    body.update(overrides)
    return body


def test_countdown_runs_only_in_collection_and_pauses_in_waiting() -> None:
    assert countdown(status("CREATED"), NOW) == {"state": "not_started", "seconds": 3600}
    running = status("COLLECTION", expiresAt=(NOW + timedelta(seconds=90.6)).isoformat())
    assert countdown(running, NOW) == {"state": "running", "seconds": 90}
    expired = status("COLLECTION", expiresAt=(NOW - timedelta(seconds=5)).isoformat())
    assert countdown(expired, NOW)["seconds"] == 0
    assert countdown(status("WAITING", remainingSeconds=1234), NOW) == {"state": "paused", "seconds": 1234}
    for stage in ("SWAP", "REVERTED", "CLOSED"):
        assert countdown(status(stage), NOW)["state"] == "none"
    assert format_duration(3725) == "01:02:05" and format_duration(90_061) == "1d 01:01:01"


def test_outcome_is_unmistakable() -> None:
    assert outcome_banner(status("SWAP")) is None
    swapped = outcome_banner(status("CLOSED", outcome="SWAPPED"))
    refunded = outcome_banner(status("CLOSED", outcome="REFUNDED"))
    cancelled = outcome_banner(status("CLOSED", outcome="CANCELLED"))
    assert swapped and refunded and cancelled
    assert swapped["title"].startswith("SWAPPED") and swapped["kind"] == "swapped"
    assert refunded["title"].startswith("REFUNDED") and "did not happen" in refunded["title"]
    assert cancelled["title"].startswith("CANCELLED") and "did not happen" in cancelled["title"]


def test_explorer_links_only_where_the_chain_has_an_explorer(registry: Any) -> None:
    assert explorer_link(registry, "ETH", "0xabc") == "https://etherscan.io/tx/0xabc"
    assert explorer_link(registry, "POLYGON", "0xabc") is None  # dev chain: the txid alone is shown
    assert explorer_link(registry, "ETH", None) is None
    assert explorer_link(registry, "ETH", "internal:0x1:0x2") is None
    assert explorer_link(registry, "NOPE", "0xabc") is None


def test_party_view_from_each_side(registry: Any) -> None:
    filled = {"filled": True, "paybackAddress": "0xA", "recipientAddress": "0xB"}
    instructions = {
        "chainId": "ETH",
        "asset": "ETH",
        "to": "0xescrow",
        "amount": "1.5055",
        "breakdown": {"tradeAmount": "1.5", "commission": "0.0045", "networkFeeReserve": "0.001"},
    }
    created = status(
        "CREATED",
        alice={"chainId": "ETH", "asset": "ETH", "amount": "1.5", **filled},
        instructions={"alice": instructions, "bob": None},
    )
    alice = party_view(created, Party.ALICE, registry, NOW)
    assert alice["showDeposit"] and not alice["showForm"] and alice["canCancel"]
    assert alice["headline"] == "Waiting for the other party"
    assert alice["send"] == {"chainId": "ETH", "asset": "ETH", "amount": "1.5"}
    assert alice["receive"]["asset"] == "USDT" and alice["confirmationsNeeded"] == 2
    bob = party_view(created, Party.BOB, registry, NOW)
    assert bob["showForm"] and not bob["showDeposit"] and bob["headline"] == "Enter your addresses"
    assert [p["party"] for p in bob["progress"]] == ["BOB", "ALICE"]
    assert bob["progress"][1]["required"] == "1.5055"

    swap = status(
        "SWAP",
        transfers=[
            {
                "purpose": "SWAP_PAYOUT",
                "chainId": "ETH",
                "asset": "ETH",
                "amount": "1.5",
                "to": "0xB",
                "txid": "0xfeed",
                "status": "SUBMITTED",
                "confirmations": 1,
            }
        ],
    )
    view = party_view(swap, Party.BOB, registry, NOW)
    assert not view["canCancel"] and not view["showForm"] and view["headline"] == "Swapping"
    assert "1.5 ETH on ETH" in view["explanation"]
    assert view["transfers"][0]["explorer"] == "https://etherscan.io/tx/0xfeed"
    assert view["transfers"][0]["purposeText"] == "trade payout"
    closed = party_view(status("CLOSED", outcome="REFUNDED"), Party.ALICE, registry, NOW)
    assert closed["banner"] and closed["banner"]["kind"] == "refunded"
    assert closed["headline"] == "Closed" and "Send nothing more" in closed["explanation"]


def test_history_lines() -> None:
    assert describe_event({"type": "deal.party_filled", "detail": {"party": "BOB"}}) == "Bob entered their addresses"
    line = describe_event(
        {"type": "deal.stage_changed", "detail": {"from": "SWAP", "to": "CLOSED", "outcome": "SWAPPED"}}
    )
    assert line == "Stage SWAP → CLOSED (SWAPPED)"
    assert describe_event({"type": "deal.other", "detail": None}) == "deal.other"


def test_qr_code_is_inline_svg_without_styles() -> None:
    svg = str(qr_svg("0x70997970C51812dc3A010C7d01b50e0d17dc79C8"))
    assert svg.startswith("<svg") and "style" not in svg and "<script" not in svg
    hostile = str(qr_svg('"><script>alert(1)</script>'))
    assert "<script>" not in hostile


# ----------------------------------------------------------------------------- OpenRPC


def test_openrpc_describes_every_method_from_the_validating_types() -> None:
    document = build_document("https://otc.example")
    methods = {m["name"]: m for m in document["methods"]}
    assert set(methods) == {*RPC_PARAMS, DISCOVER}
    assert document["servers"][0]["url"] == "https://otc.example/rpc"
    for name, cls in RPC_PARAMS.items():
        schema = msgspec.json.schema(cls)
        component = schema["$defs"][cls.__name__] if "$defs" in schema else schema
        params = {p["name"]: p for p in methods[name]["params"]}
        assert set(params) == set(component["properties"]), name
        assert {n for n, p in params.items() if p["required"]} == set(component.get("required", ())), name
        codes = {e["code"] for e in methods[name]["errors"]}
        assert ErrorCode.INVALID_PARAMS in codes and ErrorCode.RATE_LIMITED in codes
    create = {p["name"]: p for p in methods["otc.createDeal"]["params"]}
    assert create["timeoutSeconds"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 30 * 24 * 3600}
    assert create["alice"]["schema"] == {"$ref": "#/components/schemas/SideParams"}
    assert "SideParams" in document["components"]["schemas"]
    assert msgspec.json.decode(msgspec.json.encode(document)) == document
