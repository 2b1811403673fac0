"""Token buckets per client address and per deal, in this process's memory.

Each gateway process keeps its own buckets: nothing is shared between replicas, so with N
replicas behind a load balancer the effective limit is up to N times the configured one.
That is enough to keep one client (or one deal's two links) from flooding the engine; a
shared limit would need a shared store and is not worth its failure modes here. Buckets
are forgotten when idle and full, and the oldest are dropped when too many keys pile up
(a dropped bucket starts full again, which only ever errs towards letting a call through).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from otc_common.errors import AppError, ErrorCode


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class TokenBuckets:
    """`burst` calls at once, refilled at `rate` per second, one bucket per key."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, cost: int = 1) -> float:
        """0 when the call may proceed (and is charged); otherwise the seconds until it could."""
        now = self.clock()
        # A cost above the burst could never be paid; charging the whole bucket keeps it possible.
        cost = min(max(cost, 1), self.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[key] = bucket
            self._prune(now)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self.max_keys:
            return
        idle = [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in idle:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_seconds(wait: float) -> int:
    """Whole seconds for Retry-After: never 0, so a client that obeys it does get a token back."""
    return max(1, math.ceil(wait))


def rate_limited(wait: float, what: str) -> AppError:
    seconds = retry_after_seconds(wait)
    return AppError(
        ErrorCode.RATE_LIMITED,
        f"too many requests {what}; retry in {seconds} s",
        {"retryAfterSeconds": seconds},
    )


class Limits:
    def __init__(
        self,
        client_rate: float,
        client_burst: int,
        deal_rate: float,
        deal_burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clients = TokenBuckets(client_rate, client_burst, clock=clock)
        self.deals = TokenBuckets(deal_rate, deal_burst, clock=clock)

    def check_client(self, address: str, cost: int = 1) -> None:
        wait = self.clients.take(address, cost)
        if wait:
            raise rate_limited(wait, "from this address")

    def check_deal(self, deal_id: str) -> None:
        wait = self.deals.take(deal_id)
        if wait:
            raise rate_limited(wait, "for this deal")
