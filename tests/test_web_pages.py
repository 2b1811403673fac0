"""The pages, their headers, the live event streams and the API's guards, on real gateway and engine processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from otc_common.errors import ErrorCode
from tests.conftest import Stack, create_database, drop_database, reset_streams
from tests.support import ALICE_EVM, BOB_EVM, TEST_SEED_HEX, RpcClient, ServiceProcess
from tests.test_gateway import deal_params, snapshot

PUBLIC = "https://otc.example"


# ----------------------------------------------------------------------------- server-sent events


class Frame:
    def __init__(self, event: str, data: str, event_id: str | None) -> None:
        self.event = event
        self.raw = data
        self.id = event_id
        self.received = time.monotonic()

    @property
    def data(self) -> Any:
        return json.loads(self.raw)

    def __repr__(self) -> str:
        return f"Frame({self.event!r}, id={self.id!r}, {self.raw[:100]!r})"


class SseReader:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def _frame(self) -> Frame:
        event, event_id = "message", None
        data: list[str] = []
        async for line in self._lines:
            if line == "":
                if data:
                    return Frame(event, "\n".join(data), event_id)
                event, event_id = "message", None
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = value
        raise EOFError("the stream ended")

    async def until(self, matches: Callable[[Frame], bool], timeout: float = 15.0) -> list[Frame]:
        """Every frame up to and including the first that matches."""
        deadline = time.monotonic() + timeout
        seen: list[Frame] = []
        while not seen or not matches(seen[-1]):
            try:
                seen.append(await asyncio.wait_for(self._frame(), max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                raise AssertionError(f"no matching frame within {timeout}s; saw {seen}") from None
        return seen


@contextlib.asynccontextmanager
async def sse(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[SseReader]:
    async with (
        httpx.AsyncClient() as client,
        client.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=None)) as response,
    ):
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)


# ----------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
async def web(pg_url: str, nats_url: str, registry_file: Path, work_dir: Path) -> AsyncIterator[Stack]:
    database_url = await create_database(pg_url)
    await reset_streams(nats_url)
    env = {
        "OTC_NATS_URL": nats_url,
        "OTC_DATABASE_URL": database_url,
        "OTC_REGISTRY_FILE": str(registry_file),
        "OTC_SEED": TEST_SEED_HEX,
        "OTC_LOG_LEVEL": "DEBUG",
        "OTC_CHAIN_ETH_EXPLORER_TX_URL": "https://explorer.example/tx/{txid}",
    }
    running = Stack(env, work_dir)
    await running.start()
    yield running
    await running.stop()
    await drop_database(pg_url, database_url)


@pytest.fixture(scope="module")
async def strict(web: Stack, work_dir: Path) -> AsyncIterator[ServiceProcess]:
    """A second gateway on the same engine with tight rate limits."""
    gateway = ServiceProcess(
        "gateway-strict",
        ["-m", "otc_gateway"],
        {
            **web.env,
            "OTC_PUBLIC_BASE_URL": PUBLIC,
            "OTC_RATE_CLIENT_BURST": "4",
            "OTC_RATE_CLIENT_PER_SECOND": "0.5",
            "OTC_RATE_DEAL_BURST": "2",
            "OTC_RATE_DEAL_PER_SECOND": "0.2",
        },
        work_dir,
    )
    await gateway.start()
    yield gateway
    await gateway.stop()


async def new_deal(rpc: RpcClient, **overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = await rpc.result("otc.createDeal", deal_params(**overrides))
    return result


async def fill(rpc: RpcClient, deal: dict[str, Any], party: str) -> None:
    token = deal["aliceToken"] if party == "ALICE" else deal["bobToken"]
    await rpc.result(
        "otc.fillPartyDetails",
        {
            "dealId": deal["dealId"],
            "party": party,
            "token": token,
            "paybackAddress": ALICE_EVM if party == "ALICE" else BOB_EVM,
            "recipientAddress": BOB_EVM if party == "ALICE" else ALICE_EVM,
        },
    )


def page_path(deal: dict[str, Any], side: str) -> str:
    token = deal["aliceToken"] if side == "a" else deal["bobToken"]
    return f"/d/{deal['dealId']}/{side}/{token}"


class PageAudit(HTMLParser):
    """Whatever a strict CSP would block: inline scripts, inline styles, inline event handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.scripts: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "script":
            if "src" not in names:
                self.problems.append("inline <script>")
            else:
                self.scripts.append(str(values["src"]))
        if tag == "style":
            self.problems.append("<style> element")
        if "style" in names:
            self.problems.append(f"style attribute on <{tag}>")
        self.problems += [f"{name} handler on <{tag}>" for name in names if name.startswith("on")]
        for name in ("href", "src", "action"):
            if str(values.get(name) or "").lower().startswith("javascript:"):
                self.problems.append(f"javascript: URL on <{tag}>")


