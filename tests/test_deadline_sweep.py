"""The deadline sweep with two engine replicas: every expired deal is reverted exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import nats

from otc_common.messages import StageChanged, decode_envelope
from tests.conftest import Stack
from tests.support import ALICE_EVM, BOB_EVM

DEALS = 30


async def make_collecting_deal(stack: Stack) -> str:
    deal: dict[str, Any] = await stack.rpc.result(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "0.1"},
            "bob": {"chainId": "POLYGON", "asset": "MATIC", "amount": "250"},
            "timeoutSeconds": 2,
        },
    )
    for party, token in (("ALICE", deal["aliceToken"]), ("BOB", deal["bobToken"])):
        await stack.rpc.result(
            "otc.fillPartyDetails",
            {
                "dealId": deal["dealId"],
                "party": party,
                "token": token,
                "paybackAddress": ALICE_EVM if party == "ALICE" else BOB_EVM,
                "recipientAddress": BOB_EVM if party == "ALICE" else ALICE_EVM,
            },
        )
    return str(deal["dealId"])


async def test_two_replicas_revert_each_expired_deal_once(service_env: dict[str, str], work_dir: Path) -> None:
    stack = Stack(service_env, work_dir, engines=2)
    await stack.start()
    try:
        deal_ids = await asyncio.gather(*(make_collecting_deal(stack) for _ in range(DEALS)))
        conn = await asyncpg.connect(stack.database_url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            open_deals = await conn.fetchval("SELECT count(*) FROM engine.deals WHERE stage <> 'CLOSED'")
            if open_deals == 0:
                break
            await asyncio.sleep(0.1)
        rows = await conn.fetch(
            """SELECT deal_id, count(*) FILTER (WHERE detail->>'to' = 'REVERTED') AS reverted,
                      count(*) FILTER (WHERE detail->>'to' = 'CLOSED') AS closed
               FROM engine.deal_events WHERE type = 'deal.stage_changed' GROUP BY deal_id"""
        )
        outcomes = await conn.fetch("SELECT stage, outcome, expires_at FROM engine.deals")
        await conn.close()
    finally:
        await stack.stop()

    assert {(r["stage"], r["outcome"]) for r in outcomes} == {("CLOSED", "REFUNDED")}
    assert {r["deal_id"] for r in rows} == set(deal_ids)
    assert all(r["reverted"] == 1 and r["closed"] == 1 for r in rows), "a deal was reverted twice"

    # What went out on the bus agrees: one REVERTED event per deal.
    nc = await nats.connect(service_env["OTC_NATS_URL"])
    js = nc.jetstream()
    sub = await js.pull_subscribe("otc.deal.>", durable="sweep-audit", stream="DEALS")
    reverted: dict[str, int] = {}
    while True:
        try:
            batch = await sub.fetch(200, timeout=1)
        except TimeoutError:
            break
        for msg in batch:
            _, message = decode_envelope(msg.data)
            if isinstance(message, StageChanged) and message.stage.value == "REVERTED":
                reverted[message.deal_id] = reverted.get(message.deal_id, 0) + 1
            await msg.ack()
    await nc.close()
    assert reverted == {deal_id: 1 for deal_id in deal_ids}
