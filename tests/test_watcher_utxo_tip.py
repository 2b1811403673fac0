"""The UTXO watcher keeps the newest tip the server told it, whatever order its answers are resumed in.

The server answers blockchain.headers.subscribe with its tip, and announces each later block with a
notification on the same connection. When a block is mined just after the answer, both arrive in
one read: the client hands the notification over at once, but the coroutine that asked resumes only
later. Taking the answer then would put the watcher back on the older tip, and it would not process
the announced block until the next one came, minutes later on a real chain.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from otc_common.electrum import ElectrumClient
from otc_common.registry import load_registry
from otc_devnet.block import ALPHA_VERSION, block_hash, make_header
from otc_watcher_utxo.watcher import HEADERS_METHOD, Watcher
from tests.support import write_test_registry

BITS = 0x207FFFFF


def tips() -> tuple[dict[str, Any], dict[str, Any]]:
    """The tip at 200 and the block at 201 on top of it, as blockchain.headers.subscribe gives them."""
    at_200 = make_header(ALPHA_VERSION, os.urandom(32), os.urandom(32), 1_700_000_000, BITS, 1)
    at_201 = make_header(ALPHA_VERSION, block_hash(at_200), os.urandom(32), 1_700_000_060, BITS, 2)
    return {"height": 200, "hex": at_200.hex()}, {"height": 201, "hex": at_201.hex()}


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """An Electrum server whose answer to the headers subscription is followed at once by a new block."""
    old, new = tips()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            request = json.loads(line)
            if request["method"] == "server.version":
                replies = [{"jsonrpc": "2.0", "id": request["id"], "result": ["fake", "1.4"]}]
            elif request["method"] == HEADERS_METHOD:
                replies = [
                    {"jsonrpc": "2.0", "id": request["id"], "result": old},
                    {"jsonrpc": "2.0", "method": HEADERS_METHOD, "params": [new]},
                ]
            else:
                replies = [{"jsonrpc": "2.0", "id": request["id"], "result": None}]
            # One write: the client reads both lines before the subscriber resumes.
            writer.write(b"".join(json.dumps(reply).encode() + b"\n" for reply in replies))
            await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    yield f"tcp://127.0.0.1:{port}", new
    listener.close()
    await listener.wait_closed()


async def test_a_block_announced_behind_the_subscription_answer_is_not_lost(
    server: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, newest = server
    chain = load_registry(str(write_test_registry(tmp_path / "registry.toml", electrum=url))).chains["UNICITY"]
    client = await ElectrumClient.connect(url, client_name="otc-test", request_timeout=10)
    try:
        # The database and the bus are not touched before the first header is processed.
        watcher = Watcher(chain, cast(Any, None), cast(Any, None), client, database_url="", schema="watcher_utxo_x")
        await watcher._subscribe_headers()
        assert watcher.headers_subscribed
        assert watcher.server_tip is not None
        assert (watcher.server_tip.height, watcher.server_tip.hash) == (
            201,
            block_hash(bytes.fromhex(newest["hex"]))[::-1].hex(),
        )
        assert watcher.wake.is_set()
    finally:
        await client.close()