def audit(html: str) -> PageAudit:
    parser = PageAudit()
    parser.feed(html)
    assert parser.problems == [], parser.problems
    return parser


def assert_security_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


# ----------------------------------------------------------------------------- pages


async def test_pages_render_with_strict_headers_and_no_inline_code(web: Stack) -> None:
    deal = await new_deal(web.rpc, name="desk <b>7</b>")
    async with httpx.AsyncClient(base_url=web.gateway.url) as client:
        home = await client.get("/")
        assert home.status_code == 200 and "Create a deal" in home.text
        page = audit(home.text)
        assert set(page.scripts) == {"/static/common.js", "/static/create.js"}
        for chain in ("ETH", "POLYGON", "UNICITY"):
            assert f'<option value="{chain}"' in home.text
        catalogue = json.loads(re.search(r"data-catalogue='([^']*)'", home.text).group(1))  # type: ignore[union-attr]
        eth = next(c for c in catalogue if c["chainId"] == "ETH")
        assert {"symbol": "USDT", "decimals": 6, "max": "10000000", "commissionBps": 30, "fixedFee": "1"} in eth[
            "assets"
        ]

        instructions = await client.get("/instructions")
        assert instructions.status_code == 200 and "If something looks stuck" in instructions.text
        audit(instructions.text)

        alice = await client.get(page_path(deal, "a"))
        assert alice.status_code == 200
        assert alice.headers["cache-control"] == "no-store"
        parsed = audit(alice.text)
        assert {"details-form", "live", "stage", "progress", "cancel-box"} <= parsed.ids
        assert "desk &lt;b&gt;7&lt;/b&gt;" in alice.text  # names are escaped
        assert "You are Alice" in alice.text and "1.5 ETH" in alice.text and "40000 USDT" in alice.text
        assert "Payback address on ETH" in alice.text and "Recipient address on POLYGON" in alice.text
        bob = await client.get(page_path(deal, "b"))
        assert "You are Bob" in bob.text and "Payback address on POLYGON" in bob.text

        for response in (home, instructions, alice, bob):
            assert_security_headers(response)
        for asset in ("/static/app.css", "/static/common.js", "/static/party.js", "/static/create.js"):
            static = await client.get(asset)
            assert static.status_code == 200, asset
            assert_security_headers(static)


async def test_party_page_after_filling_shows_deposit_qr_and_breakdown(web: Stack) -> None:
    deal = await new_deal(web.rpc)
    await fill(web.rpc, deal, "ALICE")
    async with httpx.AsyncClient(base_url=web.gateway.url) as client:
        page = (await client.get(page_path(deal, "a"))).text
        audit(page)
        status = await web.rpc.result("otc.status", {"dealId": deal["dealId"], "token": deal["aliceToken"]})
        escrow = status["instructions"]["alice"]["to"]
        assert 'id="details-form"' not in page  # details are immutable once filled
        assert escrow in page and "<svg" in page and "1.5055 ETH" in page
        for line in ("Trade amount", "1.5 ETH", "Commission", "0.0045 ETH", "Network fee reserve", "0.001 ETH"):
            assert line in page, line
        assert "Waiting for the other party" in page
        assert 'data-action="cancel"' in page
        bob_page = (await client.get(page_path(deal, "b"))).text
        assert escrow not in bob_page.split('id="progress"')[0]  # Bob is not asked to pay Alice's escrow

        timings = []
        for _ in range(10):
            started = time.perf_counter()
            assert (await client.get(page_path(deal, "a"))).status_code == 200
            timings.append(time.perf_counter() - started)
        print(f"\nparty page served in {sorted(timings)[5] * 1000:.1f} ms (median of 10, engine call included)")

        await fill(web.rpc, deal, "BOB")
        running = (await client.get(page_path(deal, "a"))).text
        assert 'data-countdown="running"' in running and "Send your deposit" in running
        assert 'data-action="cancel"' not in running


