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
