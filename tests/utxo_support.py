"""The Unicity devnet for the UTXO tests: the server process, and its control methods over Electrum."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from otc_cli.servers import ManagedServer, free_port
from otc_cli.unicity import start_unicity_devnet
from otc_common.electrum import ElectrumClient

__all__ = ["UnicityDevnet"]


class UnicityDevnet:
    """One devnet process (production Alpha rules unless `alpha` is false) and a client to drive it."""

    def __init__(self, work_dir: Path, *, alpha: bool = True, name: str | None = None) -> None:
        self.alpha = alpha
        name = name or f"unicity-{free_port()}"
        self.data_dir = work_dir / name
        self.server: ManagedServer = start_unicity_devnet(
            free_port(), self.data_dir, work_dir / f"{name}.log", alpha=alpha
        )
        self._client: ElectrumClient | None = None

    @property
    def url(self) -> str:
        return self.server.url

    async def client(self) -> ElectrumClient:
        if self._client is None:
            self._client = await ElectrumClient.connect(self.url, client_name="otc-test", request_timeout=30)
        return self._client

    async def call(self, method: str, *params: Any) -> Any:
        return await (await self.client()).request(method, *params)

    async def mine(self, blocks: int = 1) -> list[str]:
        hashes: list[str] = await self.call("devnet.mine", blocks)
        return hashes

    async def faucet(self, address: str, amount: int) -> str:
        txid: str = await self.call("devnet.faucet", address, amount)
        return txid

    async def broadcast(self, raw_hex: str) -> str:
        txid: str = await self.call("blockchain.transaction.broadcast", raw_hex)
        return txid

    async def reorg(
        self, depth: int, drop_txids: list[str] | None = None, *, include_mempool: bool = False
    ) -> list[str]:
        """Replaces the last `depth` blocks with `depth + 1` new ones; see the devnet's README."""
        hashes: list[str] = await self.call("devnet.reorg", depth, drop_txids or [], include_mempool)
        return hashes

    async def height(self) -> int:
        info = await self.call("devnet.info")
        return int(info["height"])

    async def tx(self, txid: str) -> dict[str, Any]:
        """bitcoind's verbose form: blockhash, blocktime, confirmations once mined."""
        verbose: dict[str, Any] = await self.call("blockchain.transaction.get", txid, True)
        return verbose

    async def tx_height(self, txid: str, scripthash: str) -> int:
        for entry in await self.call("blockchain.scripthash.get_history", scripthash):
            if entry["tx_hash"] == txid:
                return int(entry["height"])
        raise AssertionError(f"{txid} is not in the history of {scripthash}")

    def restart(self) -> None:
        """Stops the process and starts it again on the same port with the same chain."""
        started = time.monotonic()
        self.server.restart()
        assert time.monotonic() - started < 30

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def stop(self) -> None:
        self.server.stop()
