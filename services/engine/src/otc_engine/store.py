"""All of the engine's SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import msgspec

from otc_common.db import Connection
from otc_common.messages import Outcome, Party, Stage
from otc_engine.rules import DealState, SideState, Transition


class NewSide(msgspec.Struct, frozen=True, kw_only=True):
    party: Party
    chain: str
    asset: str
    amount: int
    commission: int
    fee_reserve: int
    escrow_index: int
    escrow_address: str
    token_hash: bytes


async def next_escrow_index(conn: Connection) -> int:
    value = await conn.fetchval("SELECT nextval('escrow_index_seq')")
    return int(value)


async def insert_deal(
    conn: Connection, deal_id: str, name: str, timeout_seconds: int, sides: Sequence[NewSide]
) -> None:
    await conn.execute(
        "INSERT INTO deals (deal_id, name, stage, timeout_seconds) VALUES ($1, $2, $3, $4)",
        deal_id,
        name,
        Stage.CREATED.value,
        timeout_seconds,
    )
    await conn.executemany(
        """INSERT INTO deal_sides (deal_id, party, chain, asset, amount, commission, fee_reserve,
                                   escrow_index, escrow_address, token_hash)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
        [
            (
                deal_id,
                s.party.value,
                s.chain,
                s.asset,
                s.amount,
                s.commission,
                s.fee_reserve,
                s.escrow_index,
                s.escrow_address,
                s.token_hash,
            )
            for s in sides
        ],
    )


async def lock_deal(conn: Connection, deal_id: str) -> asyncpg.Record | None:
    """The deal row, locked until the transaction ends: per-deal serialisation across replicas."""
    return await conn.fetchrow("SELECT * FROM deals WHERE deal_id = $1 FOR UPDATE", deal_id)


async def lock_deals(conn: Connection, deal_ids: list[str]) -> list[asyncpg.Record]:
    """The deal rows, locked in id order (byte order, as Python sorts them), so that transactions locking
    several deals at once never deadlock on each other."""
    return list(
        await conn.fetch(
            'SELECT * FROM deals WHERE deal_id = ANY($1::text[]) ORDER BY deal_id COLLATE "C" FOR UPDATE',
            deal_ids,
        )
    )


async def get_deal(conn: Connection, deal_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM deals WHERE deal_id = $1", deal_id)


async def get_sides(conn: Connection, deal_id: str) -> dict[Party, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM deal_sides WHERE deal_id = $1", deal_id)
    return {Party(row["party"]): row for row in rows}


async def fill_party(
    conn: Connection,
    deal_id: str,
    party: Party,
    payback: str,
    recipient: str,
    email: str | None,
    now: datetime,
) -> None:
    await conn.execute(
        """UPDATE deal_sides SET payback_address = $3, recipient_address = $4, email = $5, filled_at = $6
           WHERE deal_id = $1 AND party = $2 AND filled_at IS NULL""",
        deal_id,
        party.value,
        payback,
        recipient,
        email,
        now,
    )


async def mark_cancelled(conn: Connection, deal_id: str) -> None:
    await conn.execute("UPDATE deals SET cancelled = true WHERE deal_id = $1", deal_id)


async def add_event(conn: Connection, deal_id: str, type_: str, detail: dict[str, Any], now: datetime) -> None:
    await conn.execute(
        "INSERT INTO deal_events (deal_id, type, detail, at) VALUES ($1, $2, $3::jsonb, $4)",
        deal_id,
        type_,
        msgspec.json.encode(detail).decode(),
        now,
    )


async def events(conn: Connection, deal_id: str, limit: int = 200) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT type, detail, at FROM deal_events WHERE deal_id = $1 ORDER BY id LIMIT $2", deal_id, limit
        )
    )


async def due_deals(conn: Connection, now: datetime, limit: int) -> list[str]:
    """Deals whose deadline has passed, locked; replicas skip each other's rows."""
    rows = await conn.fetch(
        """SELECT deal_id FROM deals WHERE stage = 'COLLECTION' AND expires_at <= $1
           ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED""",
        now,
        limit,
    )
    return [row["deal_id"] for row in rows]


