"""The SQL of UTXO transfers: reserved escrow outputs and the signed candidates of each leg.

The transfers themselves (status, standing, confirmation) live in `transfers` and are written with
the functions of `store`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import asyncpg
import msgspec

from otc_common.db import Connection, Pool
from otc_queue.rules import Candidate, TransferOrder
from otc_queue.store import order_of
from otc_queue.utxo_rules import Coin, Leg
from otc_queue.utxo_tx import SignedTx


class UtxoCandidate(msgspec.Struct, frozen=True, kw_only=True):
    txid: str
    seq: int
    raw: bytes
    vsize: int
    to_value: int
    change: int
    fee: int
    signed_at: datetime
    mined_block: int | None

    def view(self) -> Candidate:
        return Candidate(
            txid=self.txid, seq=self.seq, signed_at=self.signed_at.timestamp(), was_mined=self.mined_block is not None
        )


class StoredLeg(msgspec.Struct, frozen=True, kw_only=True):
    leg: int
    coin: Coin
    candidates: list[UtxoCandidate]

    @property
    def newest(self) -> UtxoCandidate:
        return self.candidates[-1]

    def plan_of(self, candidate: UtxoCandidate) -> Leg:
        return Leg(coin=self.coin, to_value=candidate.to_value, change=candidate.change, fee=candidate.fee)


class UtxoFlight(msgspec.Struct, frozen=True, kw_only=True):
    """A signed, unconfirmed UTXO transfer with its legs in order."""

    row: asyncpg.Record
    legs: list[StoredLeg]

    @property
    def order(self) -> TransferOrder:
        return order_of(self.row)

    @property
    def txids(self) -> list[str]:
        return [c.txid for leg in self.legs for c in leg.candidates]


async def reserved(conn: Connection, chain: str, escrow: str) -> set[tuple[str, int]]:
    rows = await conn.fetch(
        "SELECT txid, vout FROM utxo_reservations WHERE chain = $1 AND escrow_address = $2", chain, escrow
    )
    return {(row["txid"], row["vout"]) for row in rows}


async def record_signed(
    conn: Connection, order: TransferOrder, legs: Sequence[Leg], signed: Sequence[SignedTx], at: datetime
) -> None:
    """A transfer's first transactions, one per leg, in one statement: the outputs they spend claimed (a primary-key
    violation if another transfer holds one), the transactions stored, the transfer marked signed."""
    await conn.execute(
        """WITH claimed AS (
               INSERT INTO utxo_reservations (chain, txid, vout, escrow_address, transfer_id, leg, value, height,
                                              reserved_at)
               SELECT $1, u.txid, u.vout, $2, $3, u.leg, u.value, u.height, $4
               FROM unnest($5::text[], $6::int[], $7::int[], $8::numeric[], $9::bigint[])
                    AS u(txid, vout, leg, value, height)
           ), stored AS (
               INSERT INTO utxo_candidates (txid, transfer_id, leg, seq, raw, vsize, to_value, change, fee, signed_at)
               SELECT u.txid, $3, u.leg, 0, u.raw, u.vsize, u.to_value, u.change, u.fee, $4
               FROM unnest($10::text[], $7::int[], $11::bytea[], $12::int[], $13::numeric[], $14::numeric[],
                           $15::numeric[]) AS u(txid, leg, raw, vsize, to_value, change, fee)
           )
           UPDATE transfers SET status = 'SIGNED', signed_at = $4 WHERE transfer_id = $3 AND status = 'QUEUED'""",
        order.chain,
        order.escrow_address,
        order.transfer_id,
        at,
        [leg.coin.txid for leg in legs],
        [leg.coin.vout for leg in legs],
        list(range(len(legs))),
        [leg.coin.value for leg in legs],
        [leg.coin.height for leg in legs],
        [tx.txid for tx in signed],
        [tx.raw for tx in signed],
        [tx.vsize for tx in signed],
        [leg.to_value for leg in legs],
        [leg.change for leg in legs],
        [leg.fee for leg in legs],
    )


async def add_candidate(
    conn: Connection, transfer_id: str, leg_index: int, seq: int, signed: SignedTx, leg: Leg, at: datetime
) -> None:
    await conn.execute(
        """INSERT INTO utxo_candidates (txid, transfer_id, leg, seq, raw, vsize, to_value, change, fee, signed_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
        signed.txid,
        transfer_id,
        leg_index,
        seq,
        signed.raw,
        signed.vsize,
        leg.to_value,
        leg.change,
        leg.fee,
        at,
    )


def _candidate(row: asyncpg.Record) -> UtxoCandidate:
    return UtxoCandidate(
        txid=row["txid"],
        seq=row["seq"],
        raw=bytes(row["raw"]),
        vsize=row["vsize"],
        to_value=int(row["to_value"]),
        change=int(row["change"]),
        fee=int(row["fee"]),
        signed_at=row["signed_at"],
        mined_block=row["mined_block"],
    )


