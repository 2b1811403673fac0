"""All of the tank's SQL."""

from __future__ import annotations

import asyncpg

from otc_common.db import Connection
from otc_common.messages import GasFundingRequest
from otc_tank.rules import FUNDING_TX_GAS, next_nonce

#: LISTEN/NOTIFY channel that wakes a chain's worker once a request has committed.
REQUESTS_CHANNEL = "tank_requests"


async def upsert_wallet(conn: Connection, chain: str, address: str) -> None:
    # A different address means a different key: its nonces start over (the chain's count still applies).
    await conn.execute(
        """INSERT INTO wallets (chain, address) VALUES ($1, $2)
           ON CONFLICT (chain) DO UPDATE SET
               address = excluded.address,
               next_nonce = CASE WHEN wallets.address = excluded.address THEN wallets.next_nonce ELSE 0 END,
               low = CASE WHEN wallets.address = excluded.address THEN wallets.low ELSE false END""",
        chain,
        address,
    )


async def insert_request(
    conn: Connection, request: GasFundingRequest, escrow_address: str, status: str, reason: str | None
) -> bool:
    """Records a request once per request_id; False when it was already known."""
    inserted = await conn.fetchval(
        """INSERT INTO fundings (request_id, deal_id, chain, escrow_address, transfers, gas_per_transfer,
                                 status, reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (request_id) DO NOTHING RETURNING true""",
        request.request_id,
        request.deal_id,
        request.chain,
        escrow_address,
        request.transfers,
        request.gas_per_transfer,
        status,
        reason,
    )
    return bool(inserted)


async def notify_request(conn: Connection, chain: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", REQUESTS_CHANNEL, chain)


async def waiting(conn: Connection, chain: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT * FROM fundings WHERE chain = $1 AND status = 'WAITING' ORDER BY received_at, request_id",
            chain,
        )
    )


async def in_flight(conn: Connection, chain: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            """SELECT request_id, deal_id, escrow_address, amount, nonce, tx_hash, raw_tx, block_number, block_hash,
                      confirmations, broadcasts, last_error,
                      EXTRACT(EPOCH FROM now() - last_broadcast_at)::float8 AS since_last
               FROM fundings WHERE chain = $1 AND status = 'SIGNED' ORDER BY nonce""",
            chain,
        )
    )


async def reserved(conn: Connection, chain: str) -> int:
    """What signed fundings not yet seen in a block can still take from the tank."""
    value = await conn.fetchval(
        """SELECT COALESCE(SUM(amount + $2 * max_fee_per_gas), 0) FROM fundings
           WHERE chain = $1 AND status = 'SIGNED' AND block_number IS NULL""",
        chain,
        FUNDING_TX_GAS,
    )
    return int(value)


async def lock_waiting(conn: Connection, request_id: str) -> bool:
    """Takes a waiting request for this transaction; False if another worker has it or it moved on."""
    found = await conn.fetchval(
        "SELECT true FROM fundings WHERE request_id = $1 AND status = 'WAITING' FOR UPDATE SKIP LOCKED",
        request_id,
    )
    return bool(found)


async def take_nonce(conn: Connection, chain: str, chain_count: int) -> int:
    """The next nonce of the chain's tank, advanced in the caller's transaction (the row stays locked)."""
    stored = await conn.fetchval("SELECT next_nonce FROM wallets WHERE chain = $1 FOR UPDATE", chain)
    if stored is None:
        raise LookupError(f"no tank wallet recorded for chain {chain}")
    nonce = next_nonce(int(stored), chain_count)
    await conn.execute("UPDATE wallets SET next_nonce = $2 WHERE chain = $1", chain, nonce + 1)
    return nonce


async def mark_signed(
    conn: Connection,
    request_id: str,
    *,
    base_fee: int,
    priority_fee: int,
    escrow_balance: int,
    needed: int,
    amount: int,
    max_fee_per_gas: int,
    nonce: int,
    raw_tx: bytes,
    tx_hash: str,
) -> None:
    await conn.execute(
        """UPDATE fundings SET status = 'SIGNED', base_fee = $2, priority_fee = $3, escrow_balance = $4,
                  needed = $5, amount = $6, max_fee_per_gas = $7, nonce = $8, raw_tx = $9, tx_hash = $10,
                  signed_at = now(), reason = NULL
           WHERE request_id = $1 AND status = 'WAITING'""",
        request_id,
        base_fee,
        priority_fee,
        escrow_balance,
        needed,
        amount,
        max_fee_per_gas,
        nonce,
        raw_tx,
        tx_hash,
    )


async def mark_not_needed(
    conn: Connection, request_id: str, *, base_fee: int, priority_fee: int, escrow_balance: int, needed: int
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """UPDATE fundings SET status = 'FUNDED', base_fee = $2, priority_fee = $3, escrow_balance = $4,
                  needed = $5, amount = 0, funded_at = now(), reason = NULL
           WHERE request_id = $1 AND status = 'WAITING' RETURNING *""",
        request_id,
        base_fee,
        priority_fee,
        escrow_balance,
        needed,
    )


async def note_waiting(conn: Connection, request_id: str, reason: str) -> None:
    await conn.execute(
        "UPDATE fundings SET reason = $2 WHERE request_id = $1 AND status = 'WAITING'", request_id, reason
    )


async def record_broadcast(conn: Connection, request_id: str, error: str | None) -> None:
    await conn.execute(
        """UPDATE fundings SET broadcasts = broadcasts + 1, last_broadcast_at = now(), last_error = $2
           WHERE request_id = $1""",
        request_id,
        error,
    )


async def record_block(
    conn: Connection, request_id: str, block_number: int | None, block_hash: str | None, confirmations: int
) -> None:
    await conn.execute(
        """UPDATE fundings SET block_number = $2, block_hash = $3, confirmations = $4
           WHERE request_id = $1 AND status = 'SIGNED'""",
        request_id,
        block_number,
        block_hash,
        confirmations,
    )


async def mark_funded(
    conn: Connection, request_id: str, block_number: int, block_hash: str, confirmations: int
) -> asyncpg.Record | None:
    """Moves a signed funding to FUNDED once; None if another worker did it first."""
    return await conn.fetchrow(
        """UPDATE fundings SET status = 'FUNDED', block_number = $2, block_hash = $3, confirmations = $4,
                  funded_at = now()
           WHERE request_id = $1 AND status = 'SIGNED' RETURNING *""",
        request_id,
        block_number,
        block_hash,
        confirmations,
    )


async def mark_reverted(conn: Connection, request_id: str, block_number: int, block_hash: str) -> bool:
    done = await conn.fetchval(
        """UPDATE fundings SET status = 'REVERTED', block_number = $2, block_hash = $3,
                  reason = 'the funding transaction reverted'
           WHERE request_id = $1 AND status = 'SIGNED' RETURNING true""",
        request_id,
        block_number,
        block_hash,
    )
    return bool(done)


async def lock_wallet(conn: Connection, chain: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM wallets WHERE chain = $1 FOR UPDATE", chain)


async def record_balance(conn: Connection, chain: str, balance: int, low: bool, low_crossings: int) -> None:
    await conn.execute(
        """UPDATE wallets SET balance = $2, balance_at = now(), low = $3, low_crossings = $4
           WHERE chain = $1""",
        chain,
        balance,
        low,
        low_crossings,
    )
