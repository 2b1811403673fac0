"""The gateway's HTTP surface: POST /rpc, the OpenRPC document, the pages, health and metrics.

POST /rpc is answered by a plain ASGI handler in front of FastAPI: it is by far the most called
path, and FastAPI's routing, request and response objects cost more than the call itself when
`otc.status` is answered from memory. Everything else (other methods on /rpc included) is FastAPI's.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from otc_common.errors import ErrorCode
from otc_common.runtime import Service
from otc_gateway.live import LiveHub
from otc_gateway.ratelimit import Limits
from otc_gateway.rpc import RpcHandler, error, retry_after
from otc_gateway.security import HEADERS, SecurityHeaders, caller, is_json, origin_allowed, origin_of
from otc_gateway.settings import GatewaySettings
from otc_gateway.web import Pages

MAX_BODY_BYTES = 64 * 1024

RPC_CALLS = Counter("otc_gateway_rpc_requests_total", "JSON-RPC HTTP requests", ["outcome"])
_ANSWERED = RPC_CALLS.labels("answered")

_encoder = msgspec.json.Encoder()
_JSON_TYPE = (b"content-type", b"application/json")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=_encoder.encode(body), status_code=status, media_type="application/json", headers=headers)


class RpcEndpoint:
    """POST /rpc as a bare ASGI application (same checks, answers and headers as a FastAPI route)."""

    def __init__(self, rpc: RpcHandler, allowed_origin: str, forwarded_hops: int) -> None:
        self.rpc = rpc
        self.allowed_origin = allowed_origin
        self.forwarded_hops = forwarded_hops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = origin = declared = forwarded_for = None
        for name, value in scope["headers"]:
            # The first of repeated headers counts, as Starlette's Headers.get would have it.
            if name == b"content-type":
                content_type = value if content_type is None else content_type
            elif name == b"origin":
                origin = value if origin is None else origin
            elif name == b"content-length":
                declared = value if declared is None else declared
            elif name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for
        # Browsers send cross-site form posts only as form or text types, and add Origin to every
        # cross-origin POST: together these two checks make /rpc safe from cross-site requests.
        if not is_json(None if content_type is None else content_type.decode("latin-1")):
            RPC_CALLS.labels("wrong_content_type").inc()
            refusal = error(ErrorCode.INVALID_REQUEST, "invalid request: Content-Type must be application/json")
            await _answer(send, 415, _encoder.encode(refusal))
            return
        if not origin_allowed(None if origin is None else origin.decode("latin-1"), self.allowed_origin):
            RPC_CALLS.labels("foreign_origin").inc()
            refusal = error(ErrorCode.INVALID_REQUEST, "invalid request: calls from other sites are refused")
            await _answer(send, 403, _encoder.encode(refusal))
            return
        too_large = error(ErrorCode.INVALID_REQUEST, f"request body larger than {MAX_BODY_BYTES} bytes")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            RPC_CALLS.labels("too_large").inc()
            await _answer(send, 413, _encoder.encode(too_large))
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody is left to answer
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                RPC_CALLS.labels("too_large").inc()
                await _answer(send, 413, _encoder.encode(too_large))
                return
            if not message.get("more_body", False):
                break
        client = scope.get("client")
        peer = client[0] if client else None
        address = caller(peer, None if forwarded_for is None else forwarded_for.decode("latin-1"), self.forwarded_hops)
        reply = await self.rpc.handle_body(body, address)
        if reply is None:
            RPC_CALLS.labels("notification").inc()
            await send({"type": "http.response.start", "status": 204, "headers": list(HEADERS)})
            await send({"type": "http.response.body", "body": b""})
            return
        wait = retry_after(reply)
        if wait is None:
            _ANSWERED.inc()
            await _answer(send, 200, _encoder.encode(reply))
            return
        RPC_CALLS.labels("rate_limited").inc()
        # A single refused call is a 429; a batch with some calls refused still answers the others.
        status = 429 if isinstance(reply, dict) else 200
        await _answer(send, status, _encoder.encode(reply), [(b"retry-after", str(wait).encode())])


async def _answer(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [*(extra or ()), (b"content-length", str(len(body)).encode()), _JSON_TYPE, *HEADERS]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """POST /rpc to its own handler, every other request to the FastAPI application."""

    def __init__(self, rpc: RpcEndpoint, other: ASGIApp) -> None:
        self.rpc = rpc
        self.other = other

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/rpc" and scope["method"] == "POST":
            await self.rpc(scope, receive, send)
        else:
            await self.other(scope, receive, send)


def create_app(
    service: Service,
    rpc: RpcHandler,
    settings: GatewaySettings | None = None,
    hub: LiveHub | None = None,
) -> ASGIApp:
    settings = settings or GatewaySettings(database_url="", nats_url="", registry_file="")
    hub = hub or LiveHub()
    if rpc.limits is None:
        rpc.limits = Limits(
            settings.rate_client_per_second,
            settings.rate_client_burst,
            settings.rate_deal_per_second,
            settings.rate_deal_burst,
        )
    limits = rpc.limits
    allowed_origin = origin_of(rpc.public_base_url)
    app = FastAPI(title="otc-broker gateway", docs_url=None, redoc_url=None, openapi_url=None)

    endpoint = RpcEndpoint(rpc, allowed_origin, settings.forwarded_hops)
    # Also a route of its own, so that FastAPI still answers other methods (405) and "/rpc/" (redirect).
    app.router.routes.append(Route("/rpc", endpoint, methods=["POST"], include_in_schema=False))

    @app.get("/openrpc.json")
    async def openrpc() -> Response:
        return _json(rpc.openrpc)

    @app.get("/healthz")
    async def healthz() -> Response:
        ok, body = service.liveness()
        return _json(body, 200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> Response:
        ok, body = await service.readiness()
        return _json(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(content=generate_latest(), media_type=CONTENT_TYPE_LATEST)

    Pages(rpc, rpc.registry, settings, hub, limits).register(app)
    return Gateway(endpoint, SecurityHeaders(app))
