"""The gateway's HTTP surface: POST /rpc plus health and metrics."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from otc_common.errors import ErrorCode
from otc_common.runtime import Service
from otc_gateway.rpc import RpcHandler, error

MAX_BODY_BYTES = 64 * 1024

RPC_CALLS = Counter("otc_gateway_rpc_requests_total", "JSON-RPC HTTP requests", ["outcome"])

_encoder = msgspec.json.Encoder()


def _json(body: Any, status: int = 200) -> Response:
    return Response(content=_encoder.encode(body), status_code=status, media_type="application/json")


def create_app(service: Service, rpc: RpcHandler) -> FastAPI:
    app = FastAPI(title="otc-broker gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/rpc")
    async def rpc_endpoint(request: Request) -> Response:
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
        reply = await rpc.handle_body(bytes(body))
        if reply is None:
            RPC_CALLS.labels("notification").inc()
            return Response(status_code=204)
        RPC_CALLS.labels("answered").inc()
        return _json(reply)

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

    return app