def deal_state(deal: asyncpg.Record, sides: dict[Party, asyncpg.Record]) -> DealState:
    def side(party: Party) -> SideState:
        row = sides[party]
        return SideState(
            party=party,
            chain=row["chain"],
            asset=row["asset"],
            amount=int(row["amount"]),
            commission=int(row["commission"]),
            fee_reserve=int(row["fee_reserve"]),
            filled=row["filled_at"] is not None,
        )

    return DealState(
        deal_id=deal["deal_id"],
        stage=Stage(deal["stage"]),
        outcome=Outcome(deal["outcome"]) if deal["outcome"] else None,
        timeout_seconds=deal["timeout_seconds"],
        expires_at=deal["expires_at"],
        remaining_ms=deal["remaining_ms"],
        alice=side(Party.ALICE),
        bob=side(Party.BOB),
        cancelled=deal["cancelled"],
    )


# --------------------------------------------------------------------------- money flow


async def side_by_escrow(conn: Connection, chain: str, address: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT deal_id, party, asset FROM deal_sides WHERE chain = $1 AND escrow_address = $2", chain, address
    )


async def upsert_deposit(
    conn: Connection,
    *,
    chain: str,
    txid: str,
    idx: int,
    deal_id: str,
    party: Party,
    address: str,
    asset: str,
    amount: int,
    block_number: int | None,
    block_hash: str | None,
    block_time: datetime | None,
) -> bool:
    """True when this is news (a new deposit, or one seen again in another block).

    Without a block (a report from a block replaced since) it is recorded only if it is not known yet."""
    mined_again = (
        """DO UPDATE SET block_number = EXCLUDED.block_number, block_hash = EXCLUDED.block_hash,
                         block_time = EXCLUDED.block_time
               WHERE deposits.block_hash IS DISTINCT FROM EXCLUDED.block_hash"""
        if block_hash is not None
        else "DO NOTHING"
    )
    row = await conn.fetchrow(
        f"""INSERT INTO deposits (chain, txid, idx, deal_id, party, address, asset, amount,
                                  block_number, block_hash, block_time)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            ON CONFLICT (chain, txid, idx) {mined_again}
            RETURNING 1""",
        chain,
        txid,
        idx,
        deal_id,
        party.value,
        address,
        asset,
        amount,
        block_number,
        block_hash,
        block_time,
    )
    return row is not None


# Chain events can arrive out of order: what a killed consumer (or a handler failing while the database restarts)
# left unacknowledged comes back up to ack_wait later, after newer events. A late report must not roll the engine's
# view of the chain back, so the tip only moves forward, except onto the new branch of a reorg that replaced it.


async def advance_tip(conn: Connection, chain: str, height: int, block_hash: str) -> range:
    """A tip report: ignored when older than the tip already recorded.

    Returns the heights the tip moved across (empty when it did not move forward)."""
    previous = await conn.fetchval("SELECT height FROM chain_tips WHERE chain = $1 FOR UPDATE", chain)
    if previous is not None and previous >= height:
        return range(0)
    await conn.execute(
        """INSERT INTO chain_tips (chain, height, hash) VALUES ($1, $2, $3)
           ON CONFLICT (chain) DO UPDATE SET height = EXCLUDED.height, hash = EXCLUDED.hash, updated_at = now()""",
        chain,
        height,
        block_hash,
    )
    return range(0 if previous is None else previous + 1, height + 1)


async def set_tip_after_reorg(
    conn: Connection, chain: str, height: int, block_hash: str, removed_hashes: Sequence[str]
) -> None:
    """A reorg's new tip: taken when the recorded tip is one of the replaced blocks or not above it (a late report
    of a reorg the engine has moved past since changes nothing)."""
    await conn.execute(
        """INSERT INTO chain_tips (chain, height, hash) VALUES ($1, $2, $3)
           ON CONFLICT (chain) DO UPDATE SET height = EXCLUDED.height, hash = EXCLUDED.hash, updated_at = now()
           WHERE chain_tips.height <= EXCLUDED.height OR chain_tips.hash = ANY($4::text[])""",
        chain,
        height,
        block_hash,
        list(removed_hashes),
    )


