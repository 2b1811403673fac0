from __future__ import annotations

from typing import Annotated

import msgspec

from otc_common.settings import BaseSettings
from otc_watcher_evm import rules

#: `OTC_WS_URL` value that turns the new-head subscription off.
WS_OFF = "off"


class WatcherSettings(BaseSettings, frozen=True, kw_only=True):
    poll_interval_ms: Annotated[
        int, msgspec.Meta(ge=10, le=60_000, description="how often the node is asked for the next block")
    ] = 200
    rpc_timeout_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=120, description="timeout of one JSON-RPC call to the node")
    ] = 10.0
    ws_url: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^(off|wss?://\S+)$",
            description="WebSocket URL of the node for new-head notifications (ws:// or wss://), or off",
        ),
    ] = ""
    balance_call_addresses: Annotated[
        int,
        msgspec.Meta(
            ge=1, le=100_000, description="most escrows whose native balances one eth_call reads (~3,000 gas each)"
        ),
    ] = rules.BALANCE_CALL_ADDRESSES
