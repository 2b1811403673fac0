"""The deadline sweep: any number of engine replicas run it at once, SKIP LOCKED keeps them apart."""

from __future__ import annotations

import asyncio
import logging

from otc_common import subjects
from otc_common.bus import emit
from otc_common.db import DATABASE_TRANSIENT
from otc_common.messages import EscrowUnwatch
from otc_common.runtime import Loop
from otc_engine import store
from otc_engine.service import Engine, now_utc

log = logging.getLogger("otc.engine.sweeper")

SWEEP_INTERVAL_SECONDS = 0.25
BATCH = 200
#: A pass is one transaction, rolled back on failure, so the loop retries instead of taking the engine down with it.
TRANSIENT = DATABASE_TRANSIENT


async def sweep_once(engine: Engine) -> int:
    """Reverts what is due; returns how many deals changed."""
    now = now_utc()
    async with engine.pool.acquire() as conn, conn.transaction():
        due = await store.due_deals(conn, now, BATCH)
        changed = 0
        for deal_id in due:
            if await engine.advance(conn, deal_id, now):
                changed += 1
    return changed


async def run_sweeper(engine: Engine, loop: Loop) -> None:
    while True:
        loop.beat()
        try:
            changed = await sweep_once(engine)
        except TRANSIENT as exc:
            log.warning("deadline sweep failed (%s: %s); retrying", type(exc).__name__, exc)
            changed = 0
        if changed < BATCH:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)


UNWATCH_INTERVAL_SECONDS = 30.0


async def unwatch_once(engine: Engine) -> int:
    """Escrows of deals closed longer ago than the post-close window are no longer watched."""
    now = now_utc()
    async with engine.pool.acquire() as conn, conn.transaction():
        rows = await store.closed_deals_to_unwatch(conn, now - engine.flow.post_close_window, BATCH)
        for row in rows:
            sides = await store.get_sides(conn, row["deal_id"])
            for side in sides.values():
                await emit(
                    conn,
                    subjects.deal(row["deal_id"]),
                    EscrowUnwatch(deal_id=row["deal_id"], chain=side["chain"], address=side["escrow_address"]),
                )
            await store.mark_unwatched(conn, row["deal_id"])
    return len(rows)


async def run_unwatcher(engine: Engine, loop: Loop) -> None:
    while True:
        loop.beat()
        try:
            done = await unwatch_once(engine)
        except TRANSIENT as exc:
            log.warning("post-close unwatch failed (%s: %s); retrying", type(exc).__name__, exc)
            done = 0
        if done < BATCH:
            await asyncio.sleep(UNWATCH_INTERVAL_SECONDS)
