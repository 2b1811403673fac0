"""JSON-RPC 2.0 over POST /rpc. Deal methods go to the engine over NATS; the gateway keeps nothing durable,
only recent `otc.status` answers in memory (status_cache.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import msgspec
import nats.errors

from otc_common import subjects
from otc_common.errors import AppError, ErrorCode
from otc_common.messages import (
    RPC_PARAMS,
    ChainFilterParams,
    EngineRequest,
    RpcErrorBody,
    StatusParams,
)
from otc_common.money import format_amount
from otc_common.registry import Registry
from otc_common.runtime import Service
from otc_gateway.openrpc import DISCOVER, build_document
from otc_gateway.ratelimit import Limits
from otc_gateway.status_cache import StatusCache

log = logging.getLogger("otc.gateway.rpc")

MAX_BATCH = 20
ENGINE_TIMEOUT_SECONDS = 5.0

_encoder = msgspec.json.Encoder()


class _EngineAnswer(msgspec.Struct, frozen=True):
    """The engine's reply with its result left as the bytes the engine wrote."""

    result: msgspec.Raw = msgspec.Raw()
    error: RpcErrorBody | None = None


_reply_decoder = msgspec.json.Decoder(_EngineAnswer)
#: What the engine's reply holds when it has no result (JSON null).
NULL = b"null"


class RpcRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    jsonrpc: str
    method: str
    params: dict[str, Any] | list[Any] | None = None
    id: str | int | msgspec.UnsetType | None = msgspec.UNSET


