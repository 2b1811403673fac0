"""All SQL of the watcher. Escrow addresses are stored as the engine assigned them (`watch_set`);
hashes, txids and scripthashes in lowercase hex, display order.

Replicas share the schema: block changes run in a transaction that starts with `claim_head`, which
serialises writers and refuses one whose view of the chain is stale; the other writers take the
same lock and check the blocks they rely on instead (`lock_head`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from otc_common.chainwatch import Followed
from otc_common.db import Connection
from otc_watcher_utxo.rules import Header

#: Channel woken when the watch set or the followed transactions change (delivered on commit).
CHANGED_CHANNEL_SUFFIX = "_watch"


@dataclass(frozen=True)
class Head:
    number: int
    hash: str
    version: int


@dataclass(frozen=True)
class Follow:
    item: Followed
    scripthash: str | None


async def head(conn: Connection) -> Head | None:
    row = await conn.fetchrow("SELECT number, hash, version FROM head")
    return None if row is None else Head(row["number"], row["hash"], row["version"])


async def lock_head(conn: Connection) -> Head | None:
    """In a transaction: holds off writers of blocks until commit, and returns the head as it is now."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':head'))")
    return await head(conn)


async def claim_head(conn: Connection, seen: Head | None) -> bool:
    """In a transaction: true when the head is still `seen`, and holds off other writers."""
    now = await lock_head(conn)
    return (None if now is None else now.version) == (None if seen is None else seen.version)


async def set_head(conn: Connection, number: int, block_hash: str) -> None:
    await conn.execute(
        """INSERT INTO head (id, number, hash, version) VALUES (true, $1, $2, 1)
           ON CONFLICT (id) DO UPDATE SET number = EXCLUDED.number, hash = EXCLUDED.hash,
                                          version = head.version + 1""",
        number,
        block_hash,
    )


async def notify_changed(conn: Connection) -> None:
    await conn.execute(f"SELECT pg_notify(current_schema() || '{CHANGED_CHANNEL_SUFFIX}', '')")


# --------------------------------------------------------------------------- blocks


def _header(row: asyncpg.Record) -> Header:
    return Header(
        height=row["number"],
        hash=row["hash"],
        prev_hash=row["parent_hash"],
        merkle_root=row["merkle_root"],
        time=row["time"],
    )


async def window(conn: Connection) -> list[Header]:
    rows = await conn.fetch("SELECT number, hash, parent_hash, merkle_root, time FROM blocks ORDER BY number")
    return [_header(row) for row in rows]


async def blocks_at(conn: Connection, numbers: Iterable[int]) -> dict[int, Header]:
    rows = await conn.fetch(
        "SELECT number, hash, parent_hash, merkle_root, time FROM blocks WHERE number = ANY($1::bigint[])",
        list(numbers),
    )
    return {row["number"]: _header(row) for row in rows}


async def lowest_block(conn: Connection) -> int | None:
    value = await conn.fetchval("SELECT min(number) FROM blocks")
    return None if value is None else int(value)


async def insert_block(conn: Connection, block: Header) -> None:
    await conn.execute(
        """INSERT INTO blocks (number, hash, parent_hash, merkle_root, time) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (number) DO UPDATE SET hash = EXCLUDED.hash, parent_hash = EXCLUDED.parent_hash,
                                              merkle_root = EXCLUDED.merkle_root, time = EXCLUDED.time""",
        block.height,
        block.hash,
        block.prev_hash,
        block.merkle_root,
        block.time,
    )


async def forget_above(conn: Connection, number: int) -> list[str]:
    """Blocks a reorg replaced and what was published for them; returns the escrows those deposits paid."""
    await conn.execute("DELETE FROM blocks WHERE number > $1", number)
    rows = await conn.fetch("DELETE FROM published WHERE block_number > $1 RETURNING address", number)
    return sorted({row["address"] for row in rows})


async def prune(conn: Connection, below: int) -> None:
    """Keeps the reorg window; deposits of escrows still watched stay, since their histories are re-checked."""
    await conn.execute("DELETE FROM blocks WHERE number < $1", below)
    await conn.execute(
        """DELETE FROM published p WHERE block_number < $1
           AND NOT EXISTS (SELECT 1 FROM watch_set w WHERE w.address = p.address)""",
        below,
    )
    await conn.execute("DELETE FROM followed WHERE done AND block_number < $1", below)


# --------------------------------------------------------------------------- escrows and deposits


