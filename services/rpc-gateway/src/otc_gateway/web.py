"""The traders' pages: create a deal, each party's page with live updates, how it works.

Pages are rendered on the server from the engine's `otc.status`; the browser talks to the
same JSON-RPC API as everyone else (POST /rpc with Content-Type application/json) and gets
its updates pushed over server-sent events. The token in a party link is a secret: it is
never logged, never sent in a Referer, and pages are never cached.
"""

from __future__ import annotations

import io
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import msgspec
import segno
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from markupsafe import Markup
from prometheus_client import Counter, Histogram
from starlette.staticfiles import StaticFiles

from otc_common.addresses import AddressError
from otc_common.errors import AppError, ErrorCode
from otc_common.messages import Party, StatusParams
from otc_common.money import AmountError, format_amount, parse_amount
from otc_common.registry import Registry
from otc_gateway.live import DealStream, LiveHub, parse_last_event_id
from otc_gateway.ratelimit import Limits
from otc_gateway.rpc import RpcHandler
from otc_gateway.security import client_address
from otc_gateway.settings import GatewaySettings
from otc_gateway.views import SIDES, party_view, valid_link

log = logging.getLogger("otc.gateway.web")

PACKAGE_DIR = Path(__file__).parent
NO_STORE = {"Cache-Control": "no-store"}

