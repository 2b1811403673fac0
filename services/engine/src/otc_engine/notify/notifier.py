"""The shell of notifications: a DEALS consumer that writes e-mail and webhook rows in its inbox
transaction, two sender loops that work those rows off with retries, and otc.sendInvite."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import msgspec

from otc_common import subjects
from otc_common.db import Connection, Pool
from otc_common.errors import AppError, ErrorCode
from otc_common.messages import (
    Envelope,
    Message,
    Party,
    SendInviteParams,
    SideFunded,
    Stage,
    StageChanged,
    encode,
)
from otc_common.registry import Registry
from otc_common.runtime import Loop, Service
from otc_common.subjects import ConsumerSpec
from otc_engine import store as engine_store
from otc_engine.notify import rules, store, texts, webhooks
from otc_engine.notify.mailer import Mailer, MailError
from otc_engine.notify.metrics import EMAILS, WEBHOOKS
from otc_engine.notify.rules import Notice
from otc_engine.notify.settings import NotifyConfig, is_mailbox
from otc_engine.service import token_matches

if TYPE_CHECKING:
    from otc_engine.api import EngineApi

log = logging.getLogger("otc.engine.notify")

NOTIFY_EVENTS = ConsumerSpec(durable="engine-notify", stream="DEALS", filter_subjects=[subjects.ALL_DEALS])

BATCH = 16
IDLE_POLL_SECONDS = 0.5
ERROR_PAUSE_SECONDS = 2.0
#: The gateway waits 5 s for the engine; the invitation must be sent, or have failed, before that.
INVITE_SMTP_TIMEOUT_SECONDS = 4.0
INVITES_PER_DEAL_PER_HOUR = 10

#: Until the errors module has a dedicated code, "not configured" is told with this one and a clear message.
EMAIL_DISABLED_CODE = ErrorCode.EMAIL_NOT_CONFIGURED


def _now() -> datetime:
    return datetime.now(UTC)


def lease_seconds(attempt_limit: float) -> float:
    """A claimed row waits this long before another sender may try it: well past the attempt's limit."""
    return 2 * attempt_limit + 60


