"""The few node calls the tank makes, on the shared EVM JSON-RPC client, counted as the tank's."""

from __future__ import annotations

import msgspec

from otc_common.evm_rpc import METHOD_NOT_FOUND, EvmJsonRpc, RpcError, RpcUnavailable, as_int
from otc_tank import metrics


class Receipt(msgspec.Struct, frozen=True):
    block_number: int
    block_hash: str
    success: bool


class ChainRpc(EvmJsonRpc):
    def __init__(self, chain: str, url: str, timeout: float = 10.0) -> None:
        super().__init__(chain, url, timeout, metrics.RPC_CALLS)

    async def block_number(self) -> int:
        return as_int(await self.call("eth_blockNumber"), "eth_blockNumber")

    async def base_fee(self) -> int:
        block = await self.call("eth_getBlockByNumber", "latest", False)
        if not isinstance(block, dict):
            raise RpcUnavailable("eth_getBlockByNumber", "no latest block")
        # Chains without EIP-1559 have no base fee; their gas price then plays its part.
        if block.get("baseFeePerGas") is None:
            return as_int(await self.call("eth_gasPrice"), "eth_gasPrice")
        return as_int(block["baseFeePerGas"], "eth_getBlockByNumber")

    async def priority_fee(self, base_fee: int) -> int:
        try:
            return as_int(await self.call("eth_maxPriorityFeePerGas"), "eth_maxPriorityFeePerGas")
        except RpcError as exc:
            if exc.code != METHOD_NOT_FOUND:
                raise
        gas_price = as_int(await self.call("eth_gasPrice"), "eth_gasPrice")
        return max(0, gas_price - base_fee)

    async def balance(self, address: str) -> int:
        return as_int(await self.call("eth_getBalance", address, "latest"), "eth_getBalance")

    async def transaction_count(self, address: str) -> int:
        return as_int(await self.call("eth_getTransactionCount", address, "latest"), "eth_getTransactionCount")

    async def chain_id(self) -> int:
        return as_int(await self.call("eth_chainId"), "eth_chainId")

    async def receipt(self, tx_hash: str) -> Receipt | None:
        found = await self.call("eth_getTransactionReceipt", tx_hash)
        if not isinstance(found, dict) or found.get("blockNumber") is None:
            return None
        return Receipt(
            block_number=as_int(found["blockNumber"], "eth_getTransactionReceipt"),
            block_hash=str(found.get("blockHash") or ""),
            success=found.get("status") == "0x1",
        )

    async def send_raw(self, raw: bytes) -> str:
        return str(await self.call("eth_sendRawTransaction", "0x" + raw.hex()))
