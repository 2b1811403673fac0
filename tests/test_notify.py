"""E-mail notifications and operator webhooks: the engine and gateway run as real processes, a real
SMTP server (aiosmtpd) and a real HTTP receiver (aiohttp) run in the test process."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from otc_common.errors import ErrorCode
from otc_common.messages import (
    DealCreated,
    DealSide,
    Outcome,
    Party,
    PartyDetailsFilled,
    SideFunded,
    Stage,
    StageChanged,
)
from otc_common.settings import ConfigError
from otc_engine import notify
from otc_engine.notify import rules, texts, webhooks
from otc_engine.notify.mailer import Mailer, MailError
from otc_engine.notify.rules import EmailKind, Notice, Reply
from otc_engine.notify.settings import NotifySettings, RetryPolicy, SmtpConfig, is_mailbox, resolve
from tests.conftest import Stack
from tests.support import ALICE_EVM, BOB_EVM, free_port

BASE_URL = "https://otc.example"
SENDER = "otc@broker.example"
SECRET = "webhook-secret-for-the-tests"


# --------------------------------------------------------------------------- helpers


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Polls `check` (plain or async) until it returns something true, which it then returns."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Mailbox:
    """What an SMTP server accepted; it can answer 451 to the first DATA commands and refuses nobody@."""

    def __init__(self, transient_failures: int = 0) -> None:
        self.accepted: list[EmailMessage] = []
        self.refused_data = 0
        self.transient_failures = transient_failures
        self._lock = threading.Lock()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            if self.refused_data < self.transient_failures:
                self.refused_data += 1
                return "451 4.3.0 try again later"
            content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
            message = email.message_from_bytes(content, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            message["X-Envelope-To"] = ",".join(envelope.rcpt_tos)
            self.accepted.append(message)
        return "250 Message accepted"

    def with_subject(self, prefix: str) -> list[EmailMessage]:
        with self._lock:
            return [m for m in self.accepted if str(m["Subject"]).startswith(prefix)]


class SmtpServer:
    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.port = free_port()
        self.controller = Controller(mailbox, hostname="127.0.0.1", port=self.port)

    def env(self) -> dict[str, str]:
        return {
            "OTC_SMTP_HOST": "127.0.0.1",
            "OTC_SMTP_PORT": str(self.port),
            "OTC_SMTP_FROM": SENDER,
            "OTC_SMTP_STARTTLS": "false",
        }


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer(Mailbox(transient_failures=0))
    server.controller.start()
    yield server
    server.controller.stop()


class Receiver:
    """An HTTP endpoint that records every request and fails the first `fail_first` of each event."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.per_event: Counter[str] = Counter()
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = request.headers.get("X-OTC-Event-Id", "")
        self.per_event[event_id] += 1
        status = 500 if self.per_event[event_id] <= self.fail_first else 200
        self.requests.append((dict(request.headers), body, status))
        return web.Response(status=status, text="ok" if status == 200 else "not now")

    async def redirect(self, request: web.Request) -> web.Response:
        status = int(request.query["status"])
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        app.router.add_post("/redirect", self.redirect)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def delivered(self) -> dict[str, bytes]:
        return {headers["X-OTC-Event-Id"]: body for headers, body, status in self.requests if status == 200}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    running = Receiver(fail_first=2)
    await running.start()
    yield running
    await running.stop()


def engine_env(service_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        **service_env,
        "OTC_PUBLIC_BASE_URL": BASE_URL,
        "OTC_NOTIFY_RETRY_SECONDS": "0.2",
        "OTC_NOTIFY_RETRY_MAX_SECONDS": "1",
        **extra,
    }


@pytest.fixture
async def mail_stack(service_env: dict[str, str], smtp: SmtpServer, work_dir: Path) -> AsyncIterator[Stack]:
    running = Stack(engine_env(service_env, **smtp.env()), work_dir)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def engine_db(stack: Stack) -> asyncpg.Connection[asyncpg.Record]:
    return await asyncpg.connect(stack.database_url, server_settings={"search_path": "engine"})


