from __future__ import annotations

from typing import Annotated

import msgspec

from otc_common.settings import BaseSettings


class GatewaySettings(BaseSettings, frozen=True, kw_only=True):
    #: The gateway keeps no state of its own.
    database_url: str = ""
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535, description="port of the JSON-RPC API and pages")] = 8080
    public_base_url: Annotated[str, msgspec.Meta(description="URL parties use to reach the pages (links)")] = (
        "http://127.0.0.1:8080"
    )
