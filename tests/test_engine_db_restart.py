"""The engine outlives a PostgreSQL restart: its background loops treat a lost database as transient.

Found by the chaos simulation: the deadline sweep caught only OSError, so the first query on a pooled
connection the restart had cut (or a connection attempt while the server was shutting down) killed the
loop, and with it the whole engine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from otc_cli.servers import ManagedServer, start_postgres
from otc_common.db import create_pool, migrate_when_reachable
from tests.conftest import Stack, create_database, with_database
from tests.support import ALICE_EVM, BOB_EVM, TEST_SEED_HEX


@pytest.fixture
def own_postgres(work_dir: Path) -> Iterator[ManagedServer]:
    """A server of this test alone: restarting the session's one would disturb every other test."""
    data = Path(tempfile.mkdtemp(prefix="otc-restart-pg-"))
    os.chmod(data, 0o755)
    server = start_postgres(data / "data", work_dir / "restart-pg.log")
    yield server
    server.stop()
    shutil.rmtree(data, ignore_errors=True)


async def collecting_deal(stack: Stack, timeout: int) -> str:
    deal: dict[str, Any] = await stack.rpc.result(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "0.1"},
            "bob": {"chainId": "POLYGON", "asset": "MATIC", "amount": "250"},
            "timeoutSeconds": timeout,
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


async def test_engine_keeps_sweeping_deadlines_across_a_database_restart(
    own_postgres: ManagedServer, clean_nats: str, registry_file: Path, work_dir: Path
) -> None:
    admin = await asyncpg.connect(own_postgres.url)
    await admin.execute('CREATE DATABASE "otc"')
    await admin.close()
    database_url = with_database(own_postgres.url, "otc")
    env = {
        "OTC_NATS_URL": clean_nats,
        "OTC_DATABASE_URL": database_url,
        "OTC_REGISTRY_FILE": str(registry_file),
        "OTC_SEED": TEST_SEED_HEX,
    }
    stack = Stack(env, work_dir)
    await stack.start()
    engine = stack.engines[0]
    try:
        # The sweep holds pooled connections; the restart cuts them under it.
        await asyncio.to_thread(own_postgres.stop)
        own_postgres.launch()
        await asyncio.to_thread(own_postgres.wait_ready)
        await engine.wait_ready(30)
        deal_id = await collecting_deal(stack, timeout=2)
        conn = await asyncpg.connect(database_url)
        try:
            deadline = time.monotonic() + 30
            row = None
            while time.monotonic() < deadline:
                row = await conn.fetchrow("SELECT stage, outcome FROM engine.deals WHERE deal_id = $1", deal_id)
                if row is not None and row["stage"] == "CLOSED":
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert row is not None and (row["stage"], row["outcome"]) == ("CLOSED", "REFUNDED"), row
        assert engine.proc is not None and engine.proc.poll() is None, engine.log_tail()
        assert "deadline-sweep died" not in engine.log_path.read_text()
    finally:
        await stack.stop()


async def wait_until_sleeping(url: str, within: float = 10.0) -> None:
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + within
        while not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1.5)%')"
        ):
            assert time.monotonic() < deadline, "the migration never started"
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


async def test_migrations_wait_out_a_database_that_restarts_meanwhile(own_postgres: ManagedServer) -> None:
    """Found by the chaos simulation: a watcher starting while PostgreSQL restarted lost its connection in the
    middle of its migrations and exited instead of waiting, as every service must."""
    url = await create_database(own_postgres.url)
    pool = await create_pool(url, "restarting", max_size=2)
    slow = ("001_slow", "SELECT pg_sleep(1.5); CREATE TABLE after_the_sleep (id int)")
    try:
        migrating = asyncio.create_task(migrate_when_reachable(pool, "restarting", [slow]))
        await wait_until_sleeping(url)  # the migration is inside its transaction
        await asyncio.to_thread(own_postgres.stop)
        own_postgres.launch()
        await asyncio.to_thread(own_postgres.wait_ready)
        applied = await asyncio.wait_for(migrating, 60)
        assert applied[-1] == "001_slow", "applied in full once the server was back"
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM restarting.schema_migrations WHERE name = '001_slow'") == 1
            assert await conn.fetchval("SELECT to_regclass('restarting.after_the_sleep') IS NOT NULL")
        finally:
            await conn.close()
    finally:
        await pool.close()
