"""The devnet keeps its chain across restarts and crashes, and its data directory is its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from otc_cli.servers import ServerError, free_port
from otc_cli.unicity import start_unicity_devnet
from otc_devnet.client import ElectrumClient
from tests.devnet_support import Key


async def snapshot(url: str) -> dict[str, object]:
    async with await ElectrumClient.connect(url) as client:
        info = await client.request("devnet.info")
        return {key: info[key] for key in ("height", "tip", "faucet_address", "mempool_size", "genesis_hash")}


async def test_restart_and_crash_keep_the_chain(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_unicity_devnet(free_port(), data, tmp_path / "devnet.log", coinbase_maturity=5, premine=10)
    try:
        key = Key()
        async with await ElectrumClient.connect(server.url) as client:
            confirmed = await client.request("devnet.faucet", key.address, 70_000)
            await client.request("devnet.mine", 2)
            pending = await client.request("devnet.faucet", key.address, 30_000)
        before = await snapshot(server.url)
        assert before["height"] == 12 and before["mempool_size"] == 1

        # A graceful stop keeps the mempool too, as bitcoind's mempool.dat does.
        server.restart()
        assert await snapshot(server.url) == before
        async with await ElectrumClient.connect(server.url) as client:
            history = await client.request("blockchain.scripthash.get_history", key.scripthash)
            assert [(item["tx_hash"], item["height"]) for item in history] == [(confirmed, 11), (pending, 0)]

        # SIGKILL: every block already announced is on disk; the unconfirmed transaction is lost.
        server.kill()
        server.start()
        after_crash = await snapshot(server.url)
        assert after_crash == {**before, "mempool_size": 0}
        async with await ElectrumClient.connect(server.url) as client:
            assert await client.request("blockchain.scripthash.get_balance", key.scripthash) == {
                "confirmed": 70_000,
                "unconfirmed": 0,
            }
            # The chain goes on from where it was, with the same faucet.
            await client.request("devnet.mine", 1)
            assert (await client.request("devnet.info"))["height"] == 13
    finally:
        server.stop()


def test_a_data_directory_serves_one_devnet_at_a_time(tmp_path: Path) -> None:
    first = start_unicity_devnet(free_port(), tmp_path / "data", tmp_path / "first.log", premine=0)
    try:
        with pytest.raises(ServerError, match="in use by another otc-devnet"):
            start_unicity_devnet(free_port(), tmp_path / "data", tmp_path / "second.log", premine=0)
    finally:
        first.stop()
