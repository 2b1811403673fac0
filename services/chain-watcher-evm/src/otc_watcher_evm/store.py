"""All SQL of the watcher. Escrow addresses are stored as the engine assigned them (`watch_set`);
hashes and txids in lowercase hex.

Replicas share the schema: every state change runs in a transaction that starts with
`claim_head`, which serialises writers and refuses one whose view of the chain is stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from otc_common.db import Connection
from otc_watcher_evm.rules import Baseline, Block, Followed, Found


@dataclass(frozen=True)
class Head:
    number: int
    hash: str
    version: int


@dataclass(frozen=True)
class StoredBlock:
    number: int
    hash: str
    parent_hash: str
    time: int

    def as_block(self) -> Block:
        return Block(number=self.number, hash=self.hash, parent_hash=self.parent_hash, time=self.time)


async def head(conn: Connection) -> Head | None:
    row = await conn.fetchrow("SELECT number, hash, version FROM head")
    return None if row is None else Head(row["number"], row["hash"], row["version"])


@dataclass(frozen=True)
class Feed:
    """Counts of the changes others made (see migration 004): to the watch set, and to the follows."""

    watch_set: int
    followed: int


async def head_and_feed(conn: Connection) -> tuple[Head | None, Feed]:
    row = await conn.fetchrow(
        """SELECT h.number, h.hash, h.version,
                  (SELECT version FROM feed WHERE name = 'watch_set') AS watch_set,
                  (SELECT version FROM feed WHERE name = 'followed') AS followed
           FROM (VALUES (true)) AS one (id) LEFT JOIN head h USING (id)"""
    )
    assert row is not None
    found = None if row["number"] is None else Head(row["number"], row["hash"], row["version"])
    return found, Feed(int(row["watch_set"]), int(row["followed"]))


async def claim_head(conn: Connection, seen: Head | None) -> bool:
    """In a transaction: true when nothing changed since `seen` was read, and holds off other writers."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':head'))")
    row = await conn.fetchrow("SELECT version FROM head")
    current = None if row is None else row["version"]
    return current == (None if seen is None else seen.version)


async def set_head(conn: Connection, number: int, block_hash: str) -> Head:
    version = await conn.fetchval(
        """INSERT INTO head (id, number, hash, version) VALUES (true, $1, $2, 1)
           ON CONFLICT (id) DO UPDATE SET number = EXCLUDED.number, hash = EXCLUDED.hash,
                                          version = head.version + 1
           RETURNING version""",
        number,
        block_hash,
    )
    return Head(number, block_hash, int(version))


async def bump_version(conn: Connection) -> None:
    await conn.execute("UPDATE head SET version = version + 1")


async def follows_pending(conn: Connection) -> bool:
    """Followed transactions not yet looked up."""
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM followed WHERE NOT checked AND NOT done)"))