async def watched(conn: Connection) -> list[str]:
    return [row["address"] for row in await conn.fetch("SELECT address FROM watch_set")]


async def published_for(conn: Connection, address: str) -> set[tuple[str, str]]:
    """(txid, block hash) of what was published for `address`."""
    rows = await conn.fetch("SELECT DISTINCT txid, block_hash FROM published WHERE address = $1", address)
    return {(row["txid"], row["block_hash"]) for row in rows}


async def record_published(
    conn: Connection, deposit_txid: str, index: int, block: Header, address: str, amount: int
) -> bool:
    """True when this fact was not published before (for this block)."""
    fresh = await conn.fetchval(
        """INSERT INTO published (txid, idx, block_hash, block_number, address, amount)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true""",
        deposit_txid,
        index,
        block.hash,
        block.height,
        address,
        amount,
    )
    return bool(fresh)


async def confirm_deposits(conn: Connection, block_number: int) -> list[float]:
    """Seconds each deposit of block `block_number` waited since it was published; each is reported once.

    A deposit whose history is read only after its block had the threshold is never reported: it did not wait.
    """
    rows = await conn.fetch(
        """UPDATE published SET confirmed_at = now()
           WHERE block_number = $1 AND seen_at IS NOT NULL AND confirmed_at IS NULL
           RETURNING extract(epoch FROM confirmed_at - seen_at) AS waited""",
        block_number,
    )
    return [float(row["waited"]) for row in rows]


async def add_rescan(conn: Connection, scripthashes: Iterable[str]) -> None:
    await conn.execute(
        "INSERT INTO rescan (scripthash) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", sorted(set(scripthashes))
    )


async def rescans(conn: Connection) -> list[str]:
    return [row["scripthash"] for row in await conn.fetch("SELECT scripthash FROM rescan")]


async def clear_rescan(conn: Connection, scripthash: str) -> None:
    await conn.execute("DELETE FROM rescan WHERE scripthash = $1", scripthash)


# --------------------------------------------------------------------------- followed transactions


def _follow(row: asyncpg.Record) -> Follow:
    return Follow(
        item=Followed(
            txid=row["txid"],
            transfer_id=row["transfer_id"],
            block_number=row["block_number"],
            block_hash=row["block_hash"],
            fee_paid=int(row["fee_paid"]),
        ),
        scripthash=row["scripthash"],
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
    await notify_changed(conn)


async def open_follows(conn: Connection) -> dict[str, Follow]:
    rows = await conn.fetch("SELECT * FROM followed WHERE NOT done")
    return {row["txid"]: _follow(row) for row in rows}


async def resolve_follow(conn: Connection, txid: str, scripthash: str, fee: int) -> None:
    await conn.execute(
        "UPDATE followed SET scripthash = $2, fee_paid = $3 WHERE txid = $1 AND scripthash IS NULL",
        txid,
        scripthash,
        fee,
    )


async def mark_mined(conn: Connection, txid: str, block: Header) -> Followed | None:
    """The transaction as now mined in `block`; None when that was known already (or it is settled)."""
    row = await conn.fetchrow(
        """UPDATE followed SET block_number = $2, block_hash = $3
           WHERE txid = $1 AND NOT done AND block_hash IS DISTINCT FROM $3
           RETURNING txid, transfer_id, block_number, block_hash, fee_paid, scripthash""",
        txid,
        block.height,
        block.hash,
    )
    return None if row is None else _follow(row).item


async def mark_done(conn: Connection, item: Followed) -> None:
    await conn.execute("UPDATE followed SET done = true WHERE txid = $1", item.txid)
    # The other candidates of the transfer spend the same coins: none of them can be mined any more.
    await conn.execute(
        "DELETE FROM followed WHERE transfer_id = $1 AND block_hash IS NULL AND txid <> $2",
        item.transfer_id,
        item.txid,
    )


async def unmine(conn: Connection, block_hashes: Sequence[str]) -> list[Follow]:
    """Followed transactions whose block a reorg removed: not mined any more, and followed again."""
    rows = await conn.fetch(
        """UPDATE followed f SET block_number = NULL, block_hash = NULL, done = false
           FROM (SELECT txid, block_number, block_hash FROM followed WHERE block_hash = ANY($1::text[])) old
           WHERE f.txid = old.txid
           RETURNING f.txid, f.transfer_id, old.block_number, old.block_hash, f.fee_paid, f.scripthash""",
        list(block_hashes),
    )
    return [_follow(row) for row in rows]


async def follow_count(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM followed WHERE NOT done") or 0)
