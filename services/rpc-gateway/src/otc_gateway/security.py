"""Response headers every answer carries, the Origin check for /rpc, and who the client is.

Party links carry their token in the URL path, so: no page may leak it in a Referer, no page
may run script that did not come from our own static files, and nothing the gateway logs
contains a request path.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)

HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
)


class SecurityHeaders:
    """Adds HEADERS to every HTTP response (a plain ASGI wrapper, so streaming responses pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in HEADERS if name not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


def origin_of(url: str) -> str:
    """`scheme://host[:port]` as a browser writes it in the Origin header (default ports omitted)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origin_allowed(origin: str | None, allowed: str) -> bool:
    """No Origin (a non-browser client, or a same-origin GET) is fine; a present one must be ours."""
    if origin is None:
        return True
    try:
        return origin_of(origin.strip()) == allowed
    except ValueError:
        return False


def is_json(content_type: str | None) -> bool:
    """application/json, with or without parameters: a cross-site HTML form can never send it."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def client_address(request: Request, forwarded_hops: int) -> str:
    """The caller's address: the peer, or the entry our own `forwarded_hops` proxies appended."""
    peer = request.client.host if request.client else None
    return caller(peer, request.headers.get("x-forwarded-for"), forwarded_hops)


def caller(peer: str | None, forwarded_for: str | None, forwarded_hops: int) -> str:
    """`client_address` from the parts of a request: the peer's address and its X-Forwarded-For header."""
    if forwarded_hops > 0:
        hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
        if len(hops) >= forwarded_hops:
            return hops[-forwarded_hops]
    return peer if peer is not None else "unknown"