async def escrows_pending(conn: Connection) -> bool:
    """Watched escrows not yet re-checked, or balances of escrows no longer watched."""
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM watch_set w WHERE NOT EXISTS
                                  (SELECT 1 FROM balances b WHERE b.address = w.address))
                      OR EXISTS (SELECT 1 FROM balances b WHERE NOT EXISTS
                                  (SELECT 1 FROM watch_set w WHERE w.address = b.address))"""
        )
    )


# --------------------------------------------------------------------------- blocks


async def window(conn: Connection) -> list[StoredBlock]:
    rows = await conn.fetch("SELECT number, hash, parent_hash, time FROM blocks ORDER BY number")
    return [StoredBlock(row["number"], row["hash"], row["parent_hash"], row["time"]) for row in rows]


async def insert_block(conn: Connection, block: Block) -> None:
    await conn.execute(
        """INSERT INTO blocks (number, hash, parent_hash, time) VALUES ($1, $2, $3, $4)
           ON CONFLICT (number) DO UPDATE SET hash = EXCLUDED.hash, parent_hash = EXCLUDED.parent_hash,
                                              time = EXCLUDED.time""",
        block.number,
        block.hash,
        block.parent_hash,
        block.time,
    )


async def forget_above(conn: Connection, number: int) -> None:
    """Blocks a reorg replaced, and what was published for them."""
    await conn.execute("DELETE FROM blocks WHERE number > $1", number)
    await conn.execute("DELETE FROM published WHERE block_number > $1", number)


async def prune(conn: Connection, below: int) -> None:
    """Keeps only the reorg window."""
    await conn.execute("DELETE FROM blocks WHERE number < $1", below)
    await conn.execute("DELETE FROM published WHERE block_number < $1", below)
    await conn.execute("DELETE FROM followed WHERE done AND block_number < $1", below)


# --------------------------------------------------------------------------- escrows


async def watched(conn: Connection) -> dict[str, str]:
    """Lowercase address → the address as assigned."""
    return {row["address"].lower(): row["address"] for row in await conn.fetch("SELECT address FROM watch_set")}


_BASELINES = """SELECT b.address, b.balance::text AS balance, b.direct_since::text AS direct_since,
                        b.spent_since::text AS spent_since
                 FROM balances b JOIN watch_set w USING (address)"""


def _baselines(rows: Iterable[asyncpg.Record]) -> dict[str, Baseline]:
    # Read as text: a numeric column decodes to Decimal, several times slower for 10,000 rows.
    return {
        row["address"].lower(): Baseline(
            int(row["balance"]),
            int(row["direct_since"]),
            None if row["spent_since"] is None else int(row["spent_since"]),
        )
        for row in rows
    }


async def baselines(conn: Connection) -> dict[str, Baseline]:
    """Lowercase address → balance baseline, for watched escrows already re-checked."""
    return _baselines(await conn.fetch(_BASELINES))


async def baselines_written_since(conn: Connection, version: int) -> dict[str, Baseline]:
    """The baselines written in transactions that claimed head version `version` or a later one."""
    return _baselines(await conn.fetch(_BASELINES + " WHERE b.version >= $1", version))


@dataclass(frozen=True)
class Unchecked:
    """A watched escrow not re-checked yet, and when the engine assigned it (None if not recorded)."""

    address: str
    assigned_at: datetime | None


async def unchecked_escrows(conn: Connection, limit: int) -> list[Unchecked]:
    rows = await conn.fetch(
        """SELECT w.address, w.assigned_at FROM watch_set w
           WHERE NOT EXISTS (SELECT 1 FROM balances b WHERE b.address = w.address)
           ORDER BY w.added_at, w.address LIMIT $1""",
        limit,
    )
    return [Unchecked(row["address"], row["assigned_at"]) for row in rows]


async def drop_unwatched_balances(conn: Connection) -> None:
    await conn.execute(
        "DELETE FROM balances b WHERE NOT EXISTS (SELECT 1 FROM watch_set w WHERE w.address = b.address)"
    )


async def set_baselines(conn: Connection, values: Mapping[str, Baseline]) -> None:
    """In a transaction that claimed the head (`claim_head`), and so moves it on before it commits."""
    if not values:
        return
    addresses = list(values)
    await conn.execute(
        """INSERT INTO balances (address, balance, direct_since, spent_since, version)
           SELECT address, balance, direct_since, spent_since, coalesce((SELECT version FROM head), 0)
           FROM unnest($1::text[], $2::numeric[], $3::numeric[], $4::numeric[])
                AS v (address, balance, direct_since, spent_since)
           ON CONFLICT (address) DO UPDATE SET balance = EXCLUDED.balance, direct_since = EXCLUDED.direct_since,
                                               spent_since = EXCLUDED.spent_since, version = EXCLUDED.version""",
        addresses,
        [values[a].balance for a in addresses],
        [values[a].direct_since for a in addresses],
        [values[a].spent_since for a in addresses],
    )


# --------------------------------------------------------------------------- published deposits


async def record_published(conn: Connection, found: Found, address: str, block: Block) -> bool:
    """True when this fact was not published before (for this block)."""
    fresh = await conn.fetchval(
        """INSERT INTO published (txid, idx, block_hash, block_number, address, asset, amount)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING true""",
        found.txid,
        found.index,
        block.hash,
        block.number,
        address,
        found.asset if found.asset is not None else found.contract,
        found.amount,
    )
    return bool(fresh)


async def confirm_deposits(conn: Connection, block_number: int) -> list[float]:
    """Seconds each deposit of block `block_number` waited since it was published; each is reported once.

    Unregistered tokens (recorded under their contract address) are no deposits and are left out.
    """
    rows = await conn.fetch(
        """UPDATE published SET confirmed_at = now()
           WHERE block_number = $1 AND seen_at IS NOT NULL AND confirmed_at IS NULL AND asset NOT LIKE '0x%'
           RETURNING extract(epoch FROM confirmed_at - seen_at) AS waited""",
        block_number,
    )
    return [float(row["waited"]) for row in rows]


async def addresses_with_published(conn: Connection, addresses: Sequence[str], asset: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT address FROM published WHERE address = ANY($1::text[]) AND asset = $2",
        list(addresses),
        asset,
    )
    return {row["address"] for row in rows}


# --------------------------------------------------------------------------- followed transactions


def _followed(row: asyncpg.Record) -> Followed:
    return Followed(
        txid=row["txid"],
        transfer_id=row["transfer_id"],
        block_number=row["block_number"],
        block_hash=row["block_hash"],
        success=row["success"],
        fee_paid=int(row["fee_paid"]),
    )


async def add_follow(conn: Connection, txid: str, transfer_id: str) -> None:
    # A fee-bump candidate announced after its transfer was settled would never be mined: skip it.
    await conn.execute(
        """INSERT INTO followed (txid, transfer_id)
           SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM followed WHERE transfer_id = $2 AND done)
           ON CONFLICT (txid) DO NOTHING""",
        txid,
        transfer_id,
    )


async def open_follows(conn: Connection) -> dict[str, Followed]:
    rows = await conn.fetch("SELECT * FROM followed WHERE NOT done")
    return {row["txid"]: _followed(row) for row in rows}


async def unchecked_follows(conn: Connection, limit: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT txid FROM followed WHERE NOT checked AND NOT done ORDER BY added_at, txid LIMIT $1", limit
    )
    return [row["txid"] for row in rows]


async def mark_checked(conn: Connection, txids: Iterable[str]) -> None:
    await conn.execute("UPDATE followed SET checked = true WHERE txid = ANY($1::text[])", list(txids))


async def mark_mined(
    conn: Connection, txid: str, block_number: int, block_hash: str, success: bool, fee_paid: int
) -> None:
    await conn.execute(
        """UPDATE followed SET checked = true, block_number = $2, block_hash = $3, success = $4, fee_paid = $5
           WHERE txid = $1""",
        txid,
        block_number,
        block_hash,
        success,
        fee_paid,
    )


async def mark_done(conn: Connection, item: Followed) -> None:
    await conn.execute("UPDATE followed SET done = true WHERE txid = $1", item.txid)
    # The other candidates of the transfer share its nonce: none of them can be mined any more.
    await conn.execute(
        "DELETE FROM followed WHERE transfer_id = $1 AND block_hash IS NULL AND txid <> $2",
        item.transfer_id,
        item.txid,
    )


async def unmine(conn: Connection, block_hashes: Sequence[str]) -> list[Followed]:
    """Followed transactions whose block a reorg removed: not mined any more, and followed again."""
    rows = await conn.fetch(
        """UPDATE followed f SET block_number = NULL, block_hash = NULL, done = false
           FROM (SELECT txid, block_number, block_hash FROM followed WHERE block_hash = ANY($1::text[])) old
           WHERE f.txid = old.txid
           RETURNING f.txid, f.transfer_id, old.block_number, old.block_hash, f.success, f.fee_paid""",
        list(block_hashes),
    )
    return [_followed(row) for row in rows]
