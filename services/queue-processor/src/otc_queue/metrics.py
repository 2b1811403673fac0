"""The queue processor's own metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10, 30)
_SLOW = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)

COMMAND_TO_BROADCAST = Histogram(
    "otc_queue_command_to_broadcast_seconds",
    "From receiving a payout command to sending its first signed transaction",
    ["chain"],
    buckets=_FAST,
)
BROADCAST_TO_CONFIRMED = Histogram(
    "otc_queue_broadcast_to_confirmed_seconds",
    "From signing a transfer's first transaction to its reaching the confirmation threshold",
    ["chain"],
    buckets=_SLOW,
)
SUBMITTED = Counter("otc_queue_transfers_submitted_total", "Transfers signed and broadcast", ["chain"])
CONFIRMED = Counter("otc_queue_transfers_confirmed_total", "Transfers confirmed to the threshold", ["chain"])
FAILED = Counter("otc_queue_transfers_failed_total", "Transfers refused or reverted", ["chain", "retryable"])
BUMPS = Counter("otc_queue_fee_bumps_total", "Replacements signed at the same nonce with higher fees", ["chain"])
REBROADCASTS = Counter("otc_queue_rebroadcasts_total", "Stored transactions sent again", ["chain", "why"])
RPC_CALLS = Counter("otc_queue_rpc_calls_total", "Chain JSON-RPC calls", ["chain", "method"])
OLDEST_UNCONFIRMED = Gauge(
    "otc_queue_oldest_unconfirmed_seconds",
    "Age of the oldest transfer received but not yet confirmed (or refused), refreshed every sweep",
    ["chain"],
)
