"""Every gateway method through the real gateway and engine processes: good calls work,
bad ones get their specific error and change nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from otc_common.errors import ErrorCode
from tests.conftest import Stack, create_database, drop_database, reset_streams
from tests.support import ALICE_EVM, ALPHA_ADDRESS, BOB_EVM, TEST_SEED_HEX, RpcClient

USDT_ETH = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


@pytest.fixture(scope="module")
async def gw(pg_url: str, nats_url: str, registry_file: Path, work_dir: Path) -> AsyncIterator[Stack]:
    """One stack for the module: the tests only add deals of their own."""
    database_url = await create_database(pg_url)
    await reset_streams(nats_url)
    env = {
        "OTC_NATS_URL": nats_url,
        "OTC_DATABASE_URL": database_url,
        "OTC_REGISTRY_FILE": str(registry_file),
        "OTC_SEED": TEST_SEED_HEX,
    }
    running = Stack(env, work_dir)
    await running.start()
    yield running
    await running.stop()
    await drop_database(pg_url, database_url)


async def snapshot(database_url: str) -> list[Any]:
    """Everything the engine stores, to show an error changed nothing."""
    conn = await asyncpg.connect(database_url)
    try:
        state = []
        # The outbox is left out: its relay drains it in the background; deal_events records every event.
        for table in ("deals", "deal_sides", "deal_events"):
            rows = await conn.fetch(f"SELECT * FROM engine.{table} ORDER BY 1")
            state.append([tuple(r.values()) for r in rows])
        state.append(await conn.fetchval("SELECT last_value FROM engine.escrow_index_seq"))
        return state
    finally:
        await conn.close()


def deal_params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "alice": {"chainId": "ETH", "asset": "ETH", "amount": "1.5"},
        "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "40000"},
        "timeoutSeconds": 3600,
    }
    params.update(overrides)
    return params


async def new_deal(rpc: RpcClient, **overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = await rpc.result("otc.createDeal", deal_params(**overrides))
    return result


async def expect_error(stack: Stack, method: str, params: Any, code: int, *words: str) -> dict[str, Any]:
    before = await snapshot(stack.database_url)
    reply = await stack.rpc.call(method, params)
    assert "error" in reply, reply
    error: dict[str, Any] = reply["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error
    assert await snapshot(stack.database_url) == before, "an error changed state"
    return error


# ----------------------------------------------------------------------------- happy paths


async def test_create_fill_status_cancel(gw: Stack) -> None:
    deal = await new_deal(gw.rpc, name="desk 7")
    assert deal["linkA"] == f"https://otc.example/d/{deal['dealId']}/a/{deal['aliceToken']}"
    assert deal["linkB"].endswith(f"/d/{deal['dealId']}/b/{deal['bobToken']}")
    assert len(deal["aliceToken"]) >= 22 and deal["aliceToken"] != deal["bobToken"]  # ≥ 128 random bits

    status = await gw.rpc.result("otc.status", {"dealId": deal["dealId"]})
    assert status["stage"] == "CREATED" and status["name"] == "desk 7"
    assert status["instructions"]["alice"] is None  # shown once the party has filled its details

    ok = await gw.rpc.result(
        "otc.fillPartyDetails",
        {
            "dealId": deal["dealId"],
            "party": "ALICE",
            "token": deal["aliceToken"],
            "paybackAddress": ALICE_EVM,
            "recipientAddress": BOB_EVM,
            "email": "alice@example.com",
        },
    )
    assert ok == {"ok": True}
    public = await gw.rpc.result("otc.status", {"dealId": deal["dealId"]})
    assert "email" not in public["alice"]
    private = await gw.rpc.result("otc.status", {"dealId": deal["dealId"], "token": deal["bobToken"]})
    assert private["alice"]["email"] == "alice@example.com"
    instructions = private["instructions"]["alice"]
    # 1.5 ETH + 30 bps commission (0.0045) + the escrow's fee reserve (0.001)
    assert instructions["amount"] == "1.5055"
    assert instructions["breakdown"] == {
        "tradeAmount": "1.5",
        "commission": "0.0045",
        "networkFeeReserve": "0.001",
    }
    assert instructions["to"].startswith("0x")

    cancelled = await gw.rpc.result("otc.cancelDeal", {"dealId": deal["dealId"], "token": deal["bobToken"]})
    assert cancelled["stage"] == "CLOSED"
    final = await gw.rpc.result("otc.status", {"dealId": deal["dealId"]})
    assert (final["stage"], final["outcome"]) == ("CLOSED", "CANCELLED")


async def test_token_commission_and_erc20_form(gw: Stack) -> None:
    deal = await new_deal(
        gw.rpc,
        alice={"chainId": "ETH", "asset": f"ERC20:{USDT_ETH}", "amount": "1000"},
        bob={"chainId": "UNICITY", "asset": "ALPHA", "amount": "12.5"},
    )
    for party, token, payback, recipient in (
        ("ALICE", deal["aliceToken"], ALICE_EVM, ALPHA_ADDRESS),
        ("BOB", deal["bobToken"], ALPHA_ADDRESS, BOB_EVM),
    ):
        await gw.rpc.result(
            "otc.fillPartyDetails",
            {
                "dealId": deal["dealId"],
                "party": party,
                "token": token,
                "paybackAddress": payback,
                "recipientAddress": recipient,
            },
        )
    status = await gw.rpc.result("otc.status", {"dealId": deal["dealId"]})
    assert status["stage"] == "COLLECTION" and status["expiresAt"] is not None
    alice = status["instructions"]["alice"]
    assert alice["asset"] == "USDT"
    # 30 bps of 1000 = 3, plus the fixed token fee of 1; the tank pays the gas
    assert alice["breakdown"] == {"tradeAmount": "1000", "commission": "4", "networkFeeReserve": "0"}
    bob = status["instructions"]["bob"]
    assert bob["to"].startswith("alpha1q")
    assert bob["amount"] == "12.5376"  # 12.5 + 0.0375 commission + 0.0001 fee reserve
    await expect_error(
        gw,
        "otc.cancelDeal",
        {"dealId": deal["dealId"], "token": deal["aliceToken"]},
        ErrorCode.WRONG_STAGE,
        "COLLECTION",
    )


async def test_registry_methods(gw: Stack) -> None:
    config = await gw.rpc.result("otc.getChainConfig", {})
    by_id = {c["chainId"]: c for c in config["chains"]}
    assert set(by_id) == {"ETH", "POLYGON", "UNICITY"}
    assert by_id["ETH"]["kind"] == "evm" and by_id["ETH"]["networkId"] == 31337 and by_id["ETH"]["confirmations"] == 2
    assert by_id["UNICITY"]["kind"] == "utxo"
    assets = await gw.rpc.result("otc.listAssets", {"chainId": "POLYGON"})
    assert {a["symbol"] for a in assets["assets"]} == {"MATIC", "USDT"}
    await expect_error(gw, "otc.getChainConfig", {"chainId": "DOGE"}, ErrorCode.UNKNOWN_CHAIN, "DOGE")


# ----------------------------------------------------------------------------- createDeal errors


@pytest.mark.parametrize(
    ("params", "code", "words"),
    [
        (
            {"bob": {"chainId": "ETH", "asset": "ETH", "amount": "1"}, "timeoutSeconds": 60},
            ErrorCode.INVALID_PARAMS,
            ["alice"],
        ),
        (
            deal_params(alice={"chainId": "ETH", "asset": "ETH", "amount": 1.5}),
            ErrorCode.INVALID_PARAMS,
            ["params.alice.amount", "str"],
        ),
        (deal_params(timeoutSeconds="60"), ErrorCode.INVALID_PARAMS, ["params.timeoutSeconds"]),
        (deal_params(name="x" * 101), ErrorCode.INVALID_PARAMS, ["params.name"]),
        (
            deal_params(alice={"chainId": "ETH", "asset": "ETH", "amount": "1" * 101}),
            ErrorCode.INVALID_PARAMS,
            ["params.alice.amount"],
        ),
        (deal_params(extra=1), ErrorCode.INVALID_PARAMS, ["extra"]),
        (
            deal_params(alice={"chainId": "DOGE", "asset": "DOGE", "amount": "1"}),
            ErrorCode.UNKNOWN_CHAIN,
            ["alice.chainId", "DOGE"],
        ),
        (
            deal_params(alice={"chainId": "ETH", "asset": "WBTC", "amount": "1"}),
            ErrorCode.UNKNOWN_ASSET,
            ["alice.asset", "WBTC"],
        ),
        (
            deal_params(
                alice={
                    "chainId": "ETH",
                    "asset": "ERC20:0x000000000000000000000000000000000000dEaD",
                    "amount": "1",
                }
            ),
            ErrorCode.UNKNOWN_ASSET,
            ["alice.asset"],
        ),
        (
            deal_params(bob={"chainId": "POLYGON", "asset": "USDT", "amount": "1.0000001"}),
            ErrorCode.INVALID_AMOUNT,
            ["bob.amount", "6"],
        ),
        (
            deal_params(alice={"chainId": "ETH", "asset": "ETH", "amount": "-1"}),
            ErrorCode.INVALID_AMOUNT,
            ["alice.amount"],
        ),
        (
            deal_params(alice={"chainId": "ETH", "asset": "ETH", "amount": "1e3"}),
            ErrorCode.INVALID_AMOUNT,
            ["alice.amount"],
        ),
        (
            deal_params(alice={"chainId": "ETH", "asset": "ETH", "amount": "0"}),
            ErrorCode.INVALID_AMOUNT,
            ["alice.amount"],
        ),
        (
            deal_params(alice={"chainId": "ETH", "asset": "ETH", "amount": "1000.1"}),
            ErrorCode.INVALID_AMOUNT,
            ["alice.amount"],
        ),
        (deal_params(timeoutSeconds=1), ErrorCode.INVALID_TIMEOUT, ["timeoutSeconds"]),
        (
            deal_params(bob={"chainId": "ETH", "asset": "ETH", "amount": "2"}),
            ErrorCode.UNKNOWN_ASSET,
            ["same asset"],
        ),
    ],
)
async def test_create_deal_rejects(gw: Stack, params: Any, code: int, words: list[str]) -> None:
    await expect_error(gw, "otc.createDeal", params, code, *words)


# ----------------------------------------------------------------------------- fillPartyDetails errors


async def test_fill_party_details_rejects(gw: Stack) -> None:
    deal = await new_deal(gw.rpc, bob={"chainId": "UNICITY", "asset": "ALPHA", "amount": "3"})
    base = {
        "dealId": deal["dealId"],
        "party": "ALICE",
        "token": deal["aliceToken"],
        "paybackAddress": ALICE_EVM,
        "recipientAddress": ALPHA_ADDRESS,
    }
    bad_checksum = ALICE_EVM[:-1] + ("7" if ALICE_EVM[-1] != "7" else "8")
    cases: list[tuple[dict[str, Any], int, list[str]]] = [
        ({**base, "paybackAddress": bad_checksum}, ErrorCode.INVALID_ADDRESS, ["paybackAddress"]),
        (
            {**base, "paybackAddress": ALICE_EVM.lower()},
            ErrorCode.INVALID_ADDRESS,
            ["paybackAddress", "checksum"],
        ),
        ({**base, "paybackAddress": ALPHA_ADDRESS}, ErrorCode.INVALID_ADDRESS, ["paybackAddress", "ETH"]),
        ({**base, "recipientAddress": BOB_EVM}, ErrorCode.INVALID_ADDRESS, ["recipientAddress", "UNICITY"]),
        (
            {**base, "recipientAddress": "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"},
            ErrorCode.INVALID_ADDRESS,
            ["recipientAddress", "alpha1"],
        ),
        ({**base, "token": "x" * 32}, ErrorCode.INVALID_TOKEN, ["token"]),
        ({**base, "token": deal["bobToken"]}, ErrorCode.INVALID_TOKEN, ["ALICE"]),
        ({**base, "dealId": "nope"}, ErrorCode.DEAL_NOT_FOUND, ["nope"]),
        ({**base, "party": "CAROL"}, ErrorCode.INVALID_PARAMS, ["params.party"]),
        ({**base, "email": "not-an-email"}, ErrorCode.INVALID_PARAMS, ["params.email"]),
        ({k: v for k, v in base.items() if k != "token"}, ErrorCode.INVALID_PARAMS, ["token"]),
        ({**base, "paybackAddress": "0x" + "a" * 200}, ErrorCode.INVALID_PARAMS, ["params.paybackAddress"]),
    ]
    for params, code, words in cases:
        await expect_error(gw, "otc.fillPartyDetails", params, code, *words)
    await gw.rpc.result("otc.fillPartyDetails", base)
    await expect_error(gw, "otc.fillPartyDetails", base, ErrorCode.DETAILS_ALREADY_FILLED, "already")
    await gw.rpc.result("otc.cancelDeal", {"dealId": deal["dealId"], "token": deal["bobToken"]})
    bob = {
        **base,
        "party": "BOB",
        "token": deal["bobToken"],
        "paybackAddress": ALPHA_ADDRESS,
        "recipientAddress": BOB_EVM,
    }
    await expect_error(gw, "otc.fillPartyDetails", bob, ErrorCode.WRONG_STAGE, "CLOSED")


async def test_status_and_cancel_reject(gw: Stack) -> None:
    deal = await new_deal(gw.rpc)
    await expect_error(gw, "otc.status", {"dealId": deal["dealId"], "token": "y" * 32}, ErrorCode.INVALID_TOKEN)
    await expect_error(gw, "otc.status", {"dealId": "missing"}, ErrorCode.DEAL_NOT_FOUND)
    await expect_error(gw, "otc.status", {"dealId": 42}, ErrorCode.INVALID_PARAMS, "params.dealId")
    await expect_error(gw, "otc.cancelDeal", {"dealId": deal["dealId"], "token": "z" * 32}, ErrorCode.INVALID_TOKEN)
    await expect_error(gw, "otc.cancelDeal", {"dealId": deal["dealId"]}, ErrorCode.INVALID_PARAMS, "token")


# ----------------------------------------------------------------------------- the protocol itself


async def test_json_rpc_protocol_errors(gw: Stack) -> None:
    parse = (await gw.rpc.raw(b"{not json")).json()
    assert parse["error"]["code"] == ErrorCode.PARSE_ERROR and parse["id"] is None
    missing_version = (await gw.rpc.raw({"id": 1, "method": "otc.status"})).json()
    assert missing_version["error"]["code"] == ErrorCode.INVALID_REQUEST
    wrong_version = (await gw.rpc.raw({"jsonrpc": "1.0", "id": 2, "method": "otc.status"})).json()
    assert wrong_version["error"]["code"] == ErrorCode.INVALID_REQUEST and wrong_version["id"] == 2
    unknown = (await gw.rpc.raw({"jsonrpc": "2.0", "id": 3, "method": "otc.stealFunds"})).json()
    assert unknown["error"]["code"] == ErrorCode.METHOD_NOT_FOUND
    positional = (await gw.rpc.raw({"jsonrpc": "2.0", "id": 4, "method": "otc.status", "params": ["x"]})).json()
    assert positional["error"]["code"] == ErrorCode.INVALID_PARAMS
    empty = (await gw.rpc.raw([])).json()
    assert empty["error"]["code"] == ErrorCode.INVALID_REQUEST
    too_many = (await gw.rpc.raw([{"jsonrpc": "2.0", "id": i, "method": "otc.listAssets"} for i in range(21)])).json()
    assert too_many["error"]["code"] == ErrorCode.INVALID_REQUEST
    notification = await gw.rpc.raw({"jsonrpc": "2.0", "method": "otc.listAssets"})
    assert notification.status_code == 204
    huge = await gw.rpc.raw(
        b'{"jsonrpc":"2.0","id":1,"method":"otc.status","params":{"dealId":"' + b"a" * 70_000 + b'"}}'
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == ErrorCode.INVALID_REQUEST


async def test_batch_answers_each_call(gw: Stack) -> None:
    replies = (
        await gw.rpc.raw(
            [
                {"jsonrpc": "2.0", "id": "a", "method": "otc.listAssets", "params": {"chainId": "ETH"}},
                {"jsonrpc": "2.0", "id": "b", "method": "otc.nothing"},
                {"jsonrpc": "2.0", "method": "otc.listAssets"},
                {"jsonrpc": "2.0", "id": "c", "method": "otc.createDeal", "params": deal_params()},
                7,
            ]
        )
    ).json()
    by_id = {reply["id"]: reply for reply in replies}
    assert "result" in by_id["a"]
    assert by_id["b"]["error"]["code"] == ErrorCode.METHOD_NOT_FOUND
    assert by_id["c"]["result"]["dealId"]
    assert by_id[None]["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert len(replies) == 4  # the notification gets no reply


async def test_engine_down_is_temporarily_unavailable(gw: Stack) -> None:
    engine = gw.engines[0]
    await engine.stop()
    try:
        error = await expect_error(
            gw, "otc.createDeal", deal_params(), ErrorCode.TEMPORARILY_UNAVAILABLE, "temporarily unavailable"
        )
        assert "Traceback" not in error["message"]
        # Registry methods need no engine.
        assert await gw.rpc.result("otc.listAssets", {})
    finally:
        await engine.start()
    assert await new_deal(gw.rpc)
