"""Chain events that arrive late must not roll the engine's view of the chain back.

Found by the chaos simulation. A consumer fetches events in batches, and what a killed engine (or a handler that
failed while PostgreSQL restarted) left unacknowledged comes back up to 30 s later, after newer events:
- a stale tip report moved the tip back, the deposits looked unconfirmed, and the ledger took "less confirmed than
  already paid out" for "nothing left": the deal closed SWAPPED with its surplus still in the escrow;
- a stale reorg report unmined, by height, deposits that had been seen again in the new branch since; no watcher
  reports them again, so the deal stayed in COLLECTION with both deposits in its escrows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from otc_common.bus import TransientError
from otc_common.db import Pool, create_pool, migrate, package_migrations
from otc_common.messages import ChainReorg, ChainTip, DepositObserved, Party, decode_envelope, encode_envelope
from otc_common.registry import load_registry
from otc_engine import store
from otc_engine.handlers import Handlers
from otc_engine.service import Engine


@pytest.fixture
async def engine_pool(database_url: str) -> AsyncIterator[Pool]:
    pool = await create_pool(database_url, "engine", max_size=2)
    await migrate(pool, "engine", package_migrations("otc_engine"))
    yield pool
    await pool.close()


async def deliver(pool: Pool, handlers: Handlers, message: ChainTip | ChainReorg | DepositObserved) -> None:
    envelope, payload = decode_envelope(encode_envelope(message))
    async with pool.acquire() as conn, conn.transaction():
        await handlers.advance_all(conn, await handlers.chain(conn, envelope, payload))


async def tip(pool: Pool) -> tuple[int, str]:
    row = await pool.fetchrow("SELECT height, hash FROM chain_tips WHERE chain = 'POLYGON'")
    assert row is not None
    return int(row["height"]), str(row["hash"])


def reorg(ancestor: int, removed: list[str], new_tip: int, new_hash: str) -> ChainReorg:
    return ChainReorg(
        chain="POLYGON",
        ancestor_height=ancestor,
        ancestor_hash=f"h{ancestor}",
        depth=len(removed),
        removed_hashes=removed,
        new_tip_height=new_tip,
        new_tip_hash=new_hash,
    )


async def test_late_tip_and_reorg_reports_do_not_move_the_tip_back(engine_pool: Pool, registry_file: Path) -> None:
    registry = load_registry(str(registry_file))
    handlers = Handlers(Engine(engine_pool, registry), registry)
    for height in (50, 51, 52):
        await deliver(engine_pool, handlers, ChainTip(chain="POLYGON", height=height, hash=f"h{height}", time=0))
    await deliver(engine_pool, handlers, ChainTip(chain="POLYGON", height=45, hash="h45", time=0))
    assert await tip(engine_pool) == (52, "h52"), "a redelivered old tip moved the tip back"
    await deliver(engine_pool, handlers, reorg(40, ["h41"], 42, "x42"))
    assert await tip(engine_pool) == (52, "h52"), "a late report of an old reorg moved the tip back"
    # A reorg that replaced the recorded tip moves it onto the new branch, at the same height too (anvil).
    await deliver(engine_pool, handlers, reorg(51, ["h52"], 52, "x52"))
    assert await tip(engine_pool) == (52, "x52")


async def test_a_late_reorg_report_unmines_only_deposits_still_in_the_blocks_it_replaced(engine_pool: Pool) -> None:
    await engine_pool.execute(
        "INSERT INTO deals (deal_id, name, stage, timeout_seconds) VALUES ('d1', 'd1', 'WAITING', 600)"
    )
    now = datetime.now(UTC)
    async with engine_pool.acquire() as conn:
        # Both deposits were in block 37 of a branch a reorg replaced; one was seen again in the new block 37.
        for txid, block_hash in (("0xseen-again", "new37"), ("0xgone", "old37")):
            await store.upsert_deposit(
                conn,
                chain="POLYGON",
                txid=txid,
                idx=0,
                deal_id="d1",
                party=Party.BOB,
                address="0xescrow",
                asset="MATIC",
                amount=5,
                block_number=37,
                block_hash=block_hash,
                block_time=now,
            )
        # The report of that reorg arrives only now.
        assert await store.unmine_blocks(conn, "POLYGON", ["old37", "old38"]) == ["d1"]
        rows = await conn.fetch("SELECT txid, block_number FROM deposits ORDER BY txid")
    assert [(r["txid"], r["block_number"]) for r in rows] == [("0xgone", None), ("0xseen-again", 37)]


class Recording(Engine):
    """The engine, noting which deals it re-evaluates instead of re-evaluating them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.advanced: list[str] = []

    async def advance_all(self, conn: Any, deal_ids: Iterable[str], now: datetime) -> None:
        self.advanced.extend(sorted(set(deal_ids)))


