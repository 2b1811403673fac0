"""The shared EVM JSON-RPC client (otc_common.evm_rpc) against a real anvil node, and against a real
HTTP server that answers the ways a failing node does.

Every call is counted by the caller's counter; every failed call once in otc_chain_rpc_errors_total;
no error ever shows the node URL (it may carry an API key).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from otc_common.evm_rpc import METHOD_NOT_FOUND, EvmJsonRpc, RpcError, RpcFailure, RpcUnavailable, as_int
from tests.support import free_port

SECRET = "key-" + secrets.token_hex(8)


def errors(chain: str) -> float:
    return REGISTRY.get_sample_value("otc_chain_rpc_errors_total", {"chain": chain}) or 0.0


def client(url: str, timeout: float = 5.0) -> tuple[EvmJsonRpc, CollectorRegistry, str]:
    """A client on a fresh chain label, counting its calls in a registry of its own."""
    chain = f"T{secrets.token_hex(4)}"
    registry = CollectorRegistry()
    calls = Counter("test_rpc_calls", "calls", ["chain", "method"], registry=registry)
    return EvmJsonRpc(chain, url, timeout, calls), registry, chain


def counted(registry: CollectorRegistry, chain: str, method: str) -> float:
    return registry.get_sample_value("test_rpc_calls_total", {"chain": chain, "method": method}) or 0.0


@pytest.fixture
async def anvil(work_dir: Path) -> AsyncIterator[str]:
    from otc_cli.servers import start_anvil

    server = start_anvil(free_port(), 31337, work_dir / f"anvil-rpc-{secrets.token_hex(3)}.log")
    try:
        yield server.url
    finally:
        server.stop()


async def test_calls_and_batches_against_a_node(anvil: str) -> None:
    rpc, calls, chain = client(anvil)
    answers = 0

    def answered() -> None:
        nonlocal answers
        answers += 1

    rpc.on_answer = answered
    try:
        assert as_int(await rpc.call("eth_chainId"), "eth_chainId") == 31337
        balance = await rpc.call("eth_getBalance", "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266", "latest")
        assert as_int(balance, "balance") == 10_000 * 10**18

        results = await rpc.batch([("eth_blockNumber", []), ("no_such_method", [1]), ("eth_chainId", [])])
        assert as_int(results[0], "height") == 0 and results[2] == "0x7a69"
        refused = results[1]
        assert isinstance(refused, RpcError) and refused.code == METHOD_NOT_FOUND
        assert refused.method == "no_such_method" and str(refused).startswith("no_such_method: ")
        with pytest.raises(RpcError) as raised:
            as_int(refused, "anything")
        assert raised.value is refused, "a batch's refusal is raised where its value is read"

        with pytest.raises(RpcError) as single:
            await rpc.call("no_such_method")
        assert single.value.code == METHOD_NOT_FOUND
    finally:
        await rpc.close()
    assert counted(calls, chain, "eth_chainId") == 2 and counted(calls, chain, "no_such_method") == 2
    assert counted(calls, chain, "eth_blockNumber") == 1 and counted(calls, chain, "eth_getBalance") == 1
    assert errors(chain) == 2, "each refused call once"
    assert answers == 4, "one per HTTP answer"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def node() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Starts a real HTTP server answering with `handler`; returns its URL (with a secret in the path)."""
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post(f"/{SECRET}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}/{SECRET}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def answering(body: Any, status: int = 200, delay: float = 0.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        return web.Response(body=data, status=status, content_type="application/json")

    return handler


async def failure(chain: str, call: Awaitable[Any]) -> RpcFailure:
    before = errors(chain)
    with pytest.raises(RpcFailure) as caught:
        await call
    assert errors(chain) == before + 1, "a failed call is counted once"
    assert SECRET not in str(caught.value) and SECRET not in repr(caught.value.args)
    return caught.value


async def test_a_failing_node_gives_one_readable_error_per_call_and_never_its_url(
    node: Callable[[Handler], Awaitable[str]],
) -> None:
    cases: list[tuple[Handler, str, type[RpcFailure]]] = [
        (answering(b"oops", status=502), "eth_blockNumber: node answered HTTP 502", RpcUnavailable),
        (answering(b"<html>not json</html>"), "eth_blockNumber: node answered with invalid JSON", RpcUnavailable),
        (answering([1, 2]), "eth_blockNumber: node answered with an unexpected shape", RpcUnavailable),
        (answering({"jsonrpc": "2.0", "id": 1}), "eth_blockNumber: answer without a result", RpcUnavailable),
        (
            answering({"jsonrpc": "2.0", "id": 1, "error": {"code": -32005, "message": "rate limited " + "x" * 500}}),
            "eth_blockNumber: rate limited " + "x" * 187,
            RpcError,
        ),
        (answering({"result": "0x1"}, delay=3.0), "eth_blockNumber: node unreachable (", RpcUnavailable),
    ]
    for handler, message, kind in cases:
        rpc, calls, chain = client(await node(handler), timeout=1.0)
        try:
            error = await failure(chain, rpc.call("eth_blockNumber"))
        finally:
            await rpc.close()
        assert type(error) is kind, (message, error)
        assert str(error).startswith(message), str(error)
        assert counted(calls, chain, "eth_blockNumber") == 1
        if kind is RpcError:
            assert len(error.detail) > 500, "the node's whole text stays on the exception"
    closed = free_port()
    rpc, _, chain = client(f"http://127.0.0.1:{closed}/{SECRET}")
    unreachable = await failure(chain, rpc.call("eth_chainId"))
    assert isinstance(unreachable, RpcUnavailable) and "node unreachable" in str(unreachable)
    await rpc.close()


async def test_batches_that_come_back_incomplete_or_refused_whole(node: Callable[[Handler], Awaitable[str]]) -> None:
    calls: list[tuple[str, list[Any]]] = [("eth_blockNumber", []), ("eth_chainId", [])]

    async def half(request: web.Request) -> web.StreamResponse:
        first = msgspec.json.decode(await request.read())[0]
        return web.json_response([{"jsonrpc": "2.0", "id": first["id"], "result": "0x5"}])

    rpc, _, chain = client(await node(half))
    missing = await failure(chain, rpc.batch(calls))
    assert str(missing) == "batch of 2: no answer to eth_chainId"
    await rpc.close()

    whole = answering({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "batches not supported"}})
    rpc, calls_counter, chain = client(await node(whole))
    refused = await failure(chain, rpc.batch(calls))
    assert isinstance(refused, RpcUnavailable) and str(refused) == "batch of 2: batches not supported"
    assert counted(calls_counter, chain, "eth_blockNumber") == 1 and counted(calls_counter, chain, "eth_chainId") == 1
    await rpc.close()


def test_quantities_are_parsed_strictly() -> None:
    assert as_int("0x0", "x") == 0 and as_int("0x1bc16d674ec80000", "x") == 2 * 10**18
    for bad in (None, 12, "12", "0x", "0xzz", {"result": "0x1"}):
        with pytest.raises(RpcUnavailable, match=r"^height: unexpected answer"):
            as_int(bad, "height")
