"""The engine's own Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from otc_common.db import DATABASE_TRANSIENT, Pool
from otc_common.messages import Stage
from otc_common.runtime import Loop

log = logging.getLogger("otc.engine.metrics")

DEALS_BY_STAGE = Gauge("otc_deals", "Deals per stage", ["stage"])
OLDEST_BY_STAGE = Gauge(
    "otc_deals_oldest_seconds",
    "Time the oldest deal of each open stage has been in that stage (0 when the stage is empty)",
    ["stage"],
)
STAGE_CHANGES = Counter("otc_deal_stage_changes_total", "Stage transitions", ["to"])
REORGS = Counter("otc_chain_reorgs_total", "Reorgs reported by the watchers", ["chain"])
REORG_DEPTH = Histogram("otc_chain_reorg_depth", "Depth of reorgs", ["chain"], buckets=(1, 2, 3, 5, 8, 13, 21, 64))
HALTED = Gauge("otc_chain_halted", "1 while payouts on the chain are halted", ["chain"])
REFRESH_SECONDS = 15.0
#: A closed deal stays closed: its age says nothing an operator must act on.
OPEN_STAGES = [stage for stage in Stage if stage is not Stage.CLOSED]

#: Chains this process has shown as halted. Another replica may serve the resume, so each refresh
#: clears what the database no longer holds, or the alert would fire until this process restarts.
_shown_halted: set[str] = set()


async def refresh_stage_gauge(pool: Pool, loop: Loop, chains: Iterable[str] = ()) -> None:
    """Refreshes the per-stage gauges and `otc_chain_halted` (0 or 1 for every chain in `chains`)."""
    chains = list(chains)
    while True:
        loop.beat()
        try:
            # `updated_at` changes only with the stage (store.DealWrites), so it is when the deal entered it.
            rows = await pool.fetch(
                """SELECT stage, count(*) AS n, extract(epoch FROM now() - min(updated_at)) AS oldest
                   FROM deals GROUP BY stage"""
            )
            by_stage = {row["stage"]: row for row in rows}
            for stage in Stage:
                row = by_stage.get(stage.value)
                DEALS_BY_STAGE.labels(stage.value).set(row["n"] if row else 0)
            for stage in OPEN_STAGES:
                row = by_stage.get(stage.value)
                OLDEST_BY_STAGE.labels(stage.value).set(max(0.0, float(row["oldest"])) if row else 0.0)
            halted = {row["chain"] for row in await pool.fetch("SELECT chain FROM chain_halts")}
            for chain in {*chains, *halted, *_shown_halted}:
                HALTED.labels(chain).set(1 if chain in halted else 0)
            _shown_halted.clear()
            _shown_halted.update(halted)
        except DATABASE_TRANSIENT as exc:
            log.warning("metrics refresh failed: %s", exc)
        await asyncio.sleep(REFRESH_SECONDS)