async def reorgs_taken(conn: Connection, chain: str) -> int:
    """How many of the chain's reorgs the engine has taken in (see migration 005)."""
    count = await conn.fetchval("SELECT reorgs FROM chain_tips WHERE chain = $1", chain)
    return 0 if count is None else int(count)


async def take_reorg(conn: Connection, chain: str, sequence: int, removed_hashes: Sequence[str]) -> None:
    """After `set_tip_after_reorg`: records a reorg's number and the blocks it replaced (see `replaced_since`)."""
    await conn.execute(
        "UPDATE chain_tips SET reorgs = greatest(reorgs, $2) WHERE chain = $1",
        chain,
        sequence,
    )
    await conn.execute(
        """INSERT INTO replaced_blocks (chain, hash, sequence) SELECT $1, unnest($2::text[]), $3
           ON CONFLICT (chain, hash) DO UPDATE SET sequence = greatest(replaced_blocks.sequence, EXCLUDED.sequence)""",
        chain,
        list(removed_hashes),
        sequence,
    )


async def replaced_since(conn: Connection, chain: str, block_hash: str, reorgs: int) -> bool:
    """True when a reorg the reporting watcher had not followed yet (`reorgs`: its count) replaced the block."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM replaced_blocks WHERE chain = $1 AND hash = $2 AND sequence > $3)",
            chain,
            block_hash,
            reorgs,
        )
    )


async def tips(conn: Connection) -> dict[str, int]:
    return {row["chain"]: row["height"] for row in await conn.fetch("SELECT chain, height FROM chain_tips")}


async def deals_maturing_at(conn: Connection, chain: str, tips: range, confirmations: int) -> list[str]:
    """Deals with a deposit on `chain` that reaches `confirmations` when the tip is one of `tips`.

    Only then does a tip change what the deal may do: a deposit counts once confirmed, and one
    that is not mined counts for nothing whatever the tip."""
    if not tips:
        return []
    rows = await conn.fetch(
        """SELECT DISTINCT d.deal_id FROM deposits d JOIN deals USING (deal_id)
           WHERE d.chain = $1 AND d.block_number BETWEEN $2 AND $3 AND deals.unwatched = false""",
        chain,
        tips.start - confirmations + 1,
        tips.stop - 1 - confirmations + 1,
    )
    return [row["deal_id"] for row in rows]


async def unmine_blocks(conn: Connection, chain: str, removed_hashes: Sequence[str]) -> list[str]:
    """Deposits recorded in the blocks a reorg replaced are unmined until a watcher sees them again.

    By block hash, not height: watchers publish deposits only from blocks they hold, and list all of those a reorg
    replaced. A late report of an old reorg then leaves alone the deposits seen again in the new branch since,
    which no watcher would report a second time: by height it would unmine them for good.
    """
    rows = await conn.fetch(
        """UPDATE deposits SET block_number = NULL, block_hash = NULL, block_time = NULL
           WHERE chain = $1 AND block_hash = ANY($2::text[]) RETURNING deal_id""",
        chain,
        list(removed_hashes),
    )
    return sorted({row["deal_id"] for row in rows})


async def halt_chain(conn: Connection, chain: str, reason: str) -> None:
    await conn.execute(
        "INSERT INTO chain_halts (chain, reason) VALUES ($1, $2) ON CONFLICT (chain) DO NOTHING", chain, reason
    )


async def halted_chains(conn: Connection) -> set[str]:
    return {row["chain"] for row in await conn.fetch("SELECT chain FROM chain_halts")}


async def facts_of(conn: Connection, deal_ids: list[str]) -> dict[str, dict[str, list[asyncpg.Record]]]:
    """The sides, deposits, transfers and gas fundings of several deals, four statements in all; each
    deal's rows in the order the single-deal reads below give them."""
    found: dict[str, dict[str, list[asyncpg.Record]]] = {
        deal_id: {"sides": [], "deposits": [], "transfers": [], "gas": []} for deal_id in deal_ids
    }
    for kind, query in (
        ("sides", "SELECT * FROM deal_sides WHERE deal_id = ANY($1::text[])"),
        (
            "deposits",
            "SELECT * FROM deposits WHERE deal_id = ANY($1::text[]) ORDER BY block_number NULLS LAST, first_seen",
        ),
        ("transfers", "SELECT * FROM transfers WHERE deal_id = ANY($1::text[]) ORDER BY created_at, phase"),
        ("gas", "SELECT * FROM gas_fundings WHERE deal_id = ANY($1::text[])"),
    ):
        for row in await conn.fetch(query, deal_ids):
            found[row["deal_id"]][kind].append(row)
    return found


