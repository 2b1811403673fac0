"""Pure decisions of notifications and webhooks: who is told what, when to retry, what a reply means."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import urljoin, urlsplit

import msgspec

from otc_common.messages import Message, Outcome, Party, SideFunded, Stage, StageChanged
from otc_engine.notify.settings import RetryPolicy

#: A trader is not told about an event this old (an engine catching up after a long outage, or a
#: consumer created on an existing stream replays history).
EMAIL_MAX_EVENT_AGE = timedelta(days=2)
#: Same-origin 307/308 hops a webhook delivery follows; anything else is not followed.
MAX_REDIRECTS = 3


class EmailKind(StrEnum):
    SIDE_FUNDED = "SIDE_FUNDED"
    SWAPPED = "SWAPPED"
    REFUNDED = "REFUNDED"
    CANCELLED = "CANCELLED"


class Notice(msgspec.Struct, frozen=True):
    party: Party
    recipient: str
    kind: EmailKind


def notices_for(
    message: Message, occurred_at: datetime, now: datetime, emails: Mapping[Party, str | None]
) -> list[Notice]:
    """The e-mails one deal event causes: the funded side's party, or both parties when the deal closes."""
    if now - occurred_at > EMAIL_MAX_EVENT_AGE:
        return []
    if isinstance(message, SideFunded):
        targets = [(message.party, EmailKind.SIDE_FUNDED)]
    elif isinstance(message, StageChanged) and message.stage is Stage.CLOSED and message.outcome is not None:
        kind = EmailKind(Outcome(message.outcome).value)
        targets = [(Party.ALICE, kind), (Party.BOB, kind)]
    else:
        return []
    notices: list[Notice] = []
    seen: set[str] = set()
    for party, kind in targets:
        address = emails.get(party)
        # Two parties sharing one address get one e-mail per event: rows are keyed by recipient.
        if address and address.lower() not in seen:
            seen.add(address.lower())
            notices.append(Notice(party, address, kind))
    return notices


def retry_delay(attempts: int, policy: RetryPolicy) -> float:
    """Delay after the `attempts`-th failed attempt: first_seconds, doubling, capped."""
    exponent = min(max(attempts - 1, 0), 30)
    return float(min(policy.first_seconds * 2**exponent, policy.max_seconds))


def gives_up(attempts_in_round: int, policy: RetryPolicy) -> bool:
    return attempts_in_round >= policy.max_attempts


def smtp_permanent(code: int | None) -> bool:
    """5xx replies (address refused, message rejected) will not change on retry; 4xx and no reply may."""
    return code is not None and 500 <= code < 600


def message_id(event_id: str, recipient: str, sender: str) -> str:
    """Stable per (event, recipient): a re-send after a crash carries the same id and mail clients merge it."""
    key = uuid.uuid5(uuid.NAMESPACE_URL, f"otc-mail:{event_id}/{recipient.lower()}")
    domain = sender.rsplit("@", 1)[-1] or "otc.invalid"
    return f"<{key}@{domain}>"


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str) -> bool:
    return hmac.compare_digest(signature(secret, body), header)


class Reply(StrEnum):
    DELIVERED = "DELIVERED"
    REDIRECT = "REDIRECT"
    FAILED = "FAILED"


def classify_reply(status: int) -> Reply:
    if 200 <= status < 300:
        return Reply.DELIVERED
    if status in (307, 308):
        # Only these two keep the method and body; 301/302/303 would turn the POST into a GET.
        return Reply.REDIRECT
    return Reply.FAILED


def redirect_target(url: str, location: str | None) -> str | None:
    """Where a redirect may be followed: the same scheme, host and port only, so a receiver cannot
    bounce signed deal events to a third party."""
    if not location:
        return None
    target = urljoin(url, location)
    here, there = urlsplit(url), urlsplit(target)
    if (here.scheme, here.hostname, here.port) != (there.scheme, there.hostname, there.port):
        return None
    return target


def safe_url(url: str) -> str:
    """What a log line may show of a webhook URL: paths and queries often carry the receiver's own secret."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
