"""New-head notifications (`eth_subscribe` "newHeads" over WebSocket) that wake the block loop early.

They only say "look now": the block loop still fetches every block itself and still polls every
`OTC_POLL_INTERVAL_MS`, so a notification that is lost, late or never sent (a dropped connection,
a node without WebSocket) costs latency, never a block. A lost connection is re-opened with backoff.
Neither the URL nor a node's error text is logged: the URL may carry an API key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec

from otc_watcher_evm import metrics
from otc_watcher_evm.settings import WS_OFF

log = logging.getLogger("otc.watcher.evm.heads")

#: Waits between attempts to (re)open the subscription, the last one repeated.
RECONNECT_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A connection that stayed up this long starts the backoff afresh when it drops.
STABLE_SECONDS = 60.0
#: WebSocket pings, so a connection that died silently is noticed and replaced.
HEARTBEAT_SECONDS = 20.0
SUBSCRIBE_ID = 1

_encoder = msgspec.json.Encoder()


class SubscriptionRefused(Exception):
    """The node answered `eth_subscribe` with an error or something that is not a subscription id."""


def websocket_url(setting: str, rpc_url: str) -> str | None:
    """The URL to subscribe at: the setting when given, else the chain's RPC URL as ws:// or wss://.

    None when the setting turns subscriptions off or the RPC URL has no WebSocket counterpart.
    """
    if setting == WS_OFF:
        return None
    if setting:
        return setting
    parts = urlsplit(rpc_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    return None if scheme is None else urlunsplit(parts._replace(scheme=scheme))


class HeadSubscription:
    """Calls `wake` for every new head the node announces, for as long as `run` runs."""

    def __init__(self, chain: str, url: str, wake: Callable[[], None], timeout_seconds: float) -> None:
        self.chain = chain
        self.url = url
        self.wake = wake
        self.timeout_seconds = timeout_seconds
        #: Whether the last attempt failed, so that only a change between up and down is logged.
        self._down = False

    async def run(self) -> None:
        failures = 0
        async with aiohttp.ClientSession(trust_env=False) as session:
            while True:
                opened = time.monotonic()
                try:
                    await self._follow(session)
                    reason = "the node closed the connection"
                except SubscriptionRefused as exc:
                    reason = f"the node refused eth_subscribe ({exc})"
                except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError) as exc:
                    reason = f"connection failed ({type(exc).__name__})"
                except Exception:
                    # Never fatal: the block loop polls without it.
                    log.exception("new-head subscription failed unexpectedly", extra={"chain": self.chain})
                    reason = "unexpected failure"
                metrics.HEAD_SUBSCRIPTION_UP.labels(self.chain).set(0)
                if time.monotonic() - opened >= STABLE_SECONDS:
                    failures = 0
                delay = RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)]
                failures += 1
                if not self._down:
                    log.warning(
                        "new-head subscription unavailable: %s; blocks are found by polling until it is back "
                        "(retrying in %ss)",
                        reason,
                        delay,
                        extra={"chain": self.chain},
                    )
                self._down = True
                await asyncio.sleep(delay)

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        """Subscribes and wakes the loop per notification until the connection ends."""
        async with asyncio.timeout(self.timeout_seconds):
            ws = await session.ws_connect(self.url, heartbeat=HEARTBEAT_SECONDS, autoping=True)
        async with ws:
            metrics.RPC_CALLS.labels(self.chain, "eth_subscribe").inc()
            request = {"jsonrpc": "2.0", "id": SUBSCRIBE_ID, "method": "eth_subscribe", "params": ["newHeads"]}
            await ws.send_str(_encoder.encode(request).decode())
            async with asyncio.timeout(self.timeout_seconds):
                subscription = await self._subscription_id(ws)
            metrics.HEAD_SUBSCRIPTION_UP.labels(self.chain).set(1)
            if self._down:
                log.info("new-head subscription restored", extra={"chain": self.chain})
            else:
                log.info("new-head subscription open", extra={"chain": self.chain})
            self._down = False
            # A head may have come between the last poll and the subscription: look once now.
            self.wake()
            async for message in ws:
                if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    break  # closed or failed: the caller reconnects
                if _is_head(msgspec.json.decode(message.data), subscription):
                    metrics.HEAD_NOTIFICATIONS.labels(self.chain).inc()
                    self.wake()

    async def _subscription_id(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        async for message in ws:
            if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                break
            answer = msgspec.json.decode(message.data)
            if not isinstance(answer, dict) or answer.get("id") != SUBSCRIBE_ID:
                continue
            result = answer.get("result")
            if isinstance(result, str) and result:
                return result
            error = answer.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            raise SubscriptionRefused(f"code {code}" if code is not None else "no subscription id")
        raise aiohttp.ClientConnectionError("closed before eth_subscribe was answered")


def _is_head(message: Any, subscription: str) -> bool:
    if not isinstance(message, dict) or message.get("method") != "eth_subscription":
        return False
    params = message.get("params")
    return isinstance(params, dict) and params.get("subscription") == subscription
