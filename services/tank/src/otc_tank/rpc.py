"""The few JSON-RPC calls the tank makes, each counted, each failing with one readable error."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from web3 import AsyncHTTPProvider
from web3.types import RPCEndpoint

from otc_common import metrics as common_metrics
from otc_tank import metrics

#: JSON-RPC "method not found", for nodes without eth_maxPriorityFeePerGas.
METHOD_NOT_FOUND = -32601


class RpcError(Exception):
    """The node did not answer, or answered with an error; never carries the URL (it may hold an API key)."""

    def __init__(self, method: str, detail: str, code: int | None = None) -> None:
        super().__init__(f"{method}: {detail}")
        self.method = method
        self.detail = detail
        self.code = code


class Receipt(msgspec.Struct, frozen=True):
    block_number: int
    block_hash: str
    success: bool


def _int(value: Any, method: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise RpcError(method, f"unexpected answer {value!r}")
    return int(value, 16)


class ChainRpc:
    def __init__(self, chain: str, url: str, timeout: float = 10.0) -> None:
        self.chain = chain
        self.timeout = timeout
        # Retries are the caller's: every call made is one call counted.
        self.provider = AsyncHTTPProvider(url, exception_retry_configuration=None)

    async def call(self, method: str, params: list[Any]) -> Any:
        metrics.RPC_CALLS.labels(self.chain, method).inc()
        try:
            async with asyncio.timeout(self.timeout):
                response: Any = await self.provider.make_request(RPCEndpoint(method), params)
        except Exception as exc:  # transport failures of any kind: the node is unreachable for now
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            status = getattr(exc, "status", None)
            raise RpcError(method, type(exc).__name__ + (f" (HTTP {status})" if status else "")) from None
        error = response.get("error") if isinstance(response, dict) else None
        if error:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            code = error.get("code") if isinstance(error, dict) else None
            text = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise RpcError(method, str(text), code if isinstance(code, int) else None)
        if not isinstance(response, dict) or "result" not in response:
            raise RpcError(method, "answer without a result")
        return response["result"]

    async def block_number(self) -> int:
        return _int(await self.call("eth_blockNumber", []), "eth_blockNumber")

    async def base_fee(self) -> int:
        block = await self.call("eth_getBlockByNumber", ["latest", False])
        if not isinstance(block, dict):
            raise RpcError("eth_getBlockByNumber", "no latest block")
        # Chains without EIP-1559 have no base fee; their gas price then plays its part.
        if block.get("baseFeePerGas") is None:
            return _int(await self.call("eth_gasPrice", []), "eth_gasPrice")
        return _int(block["baseFeePerGas"], "eth_getBlockByNumber")

    async def priority_fee(self, base_fee: int) -> int:
        try:
            return _int(await self.call("eth_maxPriorityFeePerGas", []), "eth_maxPriorityFeePerGas")
        except RpcError as exc:
            if exc.code != METHOD_NOT_FOUND:
                raise
        gas_price = _int(await self.call("eth_gasPrice", []), "eth_gasPrice")
        return max(0, gas_price - base_fee)

    async def balance(self, address: str) -> int:
        return _int(await self.call("eth_getBalance", [address, "latest"]), "eth_getBalance")

    async def transaction_count(self, address: str) -> int:
        return _int(await self.call("eth_getTransactionCount", [address, "latest"]), "eth_getTransactionCount")

    async def chain_id(self) -> int:
        return _int(await self.call("eth_chainId", []), "eth_chainId")

    async def receipt(self, tx_hash: str) -> Receipt | None:
        found = await self.call("eth_getTransactionReceipt", [tx_hash])
        if found is None:
            return None
        if not isinstance(found, dict) or found.get("blockNumber") is None:
            return None
        return Receipt(
            block_number=_int(found["blockNumber"], "eth_getTransactionReceipt"),
            block_hash=str(found.get("blockHash") or ""),
            success=found.get("status") == "0x1",
        )

    async def send_raw(self, raw: bytes) -> str:
        result = await self.call("eth_sendRawTransaction", ["0x" + raw.hex()])
        return str(result)

    async def close(self) -> None:
        await self.provider.disconnect()
