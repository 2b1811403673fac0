from __future__ import annotations

from typing import Annotated

import msgspec

from otc_common.settings import BaseSettings


class WatcherSettings(BaseSettings, frozen=True, kw_only=True):
    request_timeout_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=120, description="timeout of one request to the Electrum server")
    ] = 10.0
    scan_concurrency: Annotated[
        int, msgspec.Meta(ge=1, le=256, description="scripthash histories read from the server at once")
    ] = 16
