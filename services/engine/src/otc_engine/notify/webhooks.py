"""One signed POST of a deal event to an operator URL."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec

from otc_engine.notify import rules
from otc_engine.notify.rules import Reply

USER_AGENT = "otc-broker-webhooks/1"


class PostResult(msgspec.Struct, frozen=True, kw_only=True):
    delivered: bool
    http_status: int | None
    error: str | None
    duration_ms: int


def headers(secret: bytes, body: bytes, event_id: str, event_type: str, now: float) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-OTC-Event-Id": event_id,
        "X-OTC-Event-Type": event_type,
        "X-OTC-Timestamp": str(int(now)),
        "X-OTC-Signature": rules.signature(secret, body),
    }


def new_client(timeout_seconds: float) -> httpx.AsyncClient:
    # Redirects are handled by `post` itself, which follows them only within the same origin.
    return httpx.AsyncClient(
        follow_redirects=False,
        timeout=httpx.Timeout(timeout_seconds),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
    )


async def post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    secret: bytes,
    event_id: str,
    event_type: str,
    limit_seconds: float = 30.0,
) -> PostResult:
    """One delivery attempt, redirects included, bounded by `limit_seconds` in all (httpx's own
    time-outs bound each read, not a receiver that trickles its reply)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit_seconds):
            return await _post(client, url, body, secret, event_id, event_type, started)
    except TimeoutError:
        return _result(started, False, None, "timed out")


def _result(started: float, delivered: bool, status: int | None, error: str | None) -> PostResult:
    elapsed = int((time.monotonic() - started) * 1000)
    return PostResult(delivered=delivered, http_status=status, error=error, duration_ms=elapsed)


async def _post(
    client: httpx.AsyncClient, url: str, body: bytes, secret: bytes, event_id: str, event_type: str, started: float
) -> PostResult:

    def result(delivered: bool, status: int | None, error: str | None) -> PostResult:
        return _result(started, delivered, status, error)

    sent_headers = headers(secret, body, event_id, event_type, time.time())
    target = url
    status: int | None = None
    for _ in range(rules.MAX_REDIRECTS + 1):
        try:
            # The reply's body is never read: a receiver cannot make us buffer anything.
            async with client.stream("POST", target, content=body, headers=sent_headers) as response:
                status = response.status_code
                location = response.headers.get("location")
        except httpx.TimeoutException:
            return result(False, None, "timed out")
        except httpx.HTTPError as exc:
            return result(False, None, f"request failed ({type(exc).__name__})")
        reply = rules.classify_reply(status)
        if reply is Reply.DELIVERED:
            return result(True, status, None)
        if reply is Reply.FAILED:
            return result(False, status, f"HTTP {status}")
        following = rules.redirect_target(target, location)
        if following is None:
            return result(False, status, f"HTTP {status}: redirect to another origin not followed")
        target = following
    return result(False, status, "too many redirects")
