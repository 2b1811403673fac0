"""The UTXO queue reads an escrow's history as of one tip, so a reorg cannot confirm a payout it dropped.

Found by the chaos simulation: a reorg that dropped a payout came between the queue reading the escrow's
history (the payout mined at height h) and reading the tip (h + 1 on the new branch). The payout counted two
confirmations, was reported CONFIRMED and never looked at again: the recipient was not paid and the deal stuck,
waiting for a change output that does not exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from otc_common.electrum import ElectrumClient
from otc_common.registry import load_registry
from otc_common.signing_keys import load_seed
from otc_queue.rpc import RpcUnavailable
from otc_queue.settings import QueueSettings
from otc_queue.utxo import UtxoBackend
from tests.support import TEST_SEED_HEX, write_test_registry
from tests.utxo_support import UnicityDevnet


async def test_a_reorg_while_the_history_is_read_is_not_taken_for_confirmations(
    unicity_devnet: UnicityDevnet, tmp_path: Path
) -> None:
    registry = load_registry(str(write_test_registry(tmp_path / "registry.toml", electrum=unicity_devnet.url)))
    settings = QueueSettings(database_url="postgresql://unused", nats_url="nats://unused", registry_file="unused")
    client = await ElectrumClient.connect(unicity_devnet.url, client_name="otc-test-queue", request_timeout=30)
    backend = UtxoBackend(registry.chains["UNICITY"], load_seed(TEST_SEED_HEX), client, settings)
    try:
        escrow = backend.escrow_address(7)
        txid = await unicity_devnet.faucet(escrow, 10**8)
        await unicity_devnet.mine(1)
        height = await unicity_devnet.height()
        assert (await backend.look(escrow)).heights == {txid: height}

        # The reorg lands right after the history is read, before the tip is.
        read_history = client.request
        reorged = False

        async def racing(method: str, *params: Any, **options: Any) -> Any:
            nonlocal reorged
            answer = await read_history(method, *params, **options)
            if method == "blockchain.scripthash.get_history" and not reorged:
                reorged = True
                await unicity_devnet.reorg(1, [txid])
            return answer

        client.request = racing  # type: ignore[method-assign]
        seen = await backend.look(escrow)
        assert reorged
        assert txid not in seen.heights and seen.tip == height + 1, "the history is read again on the new branch"

        # A tip that moves at every read: the look gives up for now, with a retryable failure.
        async def always_moving(method: str, *params: Any, **options: Any) -> Any:
            answer = await read_history(method, *params, **options)
            if method == "blockchain.scripthash.get_history":
                await unicity_devnet.mine(1)
            return answer

        client.request = always_moving  # type: ignore[method-assign]
        with pytest.raises(RpcUnavailable):
            await backend.look(escrow)
        client.request = read_history  # type: ignore[method-assign]
    finally:
        await backend.close()
