"""All of the queue processor's SQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import asyncpg
import msgspec

from otc_common.db import Connection, Pool
from otc_common.messages import EscrowAssigned, Party, PartyDetailsFilled, PayoutCommand, TransferPurpose
from otc_queue.rules import Candidate, EscrowFact, Outflow, PartyFact, TransferOrder, TxPlan

# --------------------------------------------------------------------------- the deal's own copy


async def add_escrow(conn: Connection, msg: EscrowAssigned) -> asyncpg.Record | None:
    """Stores the escrow; returns the row already there when it differs (the first one stays)."""
    differing = await add_escrows(conn, [msg])
    return differing[0][1] if differing else None


async def add_escrows(conn: Connection, msgs: Sequence[EscrowAssigned]) -> list[tuple[EscrowAssigned, asyncpg.Record]]:
    """Stores a run's escrows with one statement, the first version of each standing; returns the messages that
    differ from the version that stands, each with it."""
    rows = await conn.fetch(
        """WITH incoming AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[])
                   WITH ORDINALITY AS u(chain, address, deal_id, party, asset, escrow_index, n)
           ), stored AS (
               INSERT INTO deal_escrows (chain, address, deal_id, party, asset, escrow_index)
               SELECT chain, address, deal_id, party, asset, escrow_index FROM incoming ORDER BY n
               ON CONFLICT (chain, address) DO NOTHING
               RETURNING chain, address, deal_id, party, asset, escrow_index
           )
           SELECT * FROM stored
           UNION ALL
           SELECT e.chain, e.address, e.deal_id, e.party, e.asset, e.escrow_index FROM deal_escrows e
           WHERE (e.chain, e.address) IN (SELECT chain, address FROM incoming)
             AND NOT EXISTS (SELECT FROM stored s WHERE s.chain = e.chain AND s.address = e.address)""",
        [m.chain for m in msgs],
        [m.address for m in msgs],
        [m.deal_id for m in msgs],
        [m.party.value for m in msgs],
        [m.asset for m in msgs],
        [m.escrow_index for m in msgs],
    )
    standing = {(row["chain"], row["address"]): row for row in rows}
    differing = []
    for msg in msgs:
        row = standing[(msg.chain, msg.address)]
        if (row["deal_id"], row["party"], row["asset"], row["escrow_index"]) != (
            msg.deal_id,
            msg.party.value,
            msg.asset,
            msg.escrow_index,
        ):
            differing.append((msg, row))
    return differing


async def add_party(conn: Connection, msg: PartyDetailsFilled) -> asyncpg.Record | None:
    """Party details are filled once; a different second version is returned, never stored.

    A version without addresses (from a producer older than the fields) decides nothing and is
    completed by the first one that has them.
    """
    differing = await add_parties(conn, [msg])
    return differing[0][1] if differing else None


async def add_parties(
    conn: Connection, msgs: Sequence[PartyDetailsFilled]
) -> list[tuple[PartyDetailsFilled, asyncpg.Record]]:
    """`add_party` for a run of details with one statement: the messages that differ from the version that stands,
    each with it."""
    chosen: dict[tuple[str, str], PartyDetailsFilled] = {}
    for msg in msgs:
        key = (msg.deal_id, msg.party.value)
        first = chosen.get(key)
        if first is None or (first.payback_address, first.recipient_address) == ("", ""):
            chosen[key] = msg
    items = list(chosen.values())
    rows = await conn.fetch(
        """WITH stored AS (
               INSERT INTO deal_parties (deal_id, party, payback_address, recipient_address)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
               ON CONFLICT (deal_id, party) DO UPDATE
                   SET payback_address = EXCLUDED.payback_address, recipient_address = EXCLUDED.recipient_address
                   WHERE deal_parties.payback_address = '' AND deal_parties.recipient_address = ''
               RETURNING deal_id, party, payback_address, recipient_address
           )
           SELECT * FROM stored
           UNION ALL
           SELECT p.deal_id, p.party, p.payback_address, p.recipient_address FROM deal_parties p
           WHERE (p.deal_id, p.party) IN (SELECT * FROM unnest($1::text[], $2::text[]))
             AND NOT EXISTS (SELECT FROM stored s WHERE s.deal_id = p.deal_id AND s.party = p.party)""",
        [m.deal_id for m in items],
        [m.party.value for m in items],
        [m.payback_address for m in items],
        [m.recipient_address for m in items],
    )
    standing = {(row["deal_id"], row["party"]): row for row in rows}
    differing = []
    for msg in msgs:
        row = standing[(msg.deal_id, msg.party.value)]
        incoming = (msg.payback_address, msg.recipient_address)
        if incoming not in (("", ""), (row["payback_address"], row["recipient_address"])):
            differing.append((msg, row))
    return differing


async def deal_facts(
    conn: Connection | Pool, chain: str, address: str
) -> tuple[EscrowFact | None, dict[Party, PartyFact]]:
    """The escrow at `address` and the parties of its deal, in one round trip."""
    rows = await conn.fetch(
        """SELECT e.deal_id, e.party AS escrow_party, e.asset, e.escrow_index,
                  p.party, p.payback_address, p.recipient_address
           FROM deal_escrows e LEFT JOIN deal_parties p ON p.deal_id = e.deal_id
           WHERE e.chain = $1 AND e.address = $2""",
        chain,
        address,
    )
    if not rows:
        return None, {}
    first = rows[0]
    escrow = EscrowFact(
        deal_id=first["deal_id"],
        party=Party(first["escrow_party"]),
        chain=chain,
        asset=first["asset"],
        address=address,
        escrow_index=first["escrow_index"],
    )
    parties = {
        Party(row["party"]): PartyFact(
            party=Party(row["party"]),
            payback_address=row["payback_address"],
            recipient_address=row["recipient_address"],
        )
        for row in rows
        if row["party"] is not None
    }
    return escrow, parties


async def open_senders_of_deals(conn: Connection | Pool, deal_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """The senders with queued transfers of each of the deals (deals without any are left out)."""
    rows = await conn.fetch(
        """SELECT DISTINCT deal_id, chain, escrow_address FROM transfers
           WHERE deal_id = ANY($1::text[]) AND status = 'QUEUED'""",
        deal_ids,
    )
    found: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        found.setdefault(row["deal_id"], []).append((row["chain"], row["escrow_address"]))
    return found


# --------------------------------------------------------------------------- transfers


def order_of(row: asyncpg.Record) -> TransferOrder:
    return TransferOrder(
        transfer_id=row["transfer_id"],
        deal_id=row["deal_id"],
        chain=row["chain"],
        asset=row["asset"],
        escrow_address=row["escrow_address"],
        escrow_index=row["escrow_index"],
        to=row["to_address"],
        amount=int(row["amount"]),
        purpose=TransferPurpose(row["purpose"]),
        fee_from_amount=row["fee_from_amount"],
    )


async def add_transfers(conn: Connection, commands: Sequence[tuple[PayoutCommand, datetime, datetime]]) -> set[str]:
    """Stores a run of commands, (command, commanded at, received at), in one statement: the ids of those that
    were new. A repeated transfer id changes nothing; of two commands with one id in the run, the first stands."""
    first: dict[str, tuple[PayoutCommand, datetime, datetime]] = {}
    for item in commands:
        first.setdefault(item[0].transfer_id, item)
    items = list(first.values())
    rows = await conn.fetch(
        """INSERT INTO transfers (transfer_id, deal_id, chain, asset, escrow_address, escrow_index, to_address,
                                  amount, purpose, fee_from_amount, phase, commanded_at, received_at)
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
                                $8::numeric[], $9::text[], $10::boolean[], $11::int[], $12::timestamptz[],
                                $13::timestamptz[])
           ON CONFLICT (transfer_id) DO NOTHING RETURNING transfer_id""",
        [cmd.transfer_id for cmd, _, _ in items],
        [cmd.deal_id for cmd, _, _ in items],
        [cmd.chain for cmd, _, _ in items],
        [cmd.asset for cmd, _, _ in items],
        [cmd.escrow_address for cmd, _, _ in items],
        [cmd.escrow_index for cmd, _, _ in items],
        [cmd.to for cmd, _, _ in items],
        [cmd.amount for cmd, _, _ in items],
        [cmd.purpose.value for cmd, _, _ in items],
        [cmd.fee_from_amount for cmd, _, _ in items],
        [cmd.phase for cmd, _, _ in items],
        [commanded for _, commanded, _ in items],
        [received for _, _, received in items],
    )
    return {row["transfer_id"] for row in rows}


async def transfer(conn: Connection | Pool, transfer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM transfers WHERE transfer_id = $1", transfer_id)


async def lock_transfer(conn: Connection, transfer_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM transfers WHERE transfer_id = $1 FOR UPDATE", transfer_id)


async def queued(conn: Connection | Pool, chain: str, sender: str, limit: int) -> list[asyncpg.Record]:
    """The sender's oldest transfers not signed yet, oldest first, at most `limit`: a sender's transfers are signed
    in arrival order."""
    return list(
        await conn.fetch(
            """SELECT * FROM transfers WHERE chain = $1 AND escrow_address = $2 AND status = 'QUEUED'
               ORDER BY received_at, transfer_id LIMIT $3""",
            chain,
            sender,
            limit,
        )
    )


async def fail(conn: Connection, transfer_id: str, reason: str, from_status: str) -> bool:
    done = await conn.fetchval(
        """UPDATE transfers SET status = 'FAILED', reason = $2, finished_at = now()
           WHERE transfer_id = $1 AND status = $3 RETURNING true""",
        transfer_id,
        reason,
        from_status,
    )
    return bool(done)


class SenderWork(NamedTuple):
    chain: str
    sender: str
    queued: bool
    in_flight: bool


async def senders_with_work(conn: Connection | Pool) -> list[SenderWork]:
    rows = await conn.fetch(
        """SELECT chain, escrow_address, bool_or(status = 'QUEUED') AS queued, bool_or(status = 'SIGNED') AS in_flight
           FROM transfers WHERE status IN ('QUEUED', 'SIGNED') GROUP BY chain, escrow_address"""
    )
    return [SenderWork(row["chain"], row["escrow_address"], row["queued"], row["in_flight"]) for row in rows]


async def oldest_open(conn: Connection | Pool) -> dict[str, float]:
    """Per chain, the age in seconds of the oldest transfer not yet confirmed or refused."""
    rows = await conn.fetch(
        """SELECT chain, extract(epoch FROM now() - min(received_at))::float8 AS age
           FROM transfers WHERE status IN ('QUEUED', 'SIGNED') GROUP BY chain"""
    )
    return {row["chain"]: float(row["age"]) for row in rows}


# --------------------------------------------------------------------------- nonces and candidates


async def lock_sender(conn: Connection, chain: str, sender: str) -> int:
    """The sender's next nonce, its row locked until the transaction ends (created on first use)."""
    value = await conn.fetchval(
        """INSERT INTO senders (chain, address) VALUES ($1, $2)
           ON CONFLICT (chain, address) DO UPDATE SET next_nonce = senders.next_nonce
           RETURNING next_nonce""",
        chain,
        sender,
    )
    return int(value)