class Notifications:
    def __init__(self, service: Service, config: NotifyConfig) -> None:
        self.service = service
        self.config = config
        self.mailer = Mailer(config.smtp) if config.smtp is not None else None
        self._registry: Registry | None = None
        if self.mailer is not None:
            service.loop("email-sender", self._email_loop)
        if config.webhooks is not None:
            service.loop("webhook-sender", self._webhook_loop)

    @property
    def pool(self) -> Pool:
        return self.service.db

    def consumer_spec(self) -> ConsumerSpec:
        """Webhooks hear of every deal event, e-mails only of these two; without either, the consumer only moves
        on (it stays, so that turning notifications on later starts from where it is)."""
        if self.config.webhooks is not None:
            return NOTIFY_EVENTS
        types = {SideFunded.TYPE, StageChanged.TYPE} if self.mailer is not None else set()
        return msgspec.structs.replace(NOTIFY_EVENTS, types=frozenset(types))

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "notifications not set up"
        return self._registry

    async def setup(self, api: EngineApi) -> None:
        """Call from the service's setup (database and bus are up)."""
        assert self.service.registry is not None
        self._registry = self.service.registry
        await self.service.add_consumer(self.consumer_spec(), self.handle)
        api.methods["otc.sendInvite"] = self.send_invite
        log.info(
            "notifications ready",
            extra={
                "email": self.mailer is not None,
                "webhook_urls": len(self.config.webhooks.urls if self.config.webhooks else []),
            },
        )

    # ----------------------------------------------------------------- deal facts

    def deal_view(self, deal: asyncpg.Record, sides: Sequence[asyncpg.Record]) -> texts.DealView | None:
        views: dict[Party, texts.SideView] = {}
        for row in sides:
            chain = self.registry.chains.get(row["chain"])
            asset = chain.assets.get(row["asset"]) if chain is not None else None
            if asset is None:
                return None
            party = Party(row["party"])
            views[party] = texts.SideView(
                party=party,
                chain=row["chain"],
                asset=row["asset"],
                amount=int(row["amount"]),
                decimals=asset.decimals,
                payback_address=row["payback_address"],
                recipient_address=row["recipient_address"],
            )
        if set(views) != {Party.ALICE, Party.BOB}:
            return None
        return texts.DealView(
            deal_id=deal["deal_id"], name=deal["name"], alice=views[Party.ALICE], bob=views[Party.BOB]
        )

    # ----------------------------------------------------------------- the consumer

    async def handle(self, conn: Connection, envelope: Envelope, message: Message) -> None:
        """Runs in the inbox transaction: the rows exist exactly when the event counts as handled."""
        deal_id = getattr(message, "deal_id", None)
        if self.config.webhooks is not None:
            await store.add_deliveries(
                conn,
                event_id=envelope.event_id,
                urls=self.config.webhooks.urls,
                event_type=envelope.type,
                deal_id=deal_id if isinstance(deal_id, str) else None,
                occurred_at=envelope.occurred_at,
                body=message_body(envelope),
            )
        if self.mailer is not None and isinstance(message, SideFunded | StageChanged):
            await self._queue_emails(conn, envelope, message)

    async def _queue_emails(self, conn: Connection, envelope: Envelope, message: SideFunded | StageChanged) -> None:
        if isinstance(message, StageChanged) and message.stage is not Stage.CLOSED:
            return
        deal, sides = await store.deal_for_notice(conn, message.deal_id)
        if deal is None:
            return
        emails: dict[Party, str | None] = {}
        for row in sides:
            address = row["email"]
            if address and not is_mailbox(address):
                log.warning("a party's e-mail address is not usable; not told", extra={"deal_id": message.deal_id})
                address = None
            emails[Party(row["party"])] = address
        notices = rules.notices_for(message, envelope.occurred_at, _now(), emails)
        if not notices:
            return
        view = self.deal_view(deal, sides)
        if view is None:
            log.warning("deal's assets are not in the registry; no e-mail", extra={"deal_id": message.deal_id})
            return
        for notice in notices:
            mail = self._mail(view, notice, message)
            await store.add_email(
                conn,
                event_id=envelope.event_id,
                recipient=notice.recipient,
                deal_id=message.deal_id,
                party=notice.party.value,
                kind=notice.kind.value,
                subject=mail.subject,
                body=mail.body,
            )

    @staticmethod
    def _mail(view: texts.DealView, notice: Notice, message: SideFunded | StageChanged) -> texts.Mail:
        if isinstance(message, SideFunded):
            return texts.side_funded(view, notice.party, message.amount)
        assert message.outcome is not None
        return texts.closed(view, notice.party, message.outcome)

    # ----------------------------------------------------------------- e-mail sender

    async def _email_loop(self, loop: Loop) -> None:
        await self._work(loop, "e-mail sender", self.send_due_emails)

    async def _work(self, loop: Loop, name: str, step: Callable[[], Awaitable[int]]) -> None:
        while True:
            loop.beat()
            try:
                claimed = await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Notifications must never stop the deal engine; the rows wait for the next round.
                log.error("%s failed (%s: %s); resuming", name, type(exc).__name__, exc)
                await asyncio.sleep(ERROR_PAUSE_SECONDS)
                continue
            if claimed < BATCH:
                await asyncio.sleep(IDLE_POLL_SECONDS)

    async def send_due_emails(self) -> int:
        assert self.config.smtp is not None
        rows = await store.claim_emails(self.pool, BATCH, lease_seconds(self.config.smtp.timeout_seconds))
        await asyncio.gather(*(self._send_email(row) for row in rows))
        return len(rows)

    async def _send_email(self, row: asyncpg.Record) -> None:
        assert self.mailer is not None and self.config.smtp is not None
        attempt = row["attempts"]
        fields = {"deal_id": row["deal_id"], "email_id": row["id"], "kind": row["kind"], "attempt": attempt}
        try:
            await self.mailer.send(
                row["recipient"],
                row["subject"],
                row["body"],
                message_id=rules.message_id(row["event_id"], row["recipient"], self.config.smtp.sender),
            )
        except MailError as exc:
            policy = self.config.retry
            retry = None if exc.permanent or rules.gives_up(attempt, policy) else rules.retry_delay(attempt, policy)
            await store.email_failed(self.pool, row["id"], attempt, exc.reason, retry)
            EMAILS.labels(row["kind"], "retry" if retry is not None else "failed").inc()
            if retry is None:
                log.warning("e-mail given up: %s", exc.reason, extra=fields)
            else:
                log.info("e-mail not sent (%s); retrying in %.1fs", exc.reason, retry, extra=fields)
            return
        await store.email_sent(self.pool, row["id"], attempt)
        EMAILS.labels(row["kind"], "sent").inc()
        log.info("e-mail sent", extra=fields)

    # ----------------------------------------------------------------- webhook sender

    async def _webhook_loop(self, loop: Loop) -> None:
        assert self.config.webhooks is not None
        async with webhooks.new_client(self.config.webhooks.timeout_seconds) as client:
            await self._work(loop, "webhook sender", lambda: self.send_due_webhooks(client))

    async def send_due_webhooks(self, client: httpx.AsyncClient) -> int:
        assert self.config.webhooks is not None
        rows = await store.claim_deliveries(self.pool, BATCH, lease_seconds(self.config.webhooks.timeout_seconds))
        await asyncio.gather(*(self._deliver(client, row) for row in rows))
        return len(rows)

    async def _deliver(self, client: httpx.AsyncClient, row: asyncpg.Record) -> None:
        config = self.config.webhooks
        assert config is not None
        attempt, round_start = row["attempts"], row["round_start"]
        fields = {
            "delivery_id": row["id"],
            "event_id": row["event_id"],
            "receiver": rules.safe_url(row["url"]),
            "attempt": attempt,
        }
        removed = row["url"] not in config.urls
        if removed:
            result = webhooks.PostResult(
                delivered=False, http_status=None, error="URL no longer in OTC_WEBHOOK_URLS", duration_ms=0
            )
            final = True
        else:
            result = await webhooks.post(
                client,
                row["url"],
                bytes(row["body"]),
                config.secret,
                row["event_id"],
                row["event_type"],
                limit_seconds=config.timeout_seconds,
            )
            final = rules.gives_up(attempt - round_start, self.config.retry)
        if result.delivered:
            outcome, retry = "DELIVERED", None
        elif final:
            outcome, retry = "FAILED", None
        else:
            outcome, retry = "PENDING", rules.retry_delay(attempt - round_start, self.config.retry)
        await store.record_attempt(
            self.pool,
            delivery_id=row["id"],
            attempt=attempt,
            round_start=round_start,
            http_status=result.http_status,
            error=result.error,
            duration_ms=result.duration_ms,
            outcome=outcome,
            retry_in=retry,
        )
        WEBHOOKS.labels(outcome.lower()).inc()
        if outcome == "DELIVERED":
            log.info("webhook delivered", extra=fields)
        elif outcome == "PENDING":
            log.info("webhook not delivered (%s); retrying in %.1fs", result.error, retry, extra=fields)
        elif removed:
            log.info("webhook dropped: its URL is no longer configured", extra=fields)
        else:
            log.warning("webhook given up: %s", result.error, extra=fields)
            await self.service.nats.raise_alert(
                "webhook_failed",
                f"delivery {row['id']} of {row['event_type']} to {rules.safe_url(row['url'])} failed: {result.error}",
            )

    # ----------------------------------------------------------------- otc.sendInvite

    async def send_invite(self, params: SendInviteParams) -> dict[str, Any]:
        """Mails a party its own link. `params.token` must be that party's token: the engine keeps only
        hashes, so whoever asks must already hold the link (the deal's creator holds both). The address
        becomes the party's contact for deal e-mails until the party fills its details."""
        if self.mailer is None:
            raise AppError(
                EMAIL_DISABLED_CODE,
                "e-mail invitations are not enabled on this broker; share the party's link another way",
            )
        if not is_mailbox(params.email):
            raise AppError(ErrorCode.INVALID_PARAMS, "email: not a usable e-mail address")
        invite_id = str(uuid.uuid4())
        now = _now()
        async with self.pool.acquire() as conn, conn.transaction():
            # The deal lock serialises invitations of one deal, so the hourly limit holds across replicas.
            deal = await engine_store.lock_deal(conn, params.deal_id)
            if deal is None:
                raise AppError(ErrorCode.DEAL_NOT_FOUND, f"no deal with id {params.deal_id!r}")
            sides = await engine_store.get_sides(conn, params.deal_id)
            if not token_matches(params.token, sides[params.party]["token_hash"]):
                raise AppError(ErrorCode.INVALID_TOKEN, f"the token is not valid for party {params.party.value}")
            if deal["stage"] == Stage.CLOSED.value:
                raise AppError(ErrorCode.WRONG_STAGE, "the deal is closed; there is nothing to invite to")
            if await store.recent_invites(conn, params.deal_id, now - timedelta(hours=1)) >= INVITES_PER_DEAL_PER_HOUR:
                raise AppError(
                    ErrorCode.RATE_LIMITED,
                    f"at most {INVITES_PER_DEAL_PER_HOUR} invitations per deal per hour; please wait",
                )
            view = self.deal_view(deal, list(sides.values()))
            if view is None:
                raise AppError(ErrorCode.UNKNOWN_ASSET, "this deal's assets are no longer traded here")
            await store.add_invite(conn, invite_id, params.deal_id, params.party.value, params.email)
        mail = texts.invite(
            view,
            params.party,
            texts.party_link(self.config.public_base_url, params.deal_id, params.party, params.token),
        )
        fields = {"deal_id": params.deal_id, "party": params.party.value, "invite_id": invite_id}
        try:
            await self.mailer.send(params.email, mail.subject, mail.body, limit_seconds=INVITE_SMTP_TIMEOUT_SECONDS)
        except MailError as exc:
            await store.invite_failed(self.pool, invite_id, exc.reason)
            EMAILS.labels("INVITE", "failed").inc()
            log.warning("invitation not sent: %s", exc.reason, extra=fields)
            if exc.permanent:
                raise AppError(
                    ErrorCode.INVALID_PARAMS, f"email: the mail server would not deliver to this address ({exc.reason})"
                ) from None
            raise AppError(
                ErrorCode.TEMPORARILY_UNAVAILABLE,
                "the invitation could not be sent right now (mail server unavailable); please retry shortly",
            ) from None
        await store.invite_sent(self.pool, invite_id, params.deal_id, params.party.value, params.email)
        EMAILS.labels("INVITE", "sent").inc()
        log.info("invitation sent", extra=fields)
        return {"ok": True, "inviteId": invite_id}


def message_body(envelope: Envelope) -> bytes:
    """The exact JSON a webhook receiver gets: the envelope's event_id, type, occurred_at and payload."""
    return encode(envelope)
