"""The gateway's HTTP surface: POST /rpc, the OpenRPC document, the pages, health and metrics."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.types import ASGIApp

from otc_common.errors import ErrorCode
from otc_common.runtime import Service
from otc_gateway.live import LiveHub
from otc_gateway.ratelimit import Limits
from otc_gateway.rpc import RpcHandler, error, retry_after
from otc_gateway.security import SecurityHeaders, client_address, is_json, origin_allowed, origin_of
from otc_gateway.settings import GatewaySettings
from otc_gateway.web import Pages

MAX_BODY_BYTES = 64 * 1024

RPC_CALLS = Counter("otc_gateway_rpc_requests_total", "JSON-RPC HTTP requests", ["outcome"])

_encoder = msgspec.json.Encoder()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=_encoder.encode(body), status_code=status, media_type="application/json", headers=headers)


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

    @app.post("/rpc")
    async def rpc_endpoint(request: Request) -> Response:
        # Browsers send cross-site form posts only as form or text types, and add Origin to every
        # cross-origin POST: together these two checks make /rpc safe from cross-site requests.
        if not is_json(request.headers.get("content-type")):
            RPC_CALLS.labels("wrong_content_type").inc()
            refusal = error(ErrorCode.INVALID_REQUEST, "invalid request: Content-Type must be application/json")
            return _json(refusal, 415)
        if not origin_allowed(request.headers.get("origin"), allowed_origin):
            RPC_CALLS.labels("foreign_origin").inc()
            return _json(error(ErrorCode.INVALID_REQUEST, "invalid request: calls from other sites are refused"), 403)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            RPC_CALLS.labels("too_large").inc()
            return _json(error(ErrorCode.INVALID_REQUEST, f"request body larger than {MAX_BODY_BYTES} bytes"), 413)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_BODY_BYTES:
                RPC_CALLS.labels("too_large").inc()
                return _json(error(ErrorCode.INVALID_REQUEST, f"request body larger than {MAX_BODY_BYTES} bytes"), 413)
        reply = await rpc.handle_body(bytes(body), client_address(request, settings.forwarded_hops))
        if reply is None:
            RPC_CALLS.labels("notification").inc()
            return Response(status_code=204)
        wait = retry_after(reply)
        if wait is None:
            RPC_CALLS.labels("answered").inc()
            return _json(reply)
        RPC_CALLS.labels("rate_limited").inc()
        # A single refused call is a 429; a batch with some calls refused still answers the others.
        status = 429 if isinstance(reply, dict) else 200
        return _json(reply, status, {"Retry-After": str(wait)})

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
    return SecurityHeaders(app)