async def outflows(conn: Connection, chain: str, sender: str, asset: str, exclude: str | None = None) -> list[Outflow]:
    """What the sender's signed, unconfirmed transfers can still take: each at its dearest candidate."""
    rows = await conn.fetch(
        """SELECT t.nonce, t.asset, t.amount, max(c.value + c.gas_limit * c.max_fee) AS native
           FROM transfers t JOIN candidates c USING (transfer_id)
           WHERE t.chain = $1 AND t.escrow_address = $2 AND t.status = 'SIGNED'
             AND t.transfer_id IS DISTINCT FROM $3
           GROUP BY t.transfer_id""",
        chain,
        sender,
        exclude,
    )
    return [_flow(row).against(asset) for row in rows]


class Flow(NamedTuple):
    """A signed, unconfirmed transfer's nonce, asset and amount, and the most native its candidates can take."""

    nonce: int
    asset: str
    amount: int
    native: int

    def against(self, asset: str) -> Outflow:
        # Token amounts count only against the same token (a native value is already in `native`).
        return Outflow(nonce=self.nonce, native=self.native, token=self.amount if self.asset == asset else 0)


async def lock_for_signing(
    conn: Connection, chain: str, sender: str, transfer_ids: Sequence[str]
) -> tuple[dict[str, str], list[Flow]]:
    """Inside the transaction holding the sender's row: the given transfers locked, with their status, and what
    the sender's signed, unconfirmed transfers can still take, in one statement."""
    rows = await conn.fetch(
        """WITH locked AS (
               SELECT transfer_id, status FROM transfers WHERE transfer_id = ANY($3::text[])
               ORDER BY transfer_id FOR UPDATE
           ), flows AS (
               SELECT t.nonce, t.asset, t.amount, max(c.value + c.gas_limit * c.max_fee) AS native
               FROM transfers t JOIN candidates c USING (transfer_id)
               WHERE t.chain = $1 AND t.escrow_address = $2 AND t.status = 'SIGNED'
               GROUP BY t.transfer_id
           )
           SELECT transfer_id, status, NULL::bigint AS nonce, NULL::text AS asset, NULL::numeric AS amount,
                  NULL::numeric AS native
           FROM locked
           UNION ALL
           SELECT NULL, NULL, nonce, asset, amount, native FROM flows""",
        chain,
        sender,
        list(transfer_ids),
    )
    statuses = {row["transfer_id"]: row["status"] for row in rows if row["transfer_id"] is not None}
    return statuses, [_flow(row) for row in rows if row["transfer_id"] is None]


