"""Operator calls into the engine over core NATS request/reply: halting and resuming payouts per chain.

The subject is not one the gateway forwards (it only relays the public `otc.*` methods), so only
something on the bus itself, such as the `otc` operator CLI, can reach it. The engine keeps the
safeguards: a resume re-commands the planned transfers through `Flow.command`, which skips any
chain that is (again) halted.

Requests and replies have the shape of the public API's (`EngineRequest` / `EngineReply`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

import msgspec
from nats.aio.msg import Msg

from otc_common import subjects
from otc_common.bus import emit
from otc_common.db import Connection
from otc_common.errors import AppError, ErrorCode
from otc_common.messages import AlertRaised, EngineReply, EngineRequest, RpcErrorBody
from otc_common.runtime import Service
from otc_engine import store
from otc_engine.metrics import HALTED
from otc_engine.service import Engine

log = logging.getLogger("otc.engine.admin")

ADMIN_SUBJECT = "otc.admin.engine"
ADMIN_QUEUE_GROUP = "engine-admin"

_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
ChainName = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=_PRINTABLE)]


class HaltParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    chain: ChainName
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500, pattern=_PRINTABLE)]


class ChainParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    chain: ChainName


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


_request_decoder = msgspec.json.Decoder(EngineRequest)
_encoder = msgspec.json.Encoder()


# --------------------------------------------------------------------------- SQL


async def halt(conn: Connection, chain: str, reason: str) -> bool:
    """True when this call halted the chain; an existing halt keeps its first reason."""
    fresh = await conn.fetchval(
        "INSERT INTO chain_halts (chain, reason) VALUES ($1, $2) ON CONFLICT (chain) DO NOTHING RETURNING true",
        chain,
        reason,
    )
    return bool(fresh)


async def halts(conn: Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT chain, reason, halted_at FROM chain_halts ORDER BY chain")
    return [_halt_view(row["chain"], row["reason"], row["halted_at"]) for row in rows]


async def _unhalt(conn: Connection, chain: str) -> str | None:
    value = await conn.fetchval("DELETE FROM chain_halts WHERE chain = $1 RETURNING reason", chain)
    return None if value is None else str(value)


async def _deals_with_planned(conn: Connection, chain: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT deal_id FROM transfers WHERE chain = $1 AND status = 'PLANNED' ORDER BY deal_id", chain
    )
    return [row["deal_id"] for row in rows]


async def _planned_count(conn: Connection, deal_id: str, chain: str) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM transfers WHERE deal_id = $1 AND chain = $2 AND status = 'PLANNED'", deal_id, chain
    )
    return int(value or 0)


def _halt_view(chain: str, reason: str, halted_at: datetime) -> dict[str, Any]:
    return {"chain": chain, "reason": reason, "haltedAt": halted_at.isoformat()}


# --------------------------------------------------------------------------- the calls


class EngineAdmin:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.methods: dict[str, tuple[type[msgspec.Struct], Callable[[Any], Awaitable[dict[str, Any]]]]] = {
            "chain.halt": (HaltParams, self.halt),
            "chain.resume": (ChainParams, self.resume),
            "chain.halts": (NoParams, self.halts),
        }

    def _known_chain(self, chain: str) -> str:
        if chain not in self.engine.registry.chains:
            known = ", ".join(sorted(self.engine.registry.chains))
            raise AppError(ErrorCode.UNKNOWN_CHAIN, f"unknown chain {chain!r}; known chains: {known}")
        return chain

    async def halt(self, params: HaltParams) -> dict[str, Any]:
        chain = self._known_chain(params.chain)
        async with self.engine.pool.acquire() as conn, conn.transaction():
            fresh = await halt(conn, chain, params.reason)
            if fresh:
                await emit(
                    conn,
                    subjects.alert("engine"),
                    AlertRaised(
                        source="engine",
                        kind="chain_halted",
                        detail=f"payouts on {chain} halted by an operator: {params.reason}",
                        chain=chain,
                    ),
                )
            row = await conn.fetchrow("SELECT reason, halted_at FROM chain_halts WHERE chain = $1", chain)
        assert row is not None
        HALTED.labels(chain).set(1)
        if fresh:
            log.warning("payouts halted by an operator", extra={"chain": chain, "reason": params.reason})
        return {**_halt_view(chain, row["reason"], row["halted_at"]), "halted": True, "new": fresh}

    async def resume(self, params: ChainParams) -> dict[str, Any]:
        """Lifts the halt, then commands what waited, one deal per transaction.

        Calling it again after a crash part-way (or on a chain that is not halted) commands whatever
        is still planned, so it is safe to repeat.
        """
        chain = self._known_chain(params.chain)
        async with self.engine.pool.acquire() as conn, conn.transaction():
            previous = await _unhalt(conn, chain)
        HALTED.labels(chain).set(0)
        if previous is not None:
            log.warning("payouts resumed by an operator", extra={"chain": chain, "halted_for": previous})
        async with self.engine.pool.acquire() as conn:
            deal_ids = await _deals_with_planned(conn, chain)
        commanded = 0
        for deal_id in deal_ids:
            async with self.engine.pool.acquire() as conn, conn.transaction():
                if await store.lock_deal(conn, deal_id) is None:
                    continue
                before = await _planned_count(conn, deal_id, chain)
                await self.engine.flow.command(conn, deal_id)
                commanded += before - await _planned_count(conn, deal_id, chain)
        return {
            "chain": chain,
            "resumed": previous is not None,
            "previousReason": previous,
            "deals": len(deal_ids),
            "commanded": commanded,
        }

    async def halts(self, params: NoParams) -> dict[str, Any]:
        async with self.engine.pool.acquire() as conn:
            return {"halts": await halts(conn)}

    # ----------------------------------------------------------------- transport

    async def on_request(self, msg: Msg) -> None:
        reply = await self.handle(msg.data)
        try:
            await msg.respond(_encoder.encode(reply))
        except Exception as exc:  # the caller has gone; what was done stays done
            log.warning("admin reply failed: %s", exc)

    async def handle(self, data: bytes) -> EngineReply:
        try:
            request = _request_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return EngineReply(error=RpcErrorBody(ErrorCode.INVALID_REQUEST, f"malformed admin request: {exc}"))
        entry = self.methods.get(request.method)
        if entry is None:
            known = ", ".join(sorted(self.methods))
            return EngineReply(
                error=RpcErrorBody(ErrorCode.METHOD_NOT_FOUND, f"method not found: {request.method}; known: {known}")
            )
        params_type, method = entry
        try:
            params = msgspec.json.decode(request.params, type=params_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return EngineReply(error=RpcErrorBody(ErrorCode.INVALID_PARAMS, f"invalid params: {exc}"))
        try:
            return EngineReply(result=await method(params))
        except AppError as exc:
            return EngineReply(error=RpcErrorBody(exc.code, exc.message, exc.data))
        except Exception:
            log.exception("admin method failed", extra={"method": request.method})
            return EngineReply(
                error=RpcErrorBody(ErrorCode.INTERNAL_ERROR, "internal error; see the engine's log for what was done")
            )


async def serve_admin(service: Service, engine: Engine) -> None:
    """Subscribes the admin API (call from the engine's setup, once the bus is up)."""
    admin = EngineAdmin(engine)
    await service.nats.nc.subscribe(ADMIN_SUBJECT, queue=ADMIN_QUEUE_GROUP, cb=admin.on_request)
