"""The tank's own metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

BALANCE = Gauge("otc_tank_balance_wei", "Native balance of the tank wallet, refreshed every poll", ["chain"])
LOW_BALANCE_THRESHOLD = Gauge(
    "otc_tank_low_balance_threshold_wei",
    "Balance below which the tank reports itself low (OTC_TANK_LOW_BALANCE[_<CHAIN>]), for alerts and dashboards",
    ["chain"],
)
FUNDINGS = Counter(
    "otc_tank_fundings_total",
    "Funding requests settled: funded (a confirmed transaction) or not_needed (the escrow held enough)",
    ["chain", "outcome"],
)
FUNDED_WEI = Counter("otc_tank_funded_wei_total", "Wei sent to escrows by confirmed fundings", ["chain"])
SIGNED = Counter("otc_tank_transactions_signed_total", "Funding transactions signed and stored", ["chain"])
BROADCASTS = Counter("otc_tank_broadcasts_total", "Sends of stored funding transactions", ["chain"])
WAITING = Gauge("otc_tank_waiting_requests", "Requests waiting for the tank to be refilled", ["chain"])
RPC_CALLS = Counter("otc_tank_rpc_calls_total", "Chain JSON-RPC calls made by the tank", ["chain", "method"])
