"""The shared Electrum client against the real devnet, and against stub servers for rarer failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from otc_cli.servers import free_port
from otc_common.electrum import ElectrumClient, ElectrumError, ElectrumTimeout, ElectrumUnavailable, parse_url
from tests.devnet_support import Key
from tests.utxo_support import UnicityDevnet

HEADERS = "blockchain.headers.subscribe"
SCRIPTHASH = "blockchain.scripthash.subscribe"


async def next_item(queue: asyncio.Queue[list[Any]], timeout: float = 10.0) -> list[Any]:
    return await asyncio.wait_for(queue.get(), timeout)


async def wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout}s: {what}")


class Stub:
    """An Electrum server that negotiates the version and then misbehaves as told."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.received: list[str] = []
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await reader.readline():
                request = json.loads(line)
                self.received.append(request["method"])
                if request["method"] == "server.version":
                    reply = {"jsonrpc": "2.0", "id": request["id"], "result": ["stub 1.0", "1.4"]}
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
                elif self.mode == "drop":
                    break
                # "silent": never answers anything else
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def stub(mode: str) -> AsyncIterator[Stub]:
    server = Stub(mode)
    server.server = await asyncio.start_server(server.serve, "127.0.0.1", server.port)
    try:
        yield server
    finally:
        server.server.close()


# --------------------------------------------------------------------------- against the devnet


async def test_negotiates_protocol_1_4_and_answers_requests(unicity_devnet: UnicityDevnet) -> None:
    calls: list[str] = []
    async with await ElectrumClient.connect(unicity_devnet.url, on_request=calls.append) as client:
        assert client.connected and client.generation == 1
        assert client.server_version[1] == "1.4"
        header = await client.request("blockchain.block.header", 0)
        assert isinstance(header, str) and len(header) == 160, "the genesis header is Bitcoin's 80 bytes"
        tip = await client.request(HEADERS)
        assert len(bytes.fromhex(tip["hex"])) == 112, "Alpha headers after genesis carry hashRandomX"
        # Requests in flight at once are matched to their answers by id.
        heights = list(range(0, 50))
        answers = await asyncio.gather(*(client.request("blockchain.block.header", h) for h in heights))
        assert [len(a) for a in answers] == [160] + [224] * 49
        assert answers[0] == header
    assert calls[:3] == ["server.version", "blockchain.block.header", HEADERS]
    assert not client.connected


async def test_error_objects_are_raised_with_the_servers_message(unicity_devnet: UnicityDevnet) -> None:
    async with await ElectrumClient.connect(unicity_devnet.url) as client:
        with pytest.raises(ElectrumError) as rejected:
            await client.request("blockchain.transaction.broadcast", "00")
        assert rejected.value.code == 1
        assert rejected.value.method == "blockchain.transaction.broadcast"
        assert rejected.value.message.startswith("the transaction was rejected by network rules.")
        assert "TX decode failed" in rejected.value.message
        assert "the transaction was rejected" in str(rejected.value)
        with pytest.raises(ElectrumError) as unknown:
            await client.request("no.such.method")
        assert (unknown.value.code, unknown.value.message) == (-32601, "unknown method 'no.such.method'")
        # An error answer leaves the connection as it was.
        assert await client.request("server.ping") is None
        assert client.generation == 1


async def test_reconnects_and_resubscribes_after_the_server_restarts(unicity_devnet: UnicityDevnet) -> None:
    key = Key()
    client = ElectrumClient(unicity_devnet.url, min_backoff=0.05, max_backoff=0.2)
    tips = client.notifications(HEADERS)
    statuses = client.notifications(SCRIPTHASH)
    reconnected = asyncio.Event()
    client.on_connect(reconnected.set)
    await client.start()
    try:
        await client.wait_connected(5)
        tip = await client.subscribe(HEADERS)
        assert await client.subscribe(SCRIPTHASH, key.scripthash) is None
        assert client.subscriptions == 2
        assert tips.empty() and statuses.empty(), "a subscribe call returns its result; nothing is repeated"
        reconnected.clear()

        unicity_devnet.stop()
        await wait_for(lambda: not client.connected, "the client notices the server is gone")
        with pytest.raises(ElectrumUnavailable, match="not connected to the Electrum server"):
            await client.request("server.ping", timeout=0.3)
        unicity_devnet.restart()

        await asyncio.wait_for(reconnected.wait(), 10)
        assert client.generation == 2
        # The subscriptions were sent again; their fresh results arrive as notifications.
        assert await next_item(tips) == [tip]
        assert await next_item(statuses) == [key.scripthash, None]

        # And the server notifies on the new connection.
        await unicity_devnet.faucet(key.address, 1_000_000)
        [scripthash, status] = await next_item(statuses)
        assert scripthash == key.scripthash and status is not None
        await unicity_devnet.mine(1)
        [new_tip] = await next_item(tips)
        assert new_tip["height"] == tip["height"] + 1
        [_, mined_status] = await next_item(statuses)
        assert mined_status not in (None, status)

        # A forgotten subscription is not sent again after the next reconnect.
        client.forget(SCRIPTHASH, key.scripthash)
        unicity_devnet.stop()
        unicity_devnet.restart()
        await wait_for(lambda: client.generation == 3 and client.connected, "the third connection")
        assert (await next_item(tips))[0]["height"] == new_tip["height"]
        await asyncio.sleep(0.2)
        assert statuses.empty()
    finally:
        await client.close()


# --------------------------------------------------------------------------- failures


async def test_a_request_without_an_answer_times_out() -> None:
    async with stub("silent") as server, await ElectrumClient.connect(server.url, request_timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(ElectrumTimeout, match=r"blockchain\.relayfee: no answer from the Electrum server"):
            await client.request("blockchain.relayfee", timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 2
        assert client.connected, "one slow answer does not drop the connection"


async def test_a_server_that_stops_answering_pings_is_left_for_a_new_connection() -> None:
    async with stub("silent") as server:
        client = ElectrumClient(server.url, request_timeout=0.2, ping_interval=0.1, min_backoff=0.05)
        await client.start()
        try:
            await wait_for(lambda: server.connections >= 2, "a reconnect after the unanswered ping")
            assert "server.ping" in server.received
            await wait_for(lambda: client.generation >= 2, "the new connection in use")
        finally:
            await client.close()


async def test_a_lost_connection_fails_what_is_pending_and_reconnects() -> None:
    async with stub("drop") as server:
        client = ElectrumClient(server.url, min_backoff=0.05)
        await client.start()
        try:
            await client.wait_connected(5)
            with pytest.raises(ElectrumUnavailable, match="lost"):
                await client.request("blockchain.relayfee", timeout=5)
            await wait_for(lambda: client.generation >= 2 and client.connected, "the reconnect")
        finally:
            await client.close()


async def test_no_server_means_unavailable_not_a_hang() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ElectrumUnavailable, match=r"not connected to the Electrum server .* after 0.3s"):
        await ElectrumClient.connect(url, connect_timeout=0.3)
    client = ElectrumClient(url, min_backoff=0.05)
    await client.start()
    try:
        with pytest.raises(ElectrumUnavailable):
            await client.request("server.ping", timeout=0.3)
    finally:
        await client.close()
    assert time.monotonic() - started < 5


def test_urls() -> None:
    assert str(parse_url("tcp://electrum.example:50001")) == "tcp://electrum.example:50001"
    assert parse_url("ssl://electrum.example:50002").tls
    for bad in ("electrum.example:50001", "http://electrum.example:50001", "tcp://electrum.example", "tcp://:1"):
        with pytest.raises(ValueError, match="tcp://host:port"):
            parse_url(bad)
