"""Gateway → engine calls over core NATS request/reply (queue group, so replicas share the load)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from nats.aio.msg import Msg

from otc_common.errors import AppError, ErrorCode
from otc_common.messages import (
    RPC_PARAMS,
    CancelDealParams,
    CreateDealParams,
    EngineReply,
    EngineRequest,
    FillPartyDetailsParams,
    Params,
    RpcErrorBody,
    StatusParams,
)
from otc_engine.service import Engine

log = logging.getLogger("otc.engine.api")

#: What a PostgreSQL restart, failover or overload looks like from here.
DATABASE_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)

_request_decoder = msgspec.json.Decoder(EngineRequest)
_encoder = msgspec.json.Encoder()


class EngineApi:
    #: Requests handled at once per replica; the rest wait in NATS' pending buffer.
    CONCURRENCY = 64

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._slots = asyncio.Semaphore(self.CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self.methods: dict[str, Callable[[Any], Awaitable[dict[str, Any]]]] = {
            "otc.createDeal": self._typed(CreateDealParams, engine.create_deal),
            "otc.fillPartyDetails": self._typed(FillPartyDetailsParams, engine.fill_party_details),
            "otc.status": self._typed(StatusParams, engine.status),
            "otc.cancelDeal": self._typed(CancelDealParams, engine.cancel_deal),
        }

    @staticmethod
    def _typed(
        cls: type[Params], fn: Callable[[Any], Awaitable[dict[str, Any]]]
    ) -> Callable[[Any], Awaitable[dict[str, Any]]]:
        assert cls in RPC_PARAMS.values()
        return fn

    async def on_request(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _answer(self, msg: Msg) -> None:
        reply = await self.handle(msg.data)
        try:
            await msg.respond(_encoder.encode(reply))
        except Exception as exc:  # the caller has gone; nothing to undo
            log.warning("reply failed: %s", exc)

    async def handle(self, data: bytes) -> EngineReply:
        try:
            request = _request_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return EngineReply(error=RpcErrorBody(ErrorCode.INVALID_REQUEST, f"malformed engine request: {exc}"))
        method = self.methods.get(request.method)
        params_type = RPC_PARAMS.get(request.method)
        if method is None or params_type is None:
            return EngineReply(error=RpcErrorBody(ErrorCode.METHOD_NOT_FOUND, f"method not found: {request.method}"))
        try:
            params = msgspec.json.decode(request.params, type=params_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return EngineReply(error=RpcErrorBody(ErrorCode.INVALID_PARAMS, f"invalid params: {exc}"))
        try:
            return EngineReply(result=await method(params))
        except AppError as exc:
            return EngineReply(error=RpcErrorBody(exc.code, exc.message, exc.data))
        except DATABASE_UNREACHABLE as exc:
            # A restart or failover of PostgreSQL is not the caller's fault and passes: tell them to retry. A
            # connection lost during COMMIT leaves it unknown whether the call took effect, hence the wording.
            log.warning("database unreachable for %s: %s", request.method, type(exc).__name__)
            return EngineReply(
                error=RpcErrorBody(
                    ErrorCode.TEMPORARILY_UNAVAILABLE,
                    "the service is temporarily unavailable; nothing was changed by this call unless its effect "
                    "shows in otc.status; please retry shortly",
                )
            )
        except Exception:
            log.exception("engine method failed", extra={"method": request.method})
            return EngineReply(error=RpcErrorBody(ErrorCode.INTERNAL_ERROR, "internal error; nothing was changed"))