def _flow(row: asyncpg.Record) -> Flow:
    return Flow(nonce=row["nonce"], asset=row["asset"], amount=int(row["amount"]), native=int(row["native"]))


async def add_candidate(
    conn: Connection, transfer_id: str, seq: int, txid: str, raw: bytes, plan: TxPlan, signed_at: datetime
) -> None:
    await conn.execute(
        """INSERT INTO candidates (txid, transfer_id, seq, raw, value, gas_limit, max_fee, priority_fee, signed_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        txid,
        transfer_id,
        seq,
        raw,
        plan.value,
        plan.gas_limit,
        plan.max_fee,
        plan.priority_fee,
        signed_at,
    )


class SignedRow(NamedTuple):
    """A transfer's first transaction, to be stored before it is broadcast."""

    transfer_id: str
    nonce: int
    txid: str
    raw: bytes
    plan: TxPlan


async def record_signed(conn: Connection, chain: str, sender: str, signed: Sequence[SignedRow], at: datetime) -> None:
    """A run of a sender's first candidates, their transfers' nonces and the sender's next one, in one statement
    (the run is in nonce order)."""
    await conn.execute(
        """WITH candidate AS (
               INSERT INTO candidates (txid, transfer_id, seq, raw, value, gas_limit, max_fee, priority_fee, signed_at)
               SELECT u.txid, u.transfer_id, 0, u.raw, u.value, u.gas_limit, u.max_fee, u.priority_fee, $3
               FROM unnest($4::text[], $5::text[], $6::bytea[], $7::numeric[], $8::bigint[], $9::numeric[],
                           $10::numeric[]) AS u(transfer_id, txid, raw, value, gas_limit, max_fee, priority_fee)
           ), signed AS (
               UPDATE transfers AS t SET status = 'SIGNED', nonce = u.nonce, signed_at = $3
               FROM unnest($4::text[], $11::bigint[]) AS u(transfer_id, nonce) WHERE t.transfer_id = u.transfer_id
           )
           UPDATE senders SET next_nonce = $12 WHERE chain = $1 AND address = $2""",
        chain,
        sender,
        at,
        [s.transfer_id for s in signed],
        [s.txid for s in signed],
        [s.raw for s in signed],
        [s.plan.value for s in signed],
        [s.plan.gas_limit for s in signed],
        [s.plan.max_fee for s in signed],
        [s.plan.priority_fee for s in signed],
        [s.nonce for s in signed],
        max(s.nonce for s in signed) + 1,
    )


class StoredCandidate(msgspec.Struct, frozen=True, kw_only=True):
    txid: str
    seq: int
    raw: bytes
    plan: TxPlan
    signed_at: datetime
    mined_block: int | None
    mined_hash: str | None = None

    def view(self) -> Candidate:
        return Candidate(
            txid=self.txid, seq=self.seq, signed_at=self.signed_at.timestamp(), was_mined=self.mined_block is not None
        )


class InFlight(msgspec.Struct, frozen=True, kw_only=True):
    row: asyncpg.Record
    candidates: list[StoredCandidate]

    @property
    def order(self) -> TransferOrder:
        return order_of(self.row)

    @property
    def nonce(self) -> int:
        return int(self.row["nonce"])

    @property
    def newest(self) -> StoredCandidate:
        return self.candidates[-1]


def _candidate(row: asyncpg.Record) -> StoredCandidate:
    return StoredCandidate(
        txid=row["txid"],
        seq=row["seq"],
        raw=bytes(row["raw"]),
        plan=TxPlan(
            value=int(row["value"]),
            gas_limit=row["gas_limit"],
            max_fee=int(row["max_fee"]),
            priority_fee=int(row["priority_fee"]),
        ),
        signed_at=row["signed_at"],
        mined_block=row["mined_block"],
        mined_hash=row["mined_hash"],
    )


async def candidates(conn: Connection | Pool, transfer_id: str) -> list[StoredCandidate]:
    rows = await conn.fetch("SELECT * FROM candidates WHERE transfer_id = $1 ORDER BY seq", transfer_id)
    return [_candidate(row) for row in rows]


async def in_flight(conn: Connection | Pool, chain: str, sender: str) -> list[InFlight]:
    """The sender's signed, unconfirmed transfers in nonce order, each with its candidates."""
    rows = await conn.fetch(
        """SELECT * FROM transfers WHERE chain = $1 AND escrow_address = $2 AND status = 'SIGNED'
           ORDER BY nonce""",
        chain,
        sender,
    )
    if not rows:
        return []
    found = await conn.fetch(
        "SELECT * FROM candidates WHERE transfer_id = ANY($1::text[]) ORDER BY seq",
        [row["transfer_id"] for row in rows],
    )
    by_transfer: dict[str, list[StoredCandidate]] = {}
    for row in found:
        by_transfer.setdefault(row["transfer_id"], []).append(_candidate(row))
    return [InFlight(row=row, candidates=by_transfer.get(row["transfer_id"], [])) for row in rows]


#: What a confirmation needs of the candidate it is about and of that candidate's transfer.
_OWNER_COLUMNS = """c.transfer_id, c.mined_block, c.mined_hash, c.value, c.signed_at, t.deal_id, t.chain,
                    t.escrow_address, t.status, t.asset, t.amount"""


async def candidate_owner(conn: Connection, chain: str, txid: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""SELECT {_OWNER_COLUMNS} FROM candidates c JOIN transfers t USING (transfer_id)
            WHERE c.txid = $1 AND t.chain = $2""",
        txid,
        chain,
    )


async def candidate_owners(conn: Connection, chain: str, txids: list[str]) -> dict[str, asyncpg.Record]:
    """`candidate_owner` of several transactions at once, by txid."""
    rows = await conn.fetch(
        f"""SELECT c.txid, {_OWNER_COLUMNS} FROM candidates c JOIN transfers t USING (transfer_id)
            WHERE c.txid = ANY($1::text[]) AND t.chain = $2""",
        txids,
        chain,
    )
    return {row["txid"]: row for row in rows}


async def note_mined(conn: Connection, txid: str, block_number: int | None, block_hash: str | None) -> None:
    await conn.execute(
        "UPDATE candidates SET mined_block = $2, mined_hash = $3 WHERE txid = $1", txid, block_number, block_hash
    )


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a signed transfer stands on its way to the threshold, as its chain's watcher reported it."""

    transfer_id: str
    txid: str
    block_number: int
    confirmations: int


async def lock_transfers(conn: Connection, transfer_ids: Sequence[str]) -> None:
    """Locks transfer rows in id order: transactions that update several at once never deadlock on each other."""
    await conn.execute(
        "SELECT FROM transfers WHERE transfer_id = ANY($1::text[]) ORDER BY transfer_id FOR UPDATE",
        sorted(set(transfer_ids)),
    )


async def set_standings(conn: Connection, standings: Sequence[Standing], *, locked: bool = False) -> set[str]:
    """`set_standing` for several transfers: the ids whose standing changed. The rows are locked in id order first
    (`lock_transfers`), unless the caller has (`locked`)."""
    if not locked:
        await lock_transfers(conn, [s.transfer_id for s in standings])
    rows = await conn.fetch(
        """UPDATE transfers AS t SET txid = u.txid, block_number = u.block_number, confirmations = u.confirmations
           FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[])
                AS u(transfer_id, txid, block_number, confirmations)
           WHERE t.transfer_id = u.transfer_id AND t.status = 'SIGNED'
             AND (t.txid IS DISTINCT FROM u.txid OR t.block_number IS DISTINCT FROM u.block_number
                  OR t.confirmations <> u.confirmations)
           RETURNING t.transfer_id""",
        [s.transfer_id for s in standings],
        [s.txid for s in standings],
        [s.block_number for s in standings],
        [s.confirmations for s in standings],
    )
    return {row["transfer_id"] for row in rows}


async def note_mined_many(conn: Connection, mined: Mapping[str, tuple[int, str | None]]) -> None:
    """`note_mined` for several candidates (txid: block number, block hash) in one statement."""
    await conn.execute(
        """UPDATE candidates AS c SET mined_block = u.block_number, mined_hash = u.block_hash
           FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(txid, block_number, block_hash)
           WHERE c.txid = u.txid""",
        list(mined),
        [number for number, _ in mined.values()],
        [block_hash for _, block_hash in mined.values()],
    )


async def set_standing(
    conn: Connection, transfer_id: str, txid: str | None, block_number: int | None, confirmations: int
) -> bool:
    """Records where the transfer stands; False when that is what was already recorded."""
    changed = await conn.fetchval(
        """UPDATE transfers SET txid = $2, block_number = $3, confirmations = $4
           WHERE transfer_id = $1 AND status = 'SIGNED'
             AND (txid IS DISTINCT FROM $2 OR block_number IS DISTINCT FROM $3 OR confirmations <> $4)
           RETURNING true""",
        transfer_id,
        txid,
        block_number,
        confirmations,
    )
    return bool(changed)


class Outcome(NamedTuple):
    """A transfer's mined candidate at the threshold: what was sent and what it cost, or why it failed."""

    transfer_id: str
    txid: str
    block_number: int
    confirmations: int
    amount_sent: int
    fee_paid: int
    success: bool
    reason: str | None


async def confirm(conn: Connection, outcome: Outcome) -> bool:
    return outcome.transfer_id in await confirm_many(conn, [outcome])


async def confirm_many(conn: Connection, outcomes: Sequence[Outcome], *, locked: bool = False) -> set[str]:
    """Records signed transfers as done (CONFIRMED, or FAILED when reverted): the ids that were still SIGNED. Several
    are locked in id order first (`lock_transfers`), unless the caller has (`locked`)."""
    if len(outcomes) > 1 and not locked:
        await lock_transfers(conn, [o.transfer_id for o in outcomes])
    rows = await conn.fetch(
        """UPDATE transfers AS t SET status = u.status, txid = u.txid, block_number = u.block_number,
                  confirmations = u.confirmations, amount_sent = u.amount_sent, fee_paid = u.fee_paid,
                  reason = u.reason, finished_at = now()
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::numeric[], $7::numeric[],
                       $8::text[])
                AS u(transfer_id, status, txid, block_number, confirmations, amount_sent, fee_paid, reason)
           WHERE t.transfer_id = u.transfer_id AND t.status = 'SIGNED'
           RETURNING t.transfer_id""",
        [o.transfer_id for o in outcomes],
        ["CONFIRMED" if o.success else "FAILED" for o in outcomes],
        [o.txid for o in outcomes],
        [o.block_number for o in outcomes],
        [o.confirmations for o in outcomes],
        [o.amount_sent for o in outcomes],
        [o.fee_paid for o in outcomes],
        [o.reason for o in outcomes],
    )
    return {row["transfer_id"] for row in rows}


async def candidate_ids(conn: Connection, transfer_id: str) -> Sequence[str]:
    rows = await conn.fetch("SELECT txid FROM candidates WHERE transfer_id = $1 ORDER BY seq", transfer_id)
    return [row["txid"] for row in rows]