async def _legs(conn: Connection | Pool, transfer_ids: Sequence[str]) -> dict[str, list[StoredLeg]]:
    reservations = await conn.fetch(
        "SELECT * FROM utxo_reservations WHERE transfer_id = ANY($1::text[]) ORDER BY transfer_id, leg",
        list(transfer_ids),
    )
    found = await conn.fetch(
        "SELECT * FROM utxo_candidates WHERE transfer_id = ANY($1::text[]) ORDER BY transfer_id, leg, seq",
        list(transfer_ids),
    )
    by_leg: dict[tuple[str, int], list[UtxoCandidate]] = {}
    for row in found:
        by_leg.setdefault((row["transfer_id"], row["leg"]), []).append(_candidate(row))
    legs: dict[str, list[StoredLeg]] = {}
    for row in reservations:
        coin = Coin(txid=row["txid"], vout=row["vout"], value=int(row["value"]), height=row["height"])
        candidates = by_leg.get((row["transfer_id"], row["leg"]), [])
        if candidates:
            legs.setdefault(row["transfer_id"], []).append(StoredLeg(leg=row["leg"], coin=coin, candidates=candidates))
    return legs


async def in_flight(conn: Connection | Pool, chain: str, escrow: str) -> list[UtxoFlight]:
    """The escrow's signed, unconfirmed transfers in signing order, each with its legs."""
    rows = await conn.fetch(
        """SELECT * FROM transfers WHERE chain = $1 AND escrow_address = $2 AND status = 'SIGNED'
           ORDER BY signed_at, transfer_id""",
        chain,
        escrow,
    )
    if not rows:
        return []
    legs = await _legs(conn, [row["transfer_id"] for row in rows])
    return [UtxoFlight(row=row, legs=legs.get(row["transfer_id"], [])) for row in rows]


async def flight(conn: Connection, transfer_id: str) -> UtxoFlight | None:
    """One transfer with its legs, as stored now (call with the transfer's row locked)."""
    row = await conn.fetchrow("SELECT * FROM transfers WHERE transfer_id = $1", transfer_id)
    if row is None:
        return None
    legs = await _legs(conn, [transfer_id])
    return UtxoFlight(row=row, legs=legs.get(transfer_id, []))


#: What a confirmation needs of the candidate it is about and of that candidate's transfer (`legs`: how many
#: transactions the transfer is).
_OWNER_COLUMNS = """c.transfer_id, c.mined_block, c.mined_hash, c.to_value, c.fee, c.signed_at, t.deal_id, t.chain,
                    t.escrow_address, t.status,
                    (SELECT count(*) FROM utxo_reservations r WHERE r.transfer_id = c.transfer_id) AS legs"""


async def candidate_owner(conn: Connection, chain: str, txid: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""SELECT {_OWNER_COLUMNS} FROM utxo_candidates c JOIN transfers t USING (transfer_id)
            WHERE c.txid = $1 AND t.chain = $2""",
        txid,
        chain,
    )


async def candidate_owners(conn: Connection, chain: str, txids: list[str]) -> dict[str, asyncpg.Record]:
    """`candidate_owner` of several transactions at once, by txid."""
    rows = await conn.fetch(
        f"""SELECT c.txid, {_OWNER_COLUMNS} FROM utxo_candidates c JOIN transfers t USING (transfer_id)
            WHERE c.txid = ANY($1::text[]) AND t.chain = $2""",
        txids,
        chain,
    )
    return {row["txid"]: row for row in rows}


async def note_mined(conn: Connection, txid: str, block_number: int | None, block_hash: str | None) -> None:
    """Where a candidate was seen mined; a hash already known for the same height is kept."""
    await conn.execute(
        """UPDATE utxo_candidates
           SET mined_hash = CASE WHEN mined_block IS NOT DISTINCT FROM $2 THEN coalesce($3, mined_hash) ELSE $3 END,
               mined_block = $2
           WHERE txid = $1""",
        txid,
        block_number,
        block_hash,
    )


async def note_mined_many(conn: Connection, mined: Mapping[str, tuple[int, str | None]]) -> None:
    """`note_mined` for several candidates (txid: block number, block hash) in one statement."""
    await conn.execute(
        """UPDATE utxo_candidates AS c
           SET mined_hash = CASE WHEN c.mined_block IS NOT DISTINCT FROM u.block_number
                                 THEN coalesce(u.block_hash, c.mined_hash) ELSE u.block_hash END,
               mined_block = u.block_number
           FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(txid, block_number, block_hash)
           WHERE c.txid = u.txid""",
        list(mined),
        [number for number, _ in mined.values()],
        [block_hash for _, block_hash in mined.values()],
    )