async def test_a_reorg_that_moves_the_tip_on_re_evaluates_deposits_reaching_the_threshold(
    engine_pool: Pool, registry_file: Path
) -> None:
    """Found by the chaos simulation: a late deposit stayed in its escrow for good."""
    registry = load_registry(str(registry_file))
    engine = Recording(engine_pool, registry)
    handlers = Handlers(engine, registry)
    await engine_pool.execute(
        "INSERT INTO deals (deal_id, name, stage, timeout_seconds) VALUES ('d2', 'd2', 'CLOSED', 600)"
    )
    async with engine_pool.acquire() as conn:
        await store.upsert_deposit(
            conn,
            chain="POLYGON",
            txid="0xlate",
            idx=0,
            deal_id="d2",
            party=Party.BOB,
            address="0xescrow",
            asset="MATIC",
            amount=5,
            block_number=60,
            block_hash="h60",
            block_time=datetime.now(UTC),
        )
    for height in (60, 61):
        await deliver(engine_pool, handlers, ChainTip(chain="POLYGON", height=height, hash=f"h{height}", time=0))
    assert engine.advanced == [], "2 of POLYGON's 3 confirmations: nothing to re-evaluate yet"
    # Block 61 is replaced and the new branch is reported at 62: the deposit in 60 has 3 confirmations now, and
    # the tip reports of the new 61 and 62 that follow are older than the recorded tip.
    await deliver(engine_pool, handlers, reorg(60, ["h61"], 62, "x62"))
    for height in (61, 62):
        await deliver(engine_pool, handlers, ChainTip(chain="POLYGON", height=height, hash=f"x{height}", time=0))
    assert engine.advanced == ["d2"]


def deposit_in(block_hash: str, reorgs: int) -> DepositObserved:
    return DepositObserved(
        chain="POLYGON",
        address="0xescrow",
        asset="MATIC",
        txid="0xdeposit",
        index=0,
        amount=5,
        block_number=70,
        block_hash=block_hash,
        block_time=0,
        reorgs=reorgs,
    )


async def mined_block(pool: Pool) -> int | None:
    value = await pool.fetchval("SELECT block_number FROM deposits WHERE txid = '0xdeposit'")
    return None if value is None else int(value)


async def test_a_tip_waits_for_the_reorgs_its_watcher_followed_before_it(
    engine_pool: Pool, registry_file: Path
) -> None:
    """Found by the chaos simulation: the engine was killed with a reorg report in hand; the report came back 30 s
    later, after the new branch's tips, and meanwhile a deposit of a replaced block counted as confirmed: payouts
    were signed a minute before the deposit that replaced it had its confirmations."""
    registry = load_registry(str(registry_file))
    engine = Recording(engine_pool, registry)
    handlers = Handlers(engine, registry)
    await engine_pool.execute(
        """INSERT INTO deals (deal_id, name, stage, timeout_seconds) VALUES ('d3', 'd3', 'WAITING', 600);
           INSERT INTO deal_sides (deal_id, party, chain, asset, amount, commission, fee_reserve, escrow_index,
                                   escrow_address, token_hash)
           VALUES ('d3', 'BOB', 'POLYGON', 'MATIC', 5, 0, 0, 1, '0xescrow', '\\x00')"""
    )
    await deliver(engine_pool, handlers, ChainTip(chain="POLYGON", height=70, hash="h70", time=0))
    await deliver(engine_pool, handlers, deposit_in("h70", reorgs=0))
    assert await mined_block(engine_pool) == 70
    # Reorg 1 replaces block 70; its report is held back while the new branch's tips arrive.
    for height in (71, 72, 73):
        with pytest.raises(TransientError):
            await deliver(
                engine_pool, handlers, ChainTip(chain="POLYGON", height=height, hash=f"x{height}", time=0, reorgs=1)
            )
    assert await tip(engine_pool) == (70, "h70"), "a tip after a reorg not taken in yet must wait"
    with pytest.raises(TransientError):
        await deliver(engine_pool, handlers, reorg_numbered(2, 69, ["x70"], 70, "y70"))
    await deliver(engine_pool, handlers, reorg_numbered(1, 69, ["h70"], 70, "x70"))
    assert await mined_block(engine_pool) is None
    await deliver(engine_pool, handlers, ChainTip(chain="POLYGON", height=73, hash="x73", time=0, reorgs=1))
    assert await tip(engine_pool) == (73, "x73")

    # The deposit's own report, redelivered late, names the replaced block: it is not mined for that.
    await deliver(engine_pool, handlers, deposit_in("h70", reorgs=0))
    assert await mined_block(engine_pool) is None
    # Seen in that same block by a watcher that followed the reorg (the chain went back to it): mined.
    await deliver(engine_pool, handlers, deposit_in("h70", reorgs=1))
    assert await mined_block(engine_pool) == 70


def reorg_numbered(sequence: int, ancestor: int, removed: list[str], new_tip: int, new_hash: str) -> ChainReorg:
    return msgspec.structs.replace(reorg(ancestor, removed, new_tip, new_hash), sequence=sequence)