PAGE_SECONDS = Histogram(
    "otc_gateway_page_seconds",
    "Time to render a page, engine call included",
    ["page"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PAGE_ERRORS = Counter("otc_gateway_page_errors_total", "Pages answered with an error", ["page", "reason"])


def qr_svg(text: str) -> Markup:
    """A QR code as inline SVG (no style attributes, so the strict CSP allows it)."""
    buffer = io.BytesIO()
    segno.make(text, error="m").save(
        buffer,
        kind="svg",
        scale=4,
        border=4,
        xmldecl=False,
        svgns=True,
        nl=False,
        light="#fff",
        title=text,
        omitsize=True,  # a viewBox instead of a fixed size, so CSS scales it to the screen
    )
    return Markup(buffer.getvalue().decode())  # noqa: S704 - segno escapes the title it writes


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["qr"] = qr_svg
    return env


class Pages:
    def __init__(
        self,
        rpc: RpcHandler,
        registry: Registry,
        settings: GatewaySettings,
        hub: LiveHub,
        limits: Limits,
    ) -> None:
        self.rpc = rpc
        self.registry = registry
        self.settings = settings
        self.hub = hub
        self.limits = limits
        self.templates = _templates()

    # ----------------------------------------------------------------- helpers

    def html(self, template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any) -> Response:
        body = self.templates.get_template(template).render(**context)
        return HTMLResponse(body, status_code=status, headers={**NO_STORE, **(headers or {})})

    def error_page(self, page: str, exc: AppError) -> Response:
        if exc.code is ErrorCode.RATE_LIMITED:
            PAGE_ERRORS.labels(page, "rate_limited").inc()
            seconds = str(exc.data["retryAfterSeconds"])
            return self.html(
                "error.html", 429, {"Retry-After": seconds}, title="Too many requests", message=exc.message
            )
        if exc.code is ErrorCode.TEMPORARILY_UNAVAILABLE:
            PAGE_ERRORS.labels(page, "unavailable").inc()
            return self.html(
                "error.html",
                503,
                {"Retry-After": "5"},
                title="Temporarily unavailable",
                message="The service is temporarily unavailable. Please reload this page in a few seconds.",
            )
        return self.not_found(page)

    def not_found(self, page: str) -> Response:
        PAGE_ERRORS.labels(page, "not_found").inc()
        return self.html(
            "error.html",
            404,
            title="Link not valid",
            message="This link does not lead to a deal. Check that you copied the whole link.",
        )

    def limit(self, request: Request, deal_id: str | None = None) -> None:
        self.limits.check_client(client_address(request, self.settings.forwarded_hops))
        if deal_id is not None:
            self.limits.check_deal(deal_id)

    async def status(self, deal_id: str, token: str, *, fresh: bool = False) -> dict[str, Any]:
        """The deal's status; `fresh` asks the engine itself (a live stream starts from it)."""
        params = StatusParams(deal_id=deal_id, token=token)
        if fresh:
            result: dict[str, Any] = await self.rpc.forward("otc.status", params)
            return result
        return await self.rpc.status_document(params)

    def live_view(self, status: dict[str, Any], me: Party) -> dict[str, Any]:
        return party_view(status, me, self.registry, datetime.now(UTC))

    def render_live(self, status: dict[str, Any], me: Party) -> dict[str, Any]:
        view = self.live_view(status, me)
        html = self.templates.get_template("_live.html").render(view=view)
        return {
            "stage": view["stage"],
            "outcome": view["outcome"],
            "filled": view["filled"],
            "showForm": view["showForm"],
            "html": html,
        }

    def catalogue(self) -> list[dict[str, Any]]:
        return [
            {
                "chainId": chain.id,
                "kind": chain.kind.value,
                "minTimeout": chain.min_timeout_seconds,
                "maxTimeout": chain.max_timeout_seconds,
                "assets": [
                    {
                        "symbol": asset.symbol,
                        "decimals": asset.decimals,
                        "max": format_amount(asset.max_amount, asset.decimals),
                        "commissionBps": asset.commission_bps,
                        "fixedFee": format_amount(asset.fixed_fee, asset.decimals),
                    }
                    for asset in chain.assets.values()
                ],
            }
            for chain in self.registry.chains.values()
        ]

    # ----------------------------------------------------------------- routes

    def register(self, app: FastAPI) -> None:
        app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")

        @app.get("/")
        async def create_page(request: Request) -> Response:
            try:
                self.limit(request)
            except AppError as exc:
                return self.error_page("create", exc)
            return self.html("create.html", chains=self.catalogue())

        @app.get("/instructions")
        async def instructions_page(request: Request) -> Response:
            chains = sorted(self.registry.chains.values(), key=lambda c: c.id)
            return self.html("instructions.html", chains=chains)

        @app.get("/d/{deal_id}/{side}/{token}")
        async def party_page(request: Request, deal_id: str, side: str, token: str) -> Response:
            started = time.perf_counter()
            me = SIDES.get(side)
            if me is None or not valid_link(deal_id, token):
                return self.not_found("party")
            try:
                self.limit(request, deal_id)
                status = await self.status(deal_id, token)
            except AppError as exc:
                return self.error_page("party", exc)
            view = self.live_view(status, me)
            response = self.html(
                "party.html", view=view, sendChain=view["send"]["chainId"], receiveChain=view["receive"]["chainId"]
            )
            PAGE_SECONDS.labels("party").observe(time.perf_counter() - started)
            return response

        @app.get("/d/{deal_id}/{side}/{token}/events")
        async def party_events(request: Request, deal_id: str, side: str, token: str) -> Response:
            me = SIDES.get(side)
            if me is None or not valid_link(deal_id, token):
                return _json_error(404, ErrorCode.DEAL_NOT_FOUND, "no such deal link")
            return await self.stream(request, deal_id, token, me)

        @app.get("/api/deals/{deal_id}/events")
        async def api_events(request: Request, deal_id: str) -> Response:
            token = _token_from(request)
            if token is None or not valid_link(deal_id, token):
                return _json_error(
                    401 if token is None else 404,
                    ErrorCode.INVALID_TOKEN,
                    "a party token is required: ?token=… or the X-Deal-Token header",
                )
            return await self.stream(request, deal_id, token, None)

        @app.get("/api/check/amount")
        async def check_amount(request: Request, chainId: str = "", asset: str = "", amount: str = "") -> Response:
            try:
                self.limit(request)
            except AppError as exc:
                return _json_error(429, exc.code, exc.message, exc.data)
            chain = self.registry.chains.get(chainId)
            found = chain.find_asset(asset) if chain else None
            if chain is None or found is None:
                return _json({"ok": False, "message": f"{asset!r} is not traded on {chainId!r}"})
            try:
                units = parse_amount(amount, found.decimals, max_base_units=found.max_amount, symbol=found.symbol)
            except AmountError as exc:
                return _json({"ok": False, "message": str(exc)})
            return _json({"ok": True, "amount": format_amount(units, found.decimals)})

        @app.get("/api/check/address")
        async def check_address(request: Request, chainId: str = "", address: str = "") -> Response:
            try:
                self.limit(request)
            except AppError as exc:
                return _json_error(429, exc.code, exc.message, exc.data)
            chain = self.registry.chains.get(chainId)
            if chain is None:
                return _json({"ok": False, "message": f"unknown chain {chainId!r}"})
            if len(address) > 128:
                return _json({"ok": False, "message": "address is too long"})
            try:
                canonical = chain.validate_address(address.strip())
            except AddressError as exc:
                return _json({"ok": False, "message": f"not a valid {chain.id} address: {exc}"})
            return _json({"ok": True, "address": canonical})

    async def stream(self, request: Request, deal_id: str, token: str, me: Party | None) -> Response:
        try:
            self.limit(request, deal_id)
            status = await self.status(deal_id, token, fresh=True)
        except AppError as exc:
            if exc.code is ErrorCode.RATE_LIMITED:
                return _json_error(429, exc.code, exc.message, exc.data)
            if exc.code is ErrorCode.TEMPORARILY_UNAVAILABLE:
                return _json_error(503, exc.code, exc.message)
            return _json_error(404, exc.code, exc.message)
        last_seq = parse_last_event_id(request.headers.get("last-event-id") or request.query_params.get("lastEventId"))
        stream = DealStream(
            self.hub,
            self.rpc,
            deal_id,
            token,
            last_seq,
            status,
            self.settings.sse_heartbeat_seconds,
            render=(lambda s: self.render_live(s, me)) if me is not None else None,
        )
        return StreamingResponse(
            stream.events(),
            media_type="text/event-stream",
            headers={**NO_STORE, "X-Accel-Buffering": "no"},
        )


def _token_from(request: Request) -> str | None:
    token = request.query_params.get("token") or request.headers.get("x-deal-token")
    if token is None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
    return token or None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers or NO_STORE
    )


def _json_error(status: int, code: int, message: str, data: Any = None) -> Response:
    error: dict[str, Any] = {"code": int(code), "message": message}
    headers = dict(NO_STORE)
    if data is not None:
        error["data"] = data
        if isinstance(data, dict) and "retryAfterSeconds" in data:
            headers["Retry-After"] = str(data["retryAfterSeconds"])
    return _json({"error": error}, status, headers)
