"""The watcher's Prometheus metrics, named as the EVM watcher's so one dashboard shows every chain."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_CALLS = Counter("otc_watcher_rpc_calls_total", "Requests made to the chain's Electrum server", ["chain", "method"])
BLOCKS = Counter("otc_watcher_blocks_total", "Blocks processed (re-processing after a reorg included)", ["chain"])
BLOCK_SECONDS = Histogram(
    "otc_watcher_block_seconds",
    "Wall time to process one block header, its database transaction included",
    ["chain"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
HEIGHT = Gauge("otc_watcher_height", "Last processed block", ["chain"])
WATCHED = Gauge("otc_watcher_watched_addresses", "Escrows in the watch set", ["chain"])
FOLLOWED = Gauge("otc_watcher_followed_transactions", "Transactions followed for confirmations", ["chain"])
REORGS = Counter("otc_watcher_reorgs_total", "Reorgs detected", ["chain"])
DEPOSITS = Counter("otc_watcher_deposits_total", "Deposits published", ["chain", "kind"])
SCANS = Counter("otc_watcher_history_scans_total", "Scripthash histories read and acted on", ["chain"])
