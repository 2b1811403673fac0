"""Prometheus metrics shared by the services; service-specific ones live beside their code."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ALERTS = Counter("otc_alerts_total", "Alerts raised", ["source", "kind"])
OUTBOX_PUBLISHED = Counter("otc_outbox_published_total", "Outbox events published to JetStream", ["schema"])
CONSUMER_HANDLED = Histogram(
    "otc_consumer_handle_seconds",
    "Time to handle one bus message, inbox transaction included",
    ["consumer", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMER_REDELIVERED = Counter("otc_consumer_redeliveries_total", "Messages nak'ed for redelivery", ["consumer"])
CONSUMER_TERMINATED = Counter("otc_consumer_terminated_total", "Undecodable messages terminated", ["consumer"])
CONSUMER_LAG = Gauge("otc_consumer_pending_messages", "Messages pending for a durable consumer", ["consumer"])
RPC_ERRORS = Counter("otc_chain_rpc_errors_total", "Chain RPC errors", ["chain"])
#: Both chain watchers record it, so one panel shows every chain.
DEPOSIT_CONFIRMATION = Histogram(
    "otc_watcher_deposit_confirmation_seconds",
    "From a watcher publishing a deposit to its block reaching the chain's confirmation threshold",
    ["chain"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200),
)


# The chain watchers' metrics: one set for both kinds (EVM, UTXO), so one dashboard shows every chain and a
# process that loads both watchers' code (the operator CLI, the tests) registers each name once.
WATCHER_RPC_CALLS = Counter("otc_watcher_rpc_calls_total", "Requests made to the chain's node", ["chain", "method"])
WATCHER_BLOCKS = Counter(
    "otc_watcher_blocks_total", "Blocks processed (re-processing after a reorg included)", ["chain"]
)
WATCHER_BLOCK_SECONDS = Histogram(
    "otc_watcher_block_seconds",
    "Wall time to process one block, its database transaction included",
    ["chain"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
WATCHER_HEIGHT = Gauge("otc_watcher_height", "Last processed block", ["chain"])
WATCHER_WATCHED = Gauge("otc_watcher_watched_addresses", "Escrows in the watch set", ["chain"])
WATCHER_FOLLOWED = Gauge("otc_watcher_followed_transactions", "Transactions followed for confirmations", ["chain"])
WATCHER_REORGS = Counter("otc_watcher_reorgs_total", "Reorgs detected", ["chain"])
WATCHER_DEPOSITS = Counter("otc_watcher_deposits_total", "Deposits published", ["chain", "kind"])
