"""The deadline sweep: any number of engine replicas run it at once, SKIP LOCKED keeps them apart."""

from __future__ import annotations

import asyncio
import logging

from otc_common.runtime import Loop
from otc_engine import store
from otc_engine.service import Engine, now_utc

log = logging.getLogger("otc.engine.sweeper")

SWEEP_INTERVAL_SECONDS = 0.25
BATCH = 200


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
        except (OSError, ConnectionError) as exc:
            log.warning("deadline sweep failed (%s); retrying", exc)
            changed = 0
        if changed < BATCH:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