async def test_bad_links_are_plain_not_found_pages(web: Stack) -> None:
    deal = await new_deal(web.rpc)
    async with httpx.AsyncClient(base_url=web.gateway.url) as client:
        for path in (
            f"/d/{deal['dealId']}/a/{'x' * 32}",
            f"/d/{deal['dealId']}/c/{deal['aliceToken']}",
            f"/d/nope/a/{deal['aliceToken']}",
            f"/d/{deal['dealId']}/a/short",
            f"/d/{deal['dealId']}/a/{'x' * 32}/events",
            f"/api/deals/{deal['dealId']}/events?token={'y' * 32}",
        ):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert "Traceback" not in response.text
            assert_security_headers(response)
        missing = await client.get(f"/api/deals/{deal['dealId']}/events")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == ErrorCode.INVALID_TOKEN


# ----------------------------------------------------------------------------- the API's guards


async def test_rpc_refuses_other_content_types_and_foreign_origins(web: Stack) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "otc.createDeal", "params": deal_params()})
    before = await snapshot(web.database_url)
    async with httpx.AsyncClient(base_url=web.gateway.url) as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            response = await client.post("/rpc", content=body, headers={"content-type": content_type})
            assert response.status_code == 415, content_type
            assert response.json()["error"]["code"] == ErrorCode.INVALID_REQUEST
        no_type = await client.post("/rpc", content=body.encode(), headers={"content-type": ""})
        assert no_type.json()["error"]["code"] == ErrorCode.INVALID_REQUEST
        for origin in ("https://evil.example", "null", "http://otc.example"):
            response = await client.post(
                "/rpc", content=body, headers={"content-type": "application/json", "origin": origin}
            )
            assert response.status_code == 403, origin
            assert response.json()["error"]["code"] == ErrorCode.INVALID_REQUEST
        assert await snapshot(web.database_url) == before, "a refused request changed state"
        ours = await client.post(
            "/rpc",
            content=json.dumps({"jsonrpc": "2.0", "id": 2, "method": "otc.listAssets"}),
            headers={"content-type": "application/json; charset=utf-8", "origin": PUBLIC},
        )
        assert ours.status_code == 200 and "result" in ours.json()


async def test_openrpc_document_is_served_both_ways(web: Stack) -> None:
    discovered = await web.rpc.result("rpc.discover")
    async with httpx.AsyncClient(base_url=web.gateway.url) as client:
        served = (await client.get("/openrpc.json")).json()
    assert discovered == served
    names = {m["name"] for m in served["methods"]}
    assert {"otc.createDeal", "otc.fillPartyDetails", "otc.status", "otc.cancelDeal", "rpc.discover"} <= names
    assert served["servers"][0]["url"] == f"{PUBLIC}/rpc"
    refused = await web.rpc.call("rpc.discover", {"x": 1})
    assert refused["error"]["code"] == ErrorCode.INVALID_PARAMS


async def test_as_typed_checks_use_the_servers_rules(web: Stack) -> None:
    async with httpx.AsyncClient(base_url=web.gateway.url) as client:

        async def amount(chain: str, asset: str, text: str) -> dict[str, Any]:
            reply = await client.get("/api/check/amount", params={"chainId": chain, "asset": asset, "amount": text})
            body: dict[str, Any] = reply.json()
            return body

        assert await amount("POLYGON", "USDT", "40000.5") == {"ok": True, "amount": "40000.5"}
        too_precise = await amount("POLYGON", "USDT", "1.0000001")
        assert not too_precise["ok"] and "6 decimal places" in too_precise["message"]
        assert "maximum" in (await amount("ETH", "ETH", "1000.1"))["message"]
        assert "scientific" in (await amount("ETH", "ETH", "1e3"))["message"]
        assert not (await amount("ETH", "DOGE", "1"))["ok"]
        # The engine answers the same way.
        engine = await web.rpc.call(
            "otc.createDeal", deal_params(bob={"chainId": "POLYGON", "asset": "USDT", "amount": "1.0000001"})
        )
        assert too_precise["message"] in engine["error"]["message"]

        async def address(chain: str, text: str) -> dict[str, Any]:
            body: dict[str, Any] = (
                await client.get("/api/check/address", params={"chainId": chain, "address": text})
            ).json()
            return body

        assert await address("ETH", ALICE_EVM) == {"ok": True, "address": ALICE_EVM}
        assert "checksum" in (await address("ETH", ALICE_EVM.lower()))["message"]
        assert not (await address("UNICITY", ALICE_EVM))["ok"]
        assert not (await address("ETH", "0x" + "a" * 500))["ok"]


