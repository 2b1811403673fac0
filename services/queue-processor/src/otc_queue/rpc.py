"""The queue processor's node client: the shared EVM JSON-RPC client (single calls and batches, so the
signing path makes two round trips before it signs), counted as the queue's calls."""

from __future__ import annotations

from otc_common.evm_rpc import EvmJsonRpc, RpcError, RpcUnavailable, as_int
from otc_queue import metrics

__all__ = ["JsonRpc", "RpcError", "RpcUnavailable", "as_int"]


class JsonRpc(EvmJsonRpc):
    def __init__(self, chain: str, url: str, timeout: float = 10.0) -> None:
        super().__init__(chain, url, timeout, metrics.RPC_CALLS)
