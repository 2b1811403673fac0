"""The watcher's own Prometheus metrics; RPC errors use the shared `otc_chain_rpc_errors_total`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from otc_common.metrics import WATCHER_BLOCK_SECONDS as BLOCK_SECONDS
from otc_common.metrics import WATCHER_BLOCKS as BLOCKS
from otc_common.metrics import WATCHER_DEPOSITS as DEPOSITS
from otc_common.metrics import WATCHER_FOLLOWED as FOLLOWED
from otc_common.metrics import WATCHER_HEIGHT as HEIGHT
from otc_common.metrics import WATCHER_REORGS as REORGS
from otc_common.metrics import WATCHER_RPC_CALLS as RPC_CALLS
from otc_common.metrics import WATCHER_WATCHED as WATCHED

__all__ = [
    "BALANCE_DEFERRED",
    "BLOCKS",
    "BLOCK_CPU",
    "BLOCK_SECONDS",
    "DEPOSITS",
    "FOLLOWED",
    "HEAD_NOTIFICATIONS",
    "HEAD_SUBSCRIPTION_UP",
    "HEIGHT",
    "IDLE_POLLS",
    "REORGS",
    "RPC_CALLS",
    "STATE_RELOADS",
    "WATCHED",
]

IDLE_POLLS = Counter(
    "otc_watcher_idle_polls_total", "Polls for the next block that found none (also in the RPC count)", ["chain"]
)
BLOCK_CPU = Histogram(
    "otc_watcher_block_cpu_seconds",
    "Process CPU time spent on one block: fetching, decoding, rules and the database transaction",
    ["chain"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
BALANCE_DEFERRED = Counter(
    "otc_watcher_balance_checks_deferred_total",
    "Blocks whose balance check was carried forward because the node no longer serves their state",
    ["chain"],
)
HEAD_SUBSCRIPTION_UP = Gauge(
    "otc_watcher_head_subscription_up",
    "1 while the node's new-head notifications wake the watcher; 0 while it finds blocks by polling only",
    ["chain"],
)
HEAD_NOTIFICATIONS = Counter(
    "otc_watcher_head_notifications_total", "New heads the node announced over its WebSocket subscription", ["chain"]
)
STATE_RELOADS = Counter(
    "otc_watcher_state_reloads_total",
    "Times the in-memory watch set, baselines and follows were read again because others changed them: "
    "all of it (kind=all) or, when only the head moved, what was written since (kind=changes)",
    ["chain", "kind"],
)