async def create_deal(stack: Stack, timeout_seconds: int = 3600) -> dict[str, Any]:
    deal: dict[str, Any] = await stack.rpc.result(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "1.5"},
            "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "4000.25"},
            "timeoutSeconds": timeout_seconds,
            "name": "Desk trade 42",
        },
    )
    return deal


async def fill(stack: Stack, deal: dict[str, Any], party: str, email_address: str | None) -> None:
    params: dict[str, Any] = {
        "dealId": deal["dealId"],
        "party": party,
        "token": deal["aliceToken"] if party == "ALICE" else deal["bobToken"],
        "paybackAddress": ALICE_EVM if party == "ALICE" else BOB_EVM,
        "recipientAddress": BOB_EVM if party == "ALICE" else ALICE_EVM,
    }
    if email_address:
        params["email"] = email_address
    await stack.rpc.result("otc.fillPartyDetails", params)


async def wait_mails(smtp: SmtpServer, subject: str, count: int) -> list[EmailMessage]:
    found: list[EmailMessage] = await wait_for(
        lambda: len(smtp.mailbox.with_subject(subject)) >= count and smtp.mailbox.with_subject(subject),
        f"{count} e-mail(s) '{subject}'",
    )
    return found


def recipients(messages: list[EmailMessage]) -> list[str]:
    return sorted(str(m["To"]) for m in messages)


# --------------------------------------------------------------------------- invitations and e-mails


async def test_invite_mails_the_invited_partys_own_link(mail_stack: Stack, smtp: SmtpServer) -> None:
    deal = await create_deal(mail_stack)
    deal_id = deal["dealId"]
    invite = {"dealId": deal_id, "party": "BOB", "email": "bob@example.com"}

    wrong = await mail_stack.rpc.call("otc.sendInvite", {**invite, "token": deal["aliceToken"]})
    assert wrong["error"]["code"] == ErrorCode.INVALID_TOKEN
    unknown = await mail_stack.rpc.call("otc.sendInvite", {**invite, "dealId": "nope", "token": deal["bobToken"]})
    assert unknown["error"]["code"] == ErrorCode.DEAL_NOT_FOUND
    refused = await mail_stack.rpc.call(
        "otc.sendInvite", {**invite, "email": "nobody@example.com", "token": deal["bobToken"]}
    )
    assert refused["error"]["code"] == ErrorCode.INVALID_PARAMS and "would not deliver" in refused["error"]["message"]

    result = await mail_stack.rpc.result("otc.sendInvite", {**invite, "token": deal["bobToken"]})
    assert result["ok"] is True

    [mail] = await wait_mails(smtp, "Your OTC deal link", 1)
    assert mail["To"] == "bob@example.com" and mail["From"] == SENDER
    assert mail["X-Envelope-To"] == "bob@example.com"
    assert "Desk trade 42" in str(mail["Subject"])
    body = mail.get_content()
    assert f"{BASE_URL}/d/{deal_id}/b/{deal['bobToken']}" in body
    assert deal["aliceToken"] not in body
    assert "You send:    4000.25 USDT on POLYGON" in body and "You receive: 1.5 ETH on ETH" in body
    assert mail["Message-ID"] and mail["Auto-Submitted"] == "auto-generated"

    conn = await engine_db(mail_stack)
    try:
        invites = await conn.fetch("SELECT party, recipient, status FROM invites ORDER BY created_at")
        contact = await conn.fetchval("SELECT email FROM deal_sides WHERE deal_id = $1 AND party = 'BOB'", deal_id)
    finally:
        await conn.close()
    assert [tuple(r.values()) for r in invites] == [
        ("BOB", "nobody@example.com", "FAILED"),
        ("BOB", "bob@example.com", "SENT"),
    ]
    assert contact == "bob@example.com", "the invited address is the party's contact until it fills its details"
    assert deal["bobToken"] not in mail_stack.engines[0].log_path.read_text(), "a token reached the log"


