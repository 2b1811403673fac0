"""The engine's own Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge, Histogram

from otc_common.db import Pool
from otc_common.messages import Stage
from otc_common.runtime import Loop

log = logging.getLogger("otc.engine.metrics")

DEALS_BY_STAGE = Gauge("otc_deals", "Deals per stage", ["stage"])
STAGE_CHANGES = Counter("otc_deal_stage_changes_total", "Stage transitions", ["to"])
REORGS = Counter("otc_chain_reorgs_total", "Reorgs reported by the watchers", ["chain"])
REORG_DEPTH = Histogram("otc_chain_reorg_depth", "Depth of reorgs", ["chain"], buckets=(1, 2, 3, 5, 8, 13, 21, 64))
HALTED = Gauge("otc_chain_halted", "1 while payouts on the chain are halted", ["chain"])
REFRESH_SECONDS = 15.0


async def refresh_stage_gauge(pool: Pool, loop: Loop) -> None:
    while True:
        loop.beat()
        try:
            rows = await pool.fetch("SELECT stage, count(*) AS n FROM deals GROUP BY stage")
            counts = {row["stage"]: row["n"] for row in rows}
            for stage in Stage:
                DEALS_BY_STAGE.labels(stage.value).set(counts.get(stage.value, 0))
            halted = {row["chain"] for row in await pool.fetch("SELECT chain FROM chain_halts")}
            for chain in halted:
                HALTED.labels(chain).set(1)
        except (OSError, ConnectionError) as exc:
            log.warning("metrics refresh failed: %s", exc)
        await asyncio.sleep(REFRESH_SECONDS)
