from __future__ import annotations

from typing import Annotated

import msgspec

from otc_common.settings import BaseSettings

PerSecond = Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]
Burst = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class GatewaySettings(BaseSettings, frozen=True, kw_only=True):
    #: The gateway keeps nothing durable of its own.
    database_url: str = ""
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535, description="port of the JSON-RPC API and pages")] = 8080
    public_base_url: Annotated[str, msgspec.Meta(description="URL parties use to reach the pages (links)")] = (
        "http://127.0.0.1:8080"
    )
    # Token buckets held in memory by each gateway process (see ratelimit.py): with N replicas
    # behind a load balancer a client can get up to N times these rates.
    rate_client_per_second: Annotated[PerSecond, msgspec.Meta(description="sustained calls per client address")] = 5.0
    rate_client_burst: Annotated[Burst, msgspec.Meta(description="calls a client address may make at once")] = 60
    rate_deal_per_second: Annotated[PerSecond, msgspec.Meta(description="sustained calls naming one deal")] = 3.0
    rate_deal_burst: Annotated[Burst, msgspec.Meta(description="calls naming one deal at once")] = 40
    #: Reverse proxies in front of the gateway that append to X-Forwarded-For (0: use the peer address).
    forwarded_hops: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
    #: Seconds between SSE keep-alive comments (proxies drop idle connections).
    sse_heartbeat_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 15.0
    #: Longest time an `otc.status` answer is served from memory (see status_cache.py); 0 asks the engine every time.
    status_cache_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 1.0
    #: `otc.status` answers kept in memory at most (a few KiB each), least recently used dropped first.
    status_cache_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