async def test_cancelled_deal_mails_both_parties_once_across_restart_and_replay(
    mail_stack: Stack, smtp: SmtpServer, service_env: dict[str, str]
) -> None:
    deal = await create_deal(mail_stack)
    deal_id = deal["dealId"]
    await fill(mail_stack, deal, "ALICE", "alice@example.com")
    await mail_stack.rpc.result(
        "otc.sendInvite", {"dealId": deal_id, "party": "BOB", "email": "bob@example.com", "token": deal["bobToken"]}
    )
    cancelled = await mail_stack.rpc.result("otc.cancelDeal", {"dealId": deal_id, "token": deal["aliceToken"]})
    assert cancelled["stage"] == "CLOSED"

    mails = await wait_mails(smtp, "Deal cancelled", 2)
    assert recipients(mails) == ["alice@example.com", "bob@example.com"]
    assert all(deal_id in m.get_content() and "Desk trade 42" in str(m["Subject"]) for m in mails)
    alice_mail = next(m for m in mails if m["To"] == "alice@example.com")
    assert ALICE_EVM in alice_mail.get_content(), "tells where a refund would go"

    # Forget that the events were handled and make JetStream deliver the whole stream again:
    # only the (event, recipient) key stands between the replay and a second e-mail.
    engine = mail_stack.engines[0]
    await engine.stop()
    conn = await engine_db(mail_stack)
    nc = await nats.connect(service_env["OTC_NATS_URL"])
    try:
        await conn.execute("DELETE FROM inbox WHERE consumer = 'engine-notify'")
        js = nc.jetstream()
        await js.delete_consumer("DEALS", "engine-notify")
        last = (await js.stream_info("DEALS")).state.last_seq
        await engine.start()

        async def replayed() -> bool:
            # Every event delivered again and acknowledged (only those e-mails are about reach the inbox).
            info = await js.consumer_info("DEALS", "engine-notify")
            return bool(info.delivered.stream_seq >= last and info.num_ack_pending == 0 and info.num_pending == 0)

        await wait_for(replayed, "the replay of the DEALS stream")
        assert await conn.fetchval("SELECT count(*) FROM inbox WHERE consumer = 'engine-notify'") > 0
        rows = await conn.fetch("SELECT recipient, kind, status FROM email_outbox ORDER BY recipient")
    finally:
        await nc.close()
        await conn.close()
    assert [tuple(r.values()) for r in rows] == [
        ("alice@example.com", "CANCELLED", "SENT"),
        ("bob@example.com", "CANCELLED", "SENT"),
    ]
    await asyncio.sleep(1.0)  # a full poll of the sender: nothing more may arrive
    assert recipients(smtp.mailbox.with_subject("Deal cancelled")) == ["alice@example.com", "bob@example.com"]
    assert len(smtp.mailbox.with_subject("Your OTC deal link")) == 1


async def test_deadline_passing_mails_refunds_after_a_retry(
    service_env: dict[str, str], work_dir: Path, smtp: SmtpServer
) -> None:
    smtp.mailbox.transient_failures = 1  # the first e-mail meets a 451 and must be retried
    stack = Stack(engine_env(service_env, **smtp.env()), work_dir)
    await stack.start()
    try:
        deal = await create_deal(stack, timeout_seconds=2)
        await fill(stack, deal, "ALICE", "alice@example.com")
        await fill(stack, deal, "BOB", "bob@example.com")
        mails = await wait_mails(smtp, "Deal refunded", 2)
        conn = await engine_db(stack)
        try:
            rows = await conn.fetch("SELECT recipient, status, attempts FROM email_outbox ORDER BY recipient")
        finally:
            await conn.close()
    finally:
        await stack.stop()
    assert recipients(mails) == ["alice@example.com", "bob@example.com"]
    assert smtp.mailbox.refused_data == 1
    assert {r["status"] for r in rows} == {"SENT"} and sorted(r["attempts"] for r in rows) == [1, 2]
    assert "no swap took place" in mails[0].get_content()