async def test_rate_limits_answer_1011_with_retry_after(web: Stack, strict: ServiceProcess) -> None:
    deal = await new_deal(web.rpc)
    rpc = RpcClient(strict.url)
    async with httpx.AsyncClient(base_url=strict.url) as client:
        # Per deal: two calls naming the deal, then the third is refused, while other calls go on.
        status = {"jsonrpc": "2.0", "id": 1, "method": "otc.status", "params": {"dealId": deal["dealId"]}}
        for _ in range(2):
            assert (await client.post("/rpc", json=status)).status_code == 200
        refused = await client.post("/rpc", json=status)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == ErrorCode.RATE_LIMITED and "deal" in error["message"]
        assert error["data"]["retryAfterSeconds"] >= 1
        assert refused.headers["retry-after"] == str(error["data"]["retryAfterSeconds"])
        assert_security_headers(refused)

        # Per client: a burst of 4 calls in all, so the next one is refused whatever it asks.
        assert "result" in await rpc.call("otc.listAssets")
        limited = await rpc.raw({"jsonrpc": "2.0", "id": 9, "method": "otc.listAssets"})
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == ErrorCode.RATE_LIMITED
        assert int(limited.headers["retry-after"]) == limited.json()["error"]["data"]["retryAfterSeconds"]
        page = await client.get(page_path(deal, "a"))
        assert page.status_code == 429 and int(page.headers["retry-after"]) >= 1
        events = await client.get(f"/api/deals/{deal['dealId']}/events", params={"token": deal["aliceToken"]})
        assert events.status_code == 429 and events.json()["error"]["code"] == ErrorCode.RATE_LIMITED

        # Waiting as told is enough to be served again.
        await asyncio.sleep(int(limited.headers["retry-after"]))
        assert (await rpc.raw({"jsonrpc": "2.0", "id": 10, "method": "otc.listAssets"})).status_code == 200


# ----------------------------------------------------------------------------- live updates


async def test_api_stream_replays_from_last_event_id_and_pushes_new_events(web: Stack) -> None:
    deal = await new_deal(web.rpc)
    await fill(web.rpc, deal, "ALICE")
    url = f"{web.gateway.url}/api/deals/{deal['dealId']}/events?token={deal['bobToken']}"

    async with sse(url) as stream:
        first = await stream.until(lambda f: f.event == "status")
        assert first[0].id is None  # nothing seen yet: the client's position is not set by a stale status
        history = await stream.until(lambda f: f.event == "status")
        events = [f for f in history if f.event != "status"]
        assert [f.event for f in events] == [
            "deal.created",
            "deal.escrow_assigned",
            "deal.escrow_assigned",
            "deal.party_filled",
        ]
        seqs = [int(f.id or 0) for f in events]
        assert seqs == sorted(seqs) and all(f.data["seq"] == int(f.id or 0) for f in events)
        assert history[-1].id == events[-1].id
        assert history[-1].data["status"]["alice"]["filled"] is True

        # A new event is pushed while connected, followed by the status it produced.
        started = time.monotonic()
        await fill(web.rpc, deal, "BOB")
        pushed = await stream.until(lambda f: f.event == "status" and f.data["status"]["stage"] == "COLLECTION")
        delay = pushed[-1].received - started
        assert "deal.party_filled" in [f.event for f in pushed] and "deal.stage_changed" in [f.event for f in pushed]
        everything = events + [f for f in pushed if f.event != "status"]
        print(f"\nengine event to SSE frame (fill call included): {delay * 1000:.0f} ms")

    # Resuming after the third event gives exactly what came after it, with the same ids.
    resume_from = everything[2]
    async with sse(url, headers={"Last-Event-ID": str(resume_from.id)}) as stream:
        frames = await stream.until(lambda f: f.event == "status" and f.id == everything[-1].id)
        assert frames[0].event == "status" and frames[0].id == resume_from.id
        replayed = [f for f in frames if f.event != "status"]
        assert [(f.id, f.data["eventId"]) for f in replayed] == [(f.id, f.data["eventId"]) for f in everything[3:]]
        assert frames[-1].data["status"]["stage"] == "COLLECTION"

    # Resuming at the end replays nothing; the query form works where headers cannot be set.
    async with sse(f"{url}&lastEventId={everything[-1].id}") as stream:
        (only,) = await stream.until(lambda f: f.event == "status")
        assert only.id == everything[-1].id and only.data["status"]["stage"] == "COLLECTION"


