"""Talking to the chains' nodes from the CLI: plain JSON-RPC for EVM, the Electrum protocol for UTXO.

Errors name the chain and the method, never the node's URL (it may carry an API key).
"""

from __future__ import annotations

import importlib
import itertools
from typing import Any

import httpx
import msgspec

from otc_cli.ops.common import OpsError
from otc_common.registry import Chain

_ids = itertools.count(1)


class NodeRefused(Exception):
    """The node answered the call with an error; `message` is the node's own text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def evm_call(client: httpx.AsyncClient, chain: Chain, method: str, params: list[Any]) -> Any:
    if chain.rpc is None:
        raise OpsError(f"{chain.id} has no rpc in the registry")
    body = msgspec.json.encode({"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params})
    try:
        response = await client.post(chain.rpc, content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        raise OpsError(f"{chain.id} node unreachable ({type(exc).__name__}) calling {method}") from None
    if response.status_code != 200:
        raise OpsError(f"{chain.id} node answered HTTP {response.status_code} to {method}")
    try:
        reply = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        raise OpsError(f"{chain.id} node answered {method} with invalid JSON") from None
    if not isinstance(reply, dict):
        raise OpsError(f"{chain.id} node answered {method} with an unexpected shape")
    error = reply.get("error")
    if error is not None:
        message = error.get("message", "error") if isinstance(error, dict) else str(error)
        raise NodeRefused(str(message)[:300])
    return reply.get("result")


async def evm_native_balance(client: httpx.AsyncClient, chain: Chain, address: str) -> int:
    raw = await evm_call(client, chain, "eth_getBalance", [address, "latest"])
    if not isinstance(raw, str):
        raise OpsError(f"{chain.id} node answered eth_getBalance with {raw!r}")
    return int(raw, 16)


def electrum_module() -> Any:
    try:
        return importlib.import_module("otc_common.electrum")
    except ImportError:
        raise OpsError("this build has no Electrum client: UTXO chains cannot be reached from the CLI") from None


async def electrum_call(chain: Chain, method: str, *params: Any) -> Any:
    """One call on a short-lived connection to the chain's Electrum server."""
    electrum = electrum_module()
    if chain.electrum is None:
        raise OpsError(f"{chain.id} has no electrum server in the registry")
    try:
        client = await electrum.ElectrumClient.connect(chain.electrum, request_timeout=15.0)
    except electrum.ElectrumUnavailable:
        raise OpsError(f"{chain.id} Electrum server unreachable") from None
    try:
        return await client.request(method, *params)
    except electrum.ElectrumError as exc:
        raise NodeRefused(str(exc)) from None
    except (electrum.ElectrumUnavailable, electrum.ElectrumTimeout) as exc:
        raise OpsError(f"{chain.id} Electrum server: {type(exc).__name__} calling {method}") from None
    finally:
        await client.close()
