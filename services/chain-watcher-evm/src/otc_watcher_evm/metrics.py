"""The watcher's own Prometheus metrics; RPC errors use the shared `otc_chain_rpc_errors_total`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_CALLS = Counter("otc_watcher_rpc_calls_total", "JSON-RPC calls made to the chain's node", ["chain", "method"])
IDLE_POLLS = Counter(
    "otc_watcher_idle_polls_total", "Polls for the next block that found none (also in the RPC count)", ["chain"]
)
BLOCKS = Counter("otc_watcher_blocks_total", "Blocks processed (re-scans after a reorg included)", ["chain"])
BLOCK_CPU = Histogram(
    "otc_watcher_block_cpu_seconds",
    "Process CPU time spent on one block: fetching, decoding, rules and the database transaction",
    ["chain"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
BLOCK_SECONDS = Histogram(
    "otc_watcher_block_seconds",
    "Wall time to process one block",
    ["chain"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
HEIGHT = Gauge("otc_watcher_height", "Last processed block", ["chain"])
WATCHED = Gauge("otc_watcher_watched_addresses", "Escrows in the watch set", ["chain"])
FOLLOWED = Gauge("otc_watcher_followed_transactions", "Transactions followed for confirmations", ["chain"])
REORGS = Counter("otc_watcher_reorgs_total", "Reorgs detected", ["chain"])
DEPOSITS = Counter("otc_watcher_deposits_total", "Deposits published", ["chain", "kind"])
BALANCE_DEFERRED = Counter(
    "otc_watcher_balance_checks_deferred_total",
    "Blocks whose balance check was carried forward because the node no longer serves their state",
    ["chain"],
)