async def deposits(conn: Connection, deal_id: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT * FROM deposits WHERE deal_id = $1 ORDER BY block_number NULLS LAST, first_seen", deal_id
        )
    )


async def transfers(conn: Connection, deal_id: str) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM transfers WHERE deal_id = $1 ORDER BY created_at, phase", deal_id))


async def gas_fundings(conn: Connection, deal_id: str) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM gas_fundings WHERE deal_id = $1", deal_id))


async def planned_transfers(conn: Connection, deal_id: str, halted: set[str]) -> list[asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM transfers WHERE deal_id = $1 AND status = 'PLANNED'", deal_id)
    return [row for row in rows if row["chain"] not in halted]


async def set_transfer_status(conn: Connection, transfer_id: str, status: str, **fields: Any) -> asyncpg.Record | None:
    """Moves a transfer forward; a result that arrives late never moves it back from CONFIRMED.

    Returns the deal and the transfer's status before, or None when nothing moved."""
    assignments = ["status = $2", "updated_at = now()"]
    values: list[Any] = [transfer_id, status]
    for column in ("txid", "confirmations", "amount_sent", "fee_paid", "reason"):
        if column in fields:
            values.append(fields[column])
            assignments.append(f"{column} = ${len(values)}")
    return await conn.fetchrow(
        f"""UPDATE transfers AS t SET {", ".join(assignments)}
            FROM (SELECT transfer_id, status FROM transfers WHERE transfer_id = $1 FOR UPDATE) AS before
            WHERE t.transfer_id = before.transfer_id AND t.status NOT IN ('CONFIRMED', 'SKIPPED')
            RETURNING t.deal_id, before.status AS previous""",
        *values,
    )


async def transfer_deal(conn: Connection, transfer_id: str) -> str | None:
    value = await conn.fetchval("SELECT deal_id FROM transfers WHERE transfer_id = $1", transfer_id)
    return None if value is None else str(value)


async def request_gas(
    conn: Connection, request_id: str, deal_id: str, party: Party, chain: str, escrow_address: str
) -> bool:
    row = await conn.fetchrow(
        """INSERT INTO gas_fundings (request_id, deal_id, party, chain, escrow_address) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (request_id) DO NOTHING RETURNING 1""",
        request_id,
        deal_id,
        party.value,
        chain,
        escrow_address,
    )
    return row is not None


async def gas_funded(conn: Connection, request_id: str, amount: int, txid: str) -> str | None:
    value = await conn.fetchval(
        """UPDATE gas_fundings SET status = 'FUNDED', amount = $2, txid = $3
           WHERE request_id = $1 AND status <> 'FUNDED' RETURNING deal_id""",
        request_id,
        amount,
        txid,
    )
    return None if value is None else str(value)


async def closed_deals_to_unwatch(conn: Connection, closed_before: datetime, limit: int) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            """SELECT deal_id FROM deals WHERE stage = 'CLOSED' AND unwatched = false AND closed_at < $1
               ORDER BY closed_at LIMIT $2 FOR UPDATE SKIP LOCKED""",
            closed_before,
            limit,
        )
    )


async def mark_unwatched(conn: Connection, deal_id: str) -> None:
    await conn.execute("UPDATE deals SET unwatched = true WHERE deal_id = $1", deal_id)