# --------------------------------------------------------------------------- webhooks


async def deal_events(nats_url: str, deal_id: str) -> dict[str, str]:
    """event_id → type of every message on the deal's subject."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"otc.deal.{deal_id}", durable="notify-audit", stream="DEALS")
    found: dict[str, str] = {}
    while True:
        try:
            batch = await sub.fetch(100, timeout=0.5)
        except TimeoutError:
            break
        for msg in batch:
            envelope = json.loads(msg.data)
            found[envelope["event_id"]] = envelope["type"]
            await msg.ack()
    await nc.close()
    return found


async def test_webhooks_get_every_signed_event_with_retries_log_and_redelivery(
    service_env: dict[str, str], work_dir: Path, receiver: Receiver
) -> None:
    env = engine_env(service_env, OTC_WEBHOOK_URLS=f"{receiver.url}/hook", OTC_WEBHOOK_SECRET=SECRET)
    stack = Stack(env, work_dir)
    await stack.start()
    conn: asyncpg.Connection[asyncpg.Record] | None = None
    try:
        deal = await create_deal(stack)
        deal_id = deal["dealId"]
        await fill(stack, deal, "ALICE", "alice@example.com")
        await stack.rpc.result("otc.cancelDeal", {"dealId": deal_id, "token": deal["aliceToken"]})

        no_mail = await stack.rpc.call(
            "otc.sendInvite", {"dealId": deal_id, "party": "BOB", "email": "bob@example.com", "token": deal["bobToken"]}
        )
        assert no_mail["error"]["code"] == ErrorCode.EMAIL_NOT_CONFIGURED
        assert "not enabled" in no_mail["error"]["message"]

        conn = await engine_db(stack)
        await wait_for(lambda: conn.fetchval("SELECT count(*) = 0 FROM outbox"), "the engine's outbox to drain")
        events = await deal_events(service_env["OTC_NATS_URL"], deal_id)
        assert sorted(events.values()) == sorted(
            ["deal.created", "deal.escrow_assigned", "deal.escrow_assigned", "deal.party_filled"]
            + ["deal.stage_changed"] * 2
        )
        await wait_for(lambda: set(events) <= set(receiver.delivered()), "every event delivered")

        for headers, body, _status in receiver.requests:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-OTC-Signature"], expected)
            envelope = json.loads(body)
            assert set(envelope) == {"event_id", "type", "occurred_at", "payload"}
            assert headers["X-OTC-Event-Id"] == envelope["event_id"]
            assert abs(int(headers["X-OTC-Timestamp"]) - time.time()) < 60
            assert envelope["payload"]["deal_id"] == deal_id
        assert all(receiver.per_event[event_id] == 3 for event_id in events), "two failures, then delivered"

        async def all_recorded() -> bool:
            # The receiver has the last attempt before the sender has recorded its answer.
            assert conn is not None
            return all(d.status == "DELIVERED" for d in await notify.list_deliveries(conn, deal_id=deal_id))

        await wait_for(all_recorded, "every delivery recorded")
        log = await notify.list_deliveries(conn, deal_id=deal_id)
        assert {d.event_id for d in log} == set(events)
        for delivery in log:
            assert (delivery.status, delivery.attempts, delivery.last_status) == ("DELIVERED", 3, 200)
            assert [a.http_status for a in delivery.log] == [500, 500, 200]
        assert [d.status for d in await notify.list_deliveries(conn, status="PENDING")] == []

        created = next(d for d in log if d.event_type == "deal.created")
        again = await notify.redeliver(conn, created.id)
        assert again is not None and again.status == "PENDING"
        assert await notify.redeliver(conn, 10**9) is None

        async def redelivered() -> bool:
            [row] = await notify.list_deliveries(conn, event_id=created.event_id)
            return row.status == "DELIVERED" and row.attempts == 4

        await wait_for(redelivered, "the manual redelivery")
        bodies = [body for headers, body, _ in receiver.requests if headers["X-OTC-Event-Id"] == created.event_id]
        assert len(bodies) == 4 and len(set(bodies)) == 1, "a redelivery sends the same bytes"
        assert json.dumps(notify.as_dict(log[0]))  # the CLI can print it
    finally:
        if conn is not None:
            await conn.close()
        await stack.stop()


async def test_webhook_post_follows_only_same_origin_method_keeping_redirects() -> None:
    first, other = Receiver(), Receiver()
    await first.start()
    await other.start()
    secret = b"s" * 16
    try:
        async with webhooks.new_client(5) as client:

            async def post(path: str) -> webhooks.PostResult:
                return await webhooks.post(client, first.url + path, b'{"x":1}', secret, "e1", "deal.created")

            ok = await post("/hook")
            assert ok.delivered and ok.http_status == 200
            same = await post("/redirect?status=307&to=/hook")
            assert same.delivered, same
            elsewhere = await post(f"/redirect?status=308&to={other.url}/hook")
            assert not elsewhere.delivered and "another origin" in (elsewhere.error or "")
            found = await post("/redirect?status=302&to=/hook")
            assert not found.delivered and found.http_status == 302
            down = await webhooks.post(client, f"http://127.0.0.1:{free_port()}/hook", b"{}", secret, "e2", "t")
            assert not down.delivered and down.http_status is None and "request failed" in (down.error or "")
        assert other.requests == []
        assert len(first.requests) == 2
        headers, body, _ = first.requests[0]
        assert rules.verify_signature(secret, body, headers["X-OTC-Signature"])
    finally:
        await first.stop()
        await other.stop()


async def test_mailer_tells_permanent_from_transient_failures(smtp: SmtpServer) -> None:
    config = SmtpConfig(
        host="127.0.0.1", port=smtp.port, username="", password="", sender=SENDER, starttls=False, timeout_seconds=5
    )
    mailer = Mailer(config)
    await mailer.send("carol@example.com", "Hello", "Body text")
    assert [m["To"] for m in smtp.mailbox.accepted] == ["carol@example.com"]
    with pytest.raises(MailError) as refused:
        await mailer.send("nobody@example.com", "Hello", "Body")
    assert refused.value.permanent and "550" in refused.value.reason
    smtp.mailbox.transient_failures = 1
    with pytest.raises(MailError) as later:
        await mailer.send("carol@example.com", "Hello", "Body")
    assert not later.value.permanent and "451" in later.value.reason
    down = Mailer(msgspec.structs.replace(config, port=free_port()))
    with pytest.raises(MailError) as unreachable:
        await down.send("carol@example.com", "Hello", "Body")
    assert not unreachable.value.permanent


# --------------------------------------------------------------------------- pure rules and texts


def view(name: str = "Desk trade 42") -> texts.DealView:
    return texts.DealView(
        deal_id="d1",
        name=name,
        alice=texts.SideView(
            party=Party.ALICE,
            chain="ETH",
            asset="ETH",
            amount=1_500_000_000_000_000_000,
            decimals=18,
            payback_address=ALICE_EVM,
            recipient_address=BOB_EVM,
        ),
        bob=texts.SideView(
            party=Party.BOB,
            chain="POLYGON",
            asset="USDT",
            amount=40_000_250_000,
            decimals=6,
            payback_address=BOB_EVM,
            recipient_address=ALICE_EVM,
        ),
    )


def test_side_funded_text_names_the_partys_own_deposit() -> None:
    mail = texts.side_funded(view(), Party.BOB, 40_001_250_001)
    assert mail.subject == "Deposit received: Desk trade 42"
    assert "40001.250001 USDT on POLYGON" in mail.body
    assert "Deal ID: d1" in mail.body and "ETH on ETH" not in mail.body
    alice = texts.side_funded(view(), Party.ALICE, 1_501_000_000_000_000_000)
    assert "1.501 ETH on ETH" in alice.body


def test_closing_texts_say_what_happened_to_the_money() -> None:
    swapped = texts.closed(view(), Party.ALICE, Outcome.SWAPPED)
    assert swapped.subject.startswith("Deal completed")
    assert f"40000.25 USDT on POLYGON went to {BOB_EVM}" in swapped.body
    assert ALICE_EVM in swapped.body  # surplus back to Alice's payback address
    refunded = texts.closed(view(), Party.BOB, Outcome.REFUNDED)
    assert refunded.subject.startswith("Deal refunded") and "no swap took place" in refunded.body
    assert BOB_EVM in refunded.body
    cancelled = texts.closed(view(), Party.BOB, Outcome.CANCELLED)
    assert cancelled.subject.startswith("Deal cancelled") and "no swap took place" in cancelled.body
    nameless = texts.DealView(
        deal_id="d2",
        name="x",
        alice=msgspec.structs.replace(view().alice, payback_address=None),
        bob=view().bob,
    )
    assert "your payback address" in texts.closed(nameless, Party.ALICE, Outcome.REFUNDED).body


def test_user_chosen_deal_names_cannot_break_headers() -> None:
    mail = texts.invite(view("Evil\r\nBcc: all@example.com\x00"), Party.BOB, "https://x/d/d1/b/t")
    assert "\n" not in mail.subject and "\r" not in mail.subject and "\x00" not in mail.subject
    config = SmtpConfig(host="h", port=25, username="", password="", sender=SENDER, starttls=False, timeout_seconds=1)
    message = Mailer(config).build("bob@example.com", mail.subject, mail.body)
    assert message["Bcc"] is None and message["To"] == "bob@example.com"
    assert texts.one_line("   ") == "OTC deal"
    assert texts.party_link("https://otc.example/", "d1", Party.ALICE, "tok") == "https://otc.example/d/d1/a/tok"


def test_who_is_told_about_which_event() -> None:
    now = datetime.now(UTC)
    both = {Party.ALICE: "a@example.com", Party.BOB: "b@example.com"}
    funded = SideFunded(deal_id="d", party=Party.BOB, amount=5)
    assert rules.notices_for(funded, now, now, both) == [Notice(Party.BOB, "b@example.com", EmailKind.SIDE_FUNDED)]
    closed = StageChanged(deal_id="d", stage=Stage.CLOSED, previous=Stage.REVERTED, outcome=Outcome.REFUNDED)
    assert [n.kind for n in rules.notices_for(closed, now, now, both)] == [EmailKind.REFUNDED] * 2
    assert rules.notices_for(closed, now, now, {Party.ALICE: None, Party.BOB: "b@example.com"}) == [
        Notice(Party.BOB, "b@example.com", EmailKind.REFUNDED)
    ]
    shared = {Party.ALICE: "same@example.com", Party.BOB: "Same@example.com"}
    assert len(rules.notices_for(closed, now, now, shared)) == 1
    reverted = StageChanged(deal_id="d", stage=Stage.REVERTED, previous=Stage.COLLECTION)
    assert rules.notices_for(reverted, now, now, both) == []
    filled = PartyDetailsFilled(deal_id="d", party=Party.ALICE)
    assert rules.notices_for(filled, now, now, both) == []
    created = DealCreated(
        deal_id="d",
        name="n",
        alice=DealSide(chain="ETH", asset="ETH", amount=1),
        bob=DealSide(chain="ETH", asset="USDT", amount=1),
        timeout_seconds=60,
    )
    assert rules.notices_for(created, now, now, both) == []
    stale = now - rules.EMAIL_MAX_EVENT_AGE - timedelta(seconds=1)
    assert rules.notices_for(funded, stale, now, both) == []


def test_retry_backoff_doubles_and_is_capped() -> None:
    policy = RetryPolicy(first_seconds=10, max_seconds=60, max_attempts=4)
    assert [rules.retry_delay(n, policy) for n in range(1, 6)] == [10, 20, 40, 60, 60]
    assert not rules.gives_up(3, policy) and rules.gives_up(4, policy)
    assert rules.retry_delay(10_000, policy) == 60


def test_reply_and_redirect_rules() -> None:
    assert rules.classify_reply(204) is Reply.DELIVERED
    assert rules.classify_reply(307) is Reply.REDIRECT and rules.classify_reply(308) is Reply.REDIRECT
    assert rules.classify_reply(302) is Reply.FAILED and rules.classify_reply(500) is Reply.FAILED
    assert rules.redirect_target("https://a.example/hook", "/v2/hook") == "https://a.example/v2/hook"
    assert rules.redirect_target("https://a.example/hook", "https://b.example/hook") is None
    assert rules.redirect_target("https://a.example/hook", "http://a.example/hook") is None
    assert rules.redirect_target("https://a.example/hook", "https://a.example:8443/hook") is None
    assert rules.redirect_target("https://a.example/hook", None) is None
    assert rules.safe_url("https://hooks.example:8443/services/T0/SECRET?x=1") == "https://hooks.example:8443"
    assert rules.smtp_permanent(550) and not rules.smtp_permanent(451) and not rules.smtp_permanent(None)
    one = rules.message_id("e1", "A@example.com", SENDER)
    assert one == rules.message_id("e1", "a@example.com", SENDER) != rules.message_id("e2", "a@example.com", SENDER)
    assert one.endswith("@broker.example>")
    body = b'{"event_id":"e"}'
    assert rules.verify_signature(b"k", body, rules.signature(b"k", body))
    assert not rules.verify_signature(b"k", body + b" ", rules.signature(b"k", body))


def settings(**env: Any) -> NotifySettings:
    return msgspec.convert({"database_url": "x", "nats_url": "y", "registry_file": "z", **env}, NotifySettings)


def test_settings_are_checked_together(tmp_path: Path) -> None:
    off = resolve(settings())
    assert off.smtp is None and off.webhooks is None
    with pytest.raises(ConfigError, match="OTC_SMTP_FROM"):
        resolve(settings(smtp_host="mail.example"))
    with pytest.raises(ConfigError, match="OTC_WEBHOOK_SECRET"):
        resolve(settings(webhook_urls="https://ops.example/hook"))
    with pytest.raises(ConfigError, match="OTC_WEBHOOK_URLS"):
        resolve(settings(webhook_urls="ftp://ops.example/hook", webhook_secret=SECRET))
    with pytest.raises(ConfigError, match="OTC_PUBLIC_BASE_URL"):
        resolve(settings(public_base_url="otc.example"))
    secret_file = tmp_path / "smtp-password"
    secret_file.write_text("hunter2-very-secret\n")
    config = resolve(
        settings(
            smtp_host="mail.example",
            smtp_from=SENDER,
            smtp_username="otc",
            smtp_password_file=str(secret_file),
            webhook_urls=" https://a.example/h , https://b.example/h ",
            webhook_secret=SECRET,
            public_base_url="https://otc.example/",
        )
    )
    assert config.smtp is not None and config.smtp.password == "hunter2-very-secret"
    assert "hunter2" not in repr(config) and SECRET not in repr(config)
    assert config.webhooks is not None and config.webhooks.urls == ["https://a.example/h", "https://b.example/h"]
    assert config.public_base_url == "https://otc.example"


def test_mailbox_check_refuses_what_a_header_would_misread() -> None:
    assert is_mailbox("bob@example.com")
    for bad in ("a,b@example.com", "Bob <bob@example.com>", "bob@example.com\r\nBcc: x@y.z", "bob", ""):
        assert not is_mailbox(bad), bad