def error(code: int, message: str, request_id: Any = None, data: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": int(code), "message": message}
    if data is not None:
        body["data"] = data
    return {"jsonrpc": "2.0", "error": body, "id": request_id}


def _field_message(exc: msgspec.ValidationError) -> str:
    """msgspec says `... - at `$.alice.amount``; say it the caller's way: `params.alice.amount: ...`."""
    text = str(exc)
    if " - at `$" in text:
        reason, where = text.rsplit(" - at `$", 1)
        return f"params{where.rstrip('`')}: {reason}"
    return f"params: {text}"


def retry_after(document: Any) -> int | None:
    """The longest retryAfterSeconds among the rate-limit errors of a response document.

    The engine may answer 1011 on its own (say, too many invitations) without saying when to
    retry; such errors pass through without a Retry-After header.
    """
    replies = document if isinstance(document, list) else [document]
    waits = []
    for reply in replies:
        error = reply.get("error") if isinstance(reply, dict) else None
        if not isinstance(error, dict) or error.get("code") != ErrorCode.RATE_LIMITED:
            continue
        data = error.get("data")
        wait = data.get("retryAfterSeconds") if isinstance(data, dict) else None
        if isinstance(wait, int) and not isinstance(wait, bool) and wait > 0:
            waits.append(wait)
    return max(waits) if waits else None


def _nul_path(value: Any, path: str = "params") -> str | None:
    """Where a NUL character hides in the params, if anywhere: PostgreSQL text cannot hold one."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nul_path(key, path) or _nul_path(item, f"{path}.{key}")
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


class RpcHandler:
    def __init__(
        self,
        service: Service,
        registry: Registry,
        public_base_url: str,
        limits: Limits | None = None,
        cache: StatusCache | None = None,
    ) -> None:
        self.service = service
        self.registry = registry
        self.public_base_url = public_base_url.rstrip("/")
        self.limits = limits
        self.cache = cache if cache is not None else StatusCache(ttl=0, max_entries=1)
        self.local = {"otc.getChainConfig": self.get_chain_config, "otc.listAssets": self.list_assets}
        self.openrpc = build_document(self.public_base_url)

    async def handle_body(self, body: bytes, client: str | None = None) -> Any:
        """The response document for a request body, or None when only notifications were sent.

        `client` is the caller's address for the per-client rate limit; each call of a batch counts.
        """
        try:
            document = msgspec.json.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            # ValidationError: numbers beyond float range; RecursionError: absurdly deep nesting.
            return error(ErrorCode.PARSE_ERROR, "parse error: the body is not valid JSON")
        if self.limits is not None and client is not None:
            try:
                self.limits.check_client(client, len(document) if isinstance(document, list) else 1)
            except AppError as exc:
                return error(exc.code, exc.message, data=exc.data)
        if isinstance(document, list):
            if not document:
                return error(ErrorCode.INVALID_REQUEST, "invalid request: empty batch")
            if len(document) > MAX_BATCH:
                return error(ErrorCode.INVALID_REQUEST, f"invalid request: a batch holds at most {MAX_BATCH} calls")
            replies = await asyncio.gather(*(self.handle_one(item) for item in document))
            answered = [reply for reply in replies if reply is not None]
            return answered or None
        return await self.handle_one(document)

    async def handle_one(self, item: Any) -> dict[str, Any] | None:
        try:
            request = msgspec.convert(item, RpcRequest)
        except msgspec.ValidationError as exc:
            request_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(request_id, str | int) or isinstance(request_id, bool):
                request_id = None
            return error(ErrorCode.INVALID_REQUEST, f"invalid request: {exc}", request_id)
        request_id = None if request.id is msgspec.UNSET else request.id
        if request.jsonrpc != "2.0":
            return error(ErrorCode.INVALID_REQUEST, 'invalid request: jsonrpc must be "2.0"', request_id)
        result = await self.call(request.method, request.params)
        if request.id is msgspec.UNSET:
            return None
        if "error" in result:
            return {"jsonrpc": "2.0", "error": result["error"], "id": request_id}
        return {"jsonrpc": "2.0", "result": result["result"], "id": request_id}

    async def call(self, method: str, params: Any) -> dict[str, Any]:
        if method == DISCOVER:
            if params:
                return {"error": {"code": ErrorCode.INVALID_PARAMS, "message": f"{DISCOVER} takes no params"}}
            return {"result": self.openrpc}
        params_type = RPC_PARAMS.get(method)
        if params_type is None:
            return {"error": {"code": ErrorCode.METHOD_NOT_FOUND, "message": f"method not found: {method}"}}
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return {
                "error": {
                    "code": ErrorCode.INVALID_PARAMS,
                    "message": "params must be an object of named fields",
                }
            }
        try:
            typed = msgspec.convert(params, params_type)
        except msgspec.ValidationError as exc:
            return {"error": {"code": ErrorCode.INVALID_PARAMS, "message": _field_message(exc)}}
        nul = _nul_path(params)
        if nul is not None:
            return {"error": {"code": ErrorCode.INVALID_PARAMS, "message": f"{nul}: must not contain NUL characters"}}
        try:
            deal_id = getattr(typed, "deal_id", None)
            if self.limits is not None and isinstance(deal_id, str):
                self.limits.check_deal(deal_id)
            if isinstance(typed, ChainFilterParams):
                return {"result": self.local[method](typed)}
            if isinstance(typed, StatusParams):
                return {"result": msgspec.Raw(await self.status(typed))}
            try:
                return {"result": await self.forward(method, typed)}
            finally:
                if isinstance(deal_id, str):
                    # Whatever the outcome (a timeout may hide a success), this gateway's own clients must
                    # see their command's effect in their next status: what was kept of the deal is stale.
                    self.cache.deal_changed(deal_id)
        except AppError as exc:
            body: dict[str, Any] = {"code": int(exc.code), "message": exc.message}
            if exc.data is not None:
                body["data"] = exc.data
            return {"error": body}

    async def status(self, params: StatusParams) -> bytes:
        """The JSON of `otc.status`'s result: from memory where it is still the engine's answer."""
        kept = self.cache.lookup(params.deal_id, params.token)
        if kept is not None:
            return kept
        started = self.cache.started()
        answer = await self.ask_engine("otc.status", params)
        self.cache.store(params.deal_id, params.token, started, answer)
        return answer

    async def status_document(self, params: StatusParams) -> dict[str, Any]:
        document: dict[str, Any] = msgspec.json.decode(await self.status(params))
        return document

    async def forward(self, method: str, params: msgspec.Struct) -> Any:
        result = msgspec.json.decode(await self.ask_engine(method, params))
        if method == "otc.createDeal":
            deal_id = result["dealId"]
            result["linkA"] = f"{self.public_base_url}/d/{deal_id}/a/{result['aliceToken']}"
            result["linkB"] = f"{self.public_base_url}/d/{deal_id}/b/{result['bobToken']}"
        return result

    async def ask_engine(self, method: str, params: msgspec.Struct) -> bytes:
        """The engine's result as the JSON it sent; its errors raised as AppError."""
        request = EngineRequest(method=method, params=msgspec.Raw(_encoder.encode(params)))
        try:
            msg = await self.service.nats.nc.request(
                subjects.ENGINE_RPC, _encoder.encode(request), timeout=ENGINE_TIMEOUT_SECONDS
            )
        except (
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.errors.ConnectionClosedError,
        ) as exc:
            log.warning("engine did not answer %s: %s", method, type(exc).__name__)
            raise AppError(
                ErrorCode.TEMPORARILY_UNAVAILABLE,
                "the service is temporarily unavailable; nothing was changed by this call unless its effect "
                "shows in otc.status; please retry shortly",
            ) from None
        reply = _reply_decoder.decode(msg.data)
        if reply.error is not None:
            try:
                code = ErrorCode(reply.error.code)
            except ValueError:
                # A code from a newer engine: passed on as it is rather than turned into something else.
                code = cast(ErrorCode, reply.error.code)
            raise AppError(code, reply.error.message, reply.error.data)
        # A copy: the raw result would otherwise keep the whole received message alive.
        return bytes(reply.result) or NULL

    # ----------------------------------------------------------------- registry methods

    def _chains(self, params: ChainFilterParams) -> list[Any]:
        if params.chain_id is None:
            return list(self.registry.chains.values())
        chain = self.registry.chains.get(params.chain_id)
        if chain is None:
            known = ", ".join(sorted(self.registry.chains))
            raise AppError(
                ErrorCode.UNKNOWN_CHAIN, f"params.chainId: unknown chain {params.chain_id!r}; known: {known}"
            )
        return [chain]

    def get_chain_config(self, params: ChainFilterParams) -> dict[str, Any]:
        return {
            "chains": [
                {
                    "chainId": chain.id,
                    "kind": chain.kind.value,
                    "networkId": chain.chain_id,
                    "confirmations": chain.confirmations,
                    "operatorAddress": chain.operator_address,
                    "tankAddress": chain.tank_address,
                    "minTimeoutSeconds": chain.min_timeout_seconds,
                    "maxTimeoutSeconds": chain.max_timeout_seconds,
                    "explorerTxUrl": chain.explorer_tx_url or None,
                }
                for chain in self._chains(params)
            ]
        }

    def list_assets(self, params: ChainFilterParams) -> dict[str, Any]:
        return {
            "assets": [
                {
                    "chainId": chain.id,
                    "symbol": asset.symbol,
                    "decimals": asset.decimals,
                    "native": asset.native,
                    "contract": asset.contract,
                    "commissionBps": asset.commission_bps,
                    "fixedFee": format_amount(asset.fixed_fee, asset.decimals),
                    "networkFeeReserve": format_amount(asset.fee_reserve, asset.decimals),
                    "maxAmount": format_amount(asset.max_amount, asset.decimals),
                }
                for chain in self._chains(params)
                for asset in chain.assets.values()
            ]
        }
