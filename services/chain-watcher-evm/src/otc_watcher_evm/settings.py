from __future__ import annotations

from typing import Annotated

import msgspec

from otc_common.settings import BaseSettings


class WatcherSettings(BaseSettings, frozen=True, kw_only=True):
    poll_interval_ms: Annotated[
        int, msgspec.Meta(ge=10, le=60_000, description="how often the node is asked for the next block")
    ] = 200
    rpc_timeout_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=120, description="timeout of one JSON-RPC call to the node")
    ] = 10.0
