from __future__ import annotations

from typing import Annotated

import msgspec

from otc_engine.notify.settings import NotifySettings


class EngineSettings(NotifySettings, frozen=True, kw_only=True):
    post_close_watch_seconds: Annotated[
        int, msgspec.Meta(ge=0, description="how long escrows of closed deals stay watched for late deposits")
    ] = 7 * 24 * 3600
    solvency_interval_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=86400, description="how often open escrows' balances are compared with the ledger")
    ] = 60.0