async def test_party_page_stream_pushes_rendered_views(web: Stack) -> None:
    deal = await new_deal(web.rpc)
    url = f"{web.gateway.url}{page_path(deal, 'a')}/events"
    async with sse(url) as stream:
        (initial,) = await stream.until(lambda f: f.event == "view")
        assert initial.data["stage"] == "CREATED" and initial.data["filled"] is False
        caught_up = await stream.until(lambda f: f.event == "view" and f.id is not None)
        assert all(f.event == "view" for f in caught_up)  # pages get views, never raw events
        audit(caught_up[-1].data["html"])

        await fill(web.rpc, deal, "ALICE")
        filled = await stream.until(lambda f: f.event == "view" and f.data["filled"])
        view = filled[-1].data
        assert 'id="deposit"' in view["html"] and "<svg" in view["html"] and view["eventAt"]
        last_id = filled[-1].id

        await web.rpc.result("otc.cancelDeal", {"dealId": deal["dealId"], "token": deal["bobToken"]})
        closed = await stream.until(lambda f: f.event == "view" and f.data["stage"] == "CLOSED")
        assert closed[-1].data["outcome"] == "CANCELLED" and "CANCELLED" in closed[-1].data["html"]
        assert int(closed[-1].id or 0) > int(last_id or 0)

    # Reconnecting with the last id seen starts from the current view: nothing is missed.
    async with sse(url, headers={"Last-Event-ID": str(closed[-1].id)}) as stream:
        (again,) = await stream.until(lambda f: f.event == "view")
        assert again.data["stage"] == "CLOSED" and again.id == closed[-1].id


async def test_stream_resumes_after_the_gateway_died_and_stops_promptly(web: Stack, work_dir: Path) -> None:
    gateway = ServiceProcess(
        "gateway-restart", ["-m", "otc_gateway"], {**web.env, "OTC_PUBLIC_BASE_URL": PUBLIC}, work_dir
    )
    await gateway.start()
    try:
        deal = await new_deal(web.rpc)
        url = f"{gateway.url}/api/deals/{deal['dealId']}/events?token={deal['aliceToken']}"
        async with sse(url) as stream:
            caught_up = await stream.until(lambda f: f.event == "status" and f.id is not None)
            last_id = str(caught_up[-1].id)
            gateway.kill()  # the connection drops mid-stream, as on a crash or a network cut
            with pytest.raises((EOFError, httpx.HTTPError, AssertionError)):
                await stream.until(lambda f: False, timeout=5)
        await fill(web.rpc, deal, "ALICE")  # happens while the client is away

        await gateway.start()
        async with sse(url, headers={"Last-Event-ID": last_id}) as stream:
            frames = await stream.until(lambda f: f.event == "status" and f.id != last_id)
            # A fresh status first (it already shows the fill), then exactly the one event missed.
            assert frames[0].event == "status" and frames[0].id == last_id
            assert frames[0].data["status"]["alice"]["filled"]
            assert [f.event for f in frames[1:]] == ["deal.party_filled", "status"]
            assert frames[-1].id == frames[1].id and int(frames[1].id or 0) > int(last_id)

            # SIGTERM with a stream open: the stream ends and the process exits without waiting it out.
            started = time.monotonic()
            code = await gateway.stop()
            assert code == 0 and time.monotonic() - started < 5, (code, gateway.log_tail())
    finally:
        gateway.kill()


async def test_no_token_in_any_log(web: Stack, strict: ServiceProcess) -> None:
    """Runs last in this module: everything above used tokens in paths, queries and bodies."""
    deal = await new_deal(web.rpc)
    async with httpx.AsyncClient(base_url=web.gateway.url) as client:
        await client.get(page_path(deal, "a"))
        await client.get(f"{page_path(deal, 'a')}/nope")
        await client.get(f"/api/deals/{deal['dealId']}/events", params={"token": "z" * 40})
    texts = [web.gateway.log_path.read_text(), strict.log_path.read_text()]
    texts += [engine.log_path.read_text() for engine in web.engines]
    assert "/d/" not in texts[0] and "token=" not in texts[0]
    for text in texts:
        assert deal["aliceToken"] not in text and deal["bobToken"] not in text and "z" * 40 not in text