class PlannedTransfer(NamedTuple):
    """A transfer the ledger asked for, as it is stored (and, unless its chain is halted, commanded)."""

    transfer_id: str
    deal_id: str
    party: Party
    chain: str
    asset: str
    escrow_address: str
    escrow_index: int
    purpose: str
    to_address: str
    amount: int
    fee_from_amount: bool
    phase: int


class DealWrites:
    """What re-evaluating deals writes, stored with a statement per table when the caller is done with them all:
    a run of chain events re-evaluates up to a hundred deals, and a round trip per row cost more than the rules.
    Re-evaluating a deal reads only that deal's rows, read before, so nothing reads these before they are stored."""

    def __init__(self) -> None:
        self.funded: list[tuple[str, str, datetime]] = []
        #: Per deal, its last stage change (each replaces the one before; CLOSED is last).
        self.stages: dict[str, tuple[Transition, datetime]] = {}
        self.events: list[tuple[str, str, str, datetime]] = []
        self.transfers: list[tuple[PlannedTransfer, str]] = []
        self.commanded: list[str] = []

    def event(self, deal_id: str, type_: str, detail: dict[str, Any], at: datetime) -> None:
        self.events.append((deal_id, type_, msgspec.json.encode(detail).decode(), at))

    async def store(self, conn: Connection) -> None:
        if self.funded:
            await conn.execute(
                """UPDATE deal_sides AS s SET funded_at = u.at
                   FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(deal_id, party, at)
                   WHERE s.deal_id = u.deal_id AND s.party = u.party AND s.funded_at IS NULL""",
                [deal_id for deal_id, _, _ in self.funded],
                [party for _, party, _ in self.funded],
                [at for _, _, at in self.funded],
            )
        if self.stages:
            changes = list(self.stages.items())
            await conn.execute(
                """UPDATE deals AS d SET stage = u.stage, outcome = u.outcome, expires_at = u.expires_at,
                          remaining_ms = u.remaining_ms, updated_at = u.at,
                          closed_at = CASE WHEN u.stage = 'CLOSED' THEN u.at ELSE d.closed_at END
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[], $6::timestamptz[])
                        AS u(deal_id, stage, outcome, expires_at, remaining_ms, at)
                   WHERE d.deal_id = u.deal_id""",
                [deal_id for deal_id, _ in changes],
                [t.stage.value for _, (t, _) in changes],
                [t.outcome.value if t.outcome else None for _, (t, _) in changes],
                [t.expires_at for _, (t, _) in changes],
                [t.remaining_ms for _, (t, _) in changes],
                [at for _, (_, at) in changes],
            )
        if self.events:
            await conn.execute(
                """INSERT INTO deal_events (deal_id, type, detail, at)
                   SELECT deal_id, type, detail, at
                   FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::timestamptz[]) WITH ORDINALITY
                        AS u(deal_id, type, detail, at, n)
                   ORDER BY n""",
                [deal_id for deal_id, _, _, _ in self.events],
                [type_ for _, type_, _, _ in self.events],
                [detail for _, _, detail, _ in self.events],
                [at for _, _, _, at in self.events],
            )
        if self.transfers:
            rows = [row for row, _ in self.transfers]
            await conn.execute(
                """INSERT INTO transfers (transfer_id, deal_id, party, chain, asset, escrow_address, escrow_index,
                                          purpose, to_address, amount, fee_from_amount, phase, status)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                        $7::bigint[], $8::text[], $9::text[], $10::numeric[], $11::boolean[],
                                        $12::int[], $13::text[])""",
                [r.transfer_id for r in rows],
                [r.deal_id for r in rows],
                [r.party.value for r in rows],
                [r.chain for r in rows],
                [r.asset for r in rows],
                [r.escrow_address for r in rows],
                [r.escrow_index for r in rows],
                [r.purpose for r in rows],
                [r.to_address for r in rows],
                [r.amount for r in rows],
                [r.fee_from_amount for r in rows],
                [r.phase for r in rows],
                [status for _, status in self.transfers],
            )
        if self.commanded:
            await conn.execute(
                """UPDATE transfers SET status = 'COMMANDED', updated_at = now()
                   WHERE transfer_id = ANY($1::text[]) AND status = 'PLANNED'""",
                self.commanded,
            )
