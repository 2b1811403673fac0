"""All of the engine's SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from otc_common.db import Connection
from otc_common.messages import Outcome, Party, Stage
from otc_engine.rules import DealState, SideState, Transition


class NewSide(msgspec.Struct, frozen=True, kw_only=True):
    party: Party
    chain: str
    asset: str
    amount: int
    commission: int
    fee_reserve: int
    escrow_index: int
    escrow_address: str
    token_hash: bytes


async def next_escrow_index(conn: Connection) -> int:
    value = await conn.fetchval("SELECT nextval('escrow_index_seq')")
    return int(value)


async def insert_deal(
    conn: Connection, deal_id: str, name: str, timeout_seconds: int, sides: Sequence[NewSide]
) -> None:
    await conn.execute(
        "INSERT INTO deals (deal_id, name, stage, timeout_seconds) VALUES ($1, $2, $3, $4)",
        deal_id,
        name,
        Stage.CREATED.value,
        timeout_seconds,
    )
    await conn.executemany(
        """INSERT INTO deal_sides (deal_id, party, chain, asset, amount, commission, fee_reserve,
                                   escrow_index, escrow_address, token_hash)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
        [
            (
                deal_id,
                s.party.value,
                s.chain,
                s.asset,
                s.amount,
                s.commission,
                s.fee_reserve,
                s.escrow_index,
                s.escrow_address,
                s.token_hash,
            )
            for s in sides
        ],
    )


async def lock_deal(conn: Connection, deal_id: str) -> asyncpg.Record | None:
    """The deal row, locked until the transaction ends: per-deal serialisation across replicas."""
    return await conn.fetchrow("SELECT * FROM deals WHERE deal_id = $1 FOR UPDATE", deal_id)


async def get_deal(conn: Connection, deal_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM deals WHERE deal_id = $1", deal_id)


async def get_sides(conn: Connection, deal_id: str) -> dict[Party, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM deal_sides WHERE deal_id = $1", deal_id)
    return {Party(row["party"]): row for row in rows}


async def fill_party(
    conn: Connection,
    deal_id: str,
    party: Party,
    payback: str,
    recipient: str,
    email: str | None,
    now: datetime,
) -> None:
    await conn.execute(
        """UPDATE deal_sides SET payback_address = $3, recipient_address = $4, email = $5, filled_at = $6
           WHERE deal_id = $1 AND party = $2 AND filled_at IS NULL""",
        deal_id,
        party.value,
        payback,
        recipient,
        email,
        now,
    )


async def mark_cancelled(conn: Connection, deal_id: str) -> None:
    await conn.execute("UPDATE deals SET cancelled = true WHERE deal_id = $1", deal_id)


async def apply_transition(conn: Connection, deal_id: str, t: Transition, now: datetime) -> None:
    await conn.execute(
        """UPDATE deals SET stage = $2, outcome = $3, expires_at = $4, remaining_ms = $5, updated_at = $6,
                  closed_at = CASE WHEN $2 = 'CLOSED' THEN $6 ELSE closed_at END
           WHERE deal_id = $1""",
        deal_id,
        t.stage.value,
        t.outcome.value if t.outcome else None,
        t.expires_at,
        t.remaining_ms,
        now,
    )


async def add_event(conn: Connection, deal_id: str, type_: str, detail: dict[str, Any], now: datetime) -> None:
    await conn.execute(
        "INSERT INTO deal_events (deal_id, type, detail, at) VALUES ($1, $2, $3::jsonb, $4)",
        deal_id,
        type_,
        msgspec.json.encode(detail).decode(),
        now,
    )


async def events(conn: Connection, deal_id: str, limit: int = 200) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT type, detail, at FROM deal_events WHERE deal_id = $1 ORDER BY id LIMIT $2", deal_id, limit
        )
    )


async def due_deals(conn: Connection, now: datetime, limit: int) -> list[str]:
    """Deals whose deadline has passed, locked; replicas skip each other's rows."""
    rows = await conn.fetch(
        """SELECT deal_id FROM deals WHERE stage = 'COLLECTION' AND expires_at <= $1
           ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED""",
        now,
        limit,
    )
    return [row["deal_id"] for row in rows]


def deal_state(deal: asyncpg.Record, sides: dict[Party, asyncpg.Record]) -> DealState:
    def side(party: Party) -> SideState:
        row = sides[party]
        return SideState(
            party=party,
            chain=row["chain"],
            asset=row["asset"],
            amount=int(row["amount"]),
            commission=int(row["commission"]),
            fee_reserve=int(row["fee_reserve"]),
            filled=row["filled_at"] is not None,
        )

    return DealState(
        deal_id=deal["deal_id"],
        stage=Stage(deal["stage"]),
        outcome=Outcome(deal["outcome"]) if deal["outcome"] else None,
        timeout_seconds=deal["timeout_seconds"],
        expires_at=deal["expires_at"],
        remaining_ms=deal["remaining_ms"],
        alice=side(Party.ALICE),
        bob=side(Party.BOB),
        cancelled=deal["cancelled"],
    )
