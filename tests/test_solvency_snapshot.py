"""The solvency check's ledger snapshot at the scale of thousands of open deals.

The snapshot runs on the engine's event loop every solvency interval over every open deal; work
that grows with the square of the deal count stalls the engine's API and consumers for minutes at
10,000 deals. The CPU time is asserted, not the wall time, so a busy machine does not decide it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from otc_common.db import Pool, create_pool, migrate, package_migrations
from otc_common.messages import Party
from otc_common.registry import load_registry
from otc_engine.service import Engine
from otc_engine.solvency import SolvencyChecker

DEALS = 4000
#: A pass linear in the deal count takes a few tens of milliseconds here; a quadratic one, seconds.
CPU_LIMIT_SECONDS = 1.5


@pytest.fixture
async def engine_pool(database_url: str) -> AsyncIterator[Pool]:
    pool = await create_pool(database_url, "engine", max_size=2)
    await migrate(pool, "engine", package_migrations("otc_engine"))
    yield pool
    await pool.close()


def escrow_of(i: int, party: Party) -> str:
    return f"0x{i:019x}{'a' if party is Party.ALICE else 'b'}{'0' * 20}"


async def open_deals(pool: Pool, count: int) -> list[str]:
    """`count` deals, each with both sides, one deposit into ALICE's escrow and one transfer out of BOB's.

    Written in bulk: the snapshot only reads these tables, and thousands of single inserts would make
    the setup, not the snapshot, the slow part.
    """
    ids = [f"deal{i:06d}" for i in range(count)]
    at = datetime(2026, 11, 26, tzinfo=UTC)
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO deals (deal_id, name, stage, timeout_seconds) VALUES ($1, $1, 'COLLECTION', 600)",
            [(deal_id,) for deal_id in ids],
        )
        await conn.executemany(
            """INSERT INTO deal_sides (deal_id, party, chain, asset, amount, commission, fee_reserve,
                                       escrow_index, escrow_address, token_hash)
               VALUES ($1, $2, $3, $4, $5, 3, 50, $6, $7, $8)""",
            [
                (
                    deal_id,
                    party.value,
                    chain,
                    asset,
                    1000 + i,
                    2 * i + (party is Party.BOB),
                    escrow_of(i, party),
                    bytes(32),
                )
                for i, deal_id in enumerate(ids)
                for party, chain, asset in ((Party.ALICE, "ETH", "ETH"), (Party.BOB, "POLYGON", "MATIC"))
            ],
        )
        await conn.executemany(
            """INSERT INTO deposits (chain, txid, idx, deal_id, party, address, asset, amount,
                                     block_number, block_hash, block_time)
               VALUES ('ETH', $1, 0, $2, 'ALICE', $3, 'ETH', $4, 10, '0xb10', $5)""",
            [(f"0x{i:064x}", deal_id, escrow_of(i, Party.ALICE), 1053 + i, at) for i, deal_id in enumerate(ids)],
        )
        await conn.executemany(
            """INSERT INTO transfers (transfer_id, deal_id, party, chain, asset, escrow_address, escrow_index,
                                      purpose, to_address, amount, fee_from_amount, phase)
               VALUES ($1, $2, 'BOB', 'POLYGON', 'MATIC', $3, $4, 'SWAP_PAYOUT', '0xRecipient', $5, false, 1)""",
            [
                (f"{deal_id}:BOB:SWAP_PAYOUT:0", deal_id, escrow_of(i, Party.BOB), 2 * i + 1, 1000 + i)
                for i, deal_id in enumerate(ids)
            ],
        )
    return ids


async def test_snapshot_of_thousands_of_deals_gives_each_its_own_facts_in_linear_time(
    engine_pool: Pool, registry_file: Path
) -> None:
    registry = load_registry(str(registry_file))
    checker = SolvencyChecker(Engine(engine_pool, registry), registry)
    ids = await open_deals(engine_pool, DEALS)
    try:
        cpu = time.process_time()
        facts, _tips = await checker.snapshot(ids)
        cpu = time.process_time() - cpu
    finally:
        await checker.close()

    assert sorted(facts) == ids
    for i, deal_id in enumerate(ids):
        deal = facts[deal_id]
        assert {p: s["escrow_address"] for p, s in deal.sides.items()} == {
            Party.ALICE: escrow_of(i, Party.ALICE),
            Party.BOB: escrow_of(i, Party.BOB),
        }
        assert [int(d["amount"]) for d in deal.deposits] == [1053 + i]
        assert [t["transfer_id"] for t in deal.transfers] == [f"{deal_id}:BOB:SWAP_PAYOUT:0"]
        assert deal.escrows[Party.ALICE].deposits[0].amount == 1053 + i
    assert cpu < CPU_LIMIT_SECONDS, f"snapshot of {DEALS} deals took {cpu:.2f}s of CPU"
