"""All SQL of notifications and webhooks. Connections must have the engine schema on their search_path
(the engine's pool does; a tool uses `otc_common.db.create_pool(url, "engine")`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from otc_common.db import Connection, Pool

# --------------------------------------------------------------------------- deal facts


async def deal_for_notice(conn: Connection, deal_id: str) -> tuple[asyncpg.Record | None, list[asyncpg.Record]]:
    deal = await conn.fetchrow("SELECT deal_id, name, stage FROM deals WHERE deal_id = $1", deal_id)
    sides = await conn.fetch(
        """SELECT party, chain, asset, amount, email, payback_address, recipient_address
           FROM deal_sides WHERE deal_id = $1""",
        deal_id,
    )
    return deal, list(sides)


# --------------------------------------------------------------------------- e-mails


async def add_email(
    conn: Connection,
    *,
    event_id: str,
    recipient: str,
    deal_id: str,
    party: str,
    kind: str,
    subject: str,
    body: str,
) -> bool:
    inserted = await conn.fetchval(
        """INSERT INTO email_outbox (event_id, recipient, deal_id, party, kind, subject, body)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (event_id, recipient) DO NOTHING RETURNING true""",
        event_id,
        recipient,
        deal_id,
        party,
        kind,
        subject,
        body,
    )
    return bool(inserted)


async def claim_emails(pool: Pool, limit: int, lease_seconds: float) -> list[asyncpg.Record]:
    """Due rows, each counted as one attempt and kept from other senders for `lease_seconds`, far
    longer than one attempt may take: a sender that dies mid-attempt leaves the row to be retried."""
    return list(
        await pool.fetch(
            """UPDATE email_outbox SET attempts = attempts + 1,
                      next_attempt_at = now() + make_interval(secs => $2)
               WHERE id IN (SELECT id FROM email_outbox
                            WHERE status = 'PENDING' AND next_attempt_at <= now()
                            ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
               RETURNING id, event_id, recipient, deal_id, kind, subject, body, attempts""",
            limit,
            lease_seconds,
        )
    )


async def email_sent(pool: Pool, row_id: int, attempt: int) -> None:
    await pool.execute(
        "UPDATE email_outbox SET status = 'SENT', sent_at = now(), last_error = NULL WHERE id = $1 AND attempts = $2",
        row_id,
        attempt,
    )


async def email_failed(pool: Pool, row_id: int, attempt: int, error: str, retry_in: float | None) -> None:
    """retry_in None: given up for good."""
    await pool.execute(
        """UPDATE email_outbox SET last_error = $3,
                  status = CASE WHEN $4::float8 IS NULL THEN 'FAILED' ELSE 'PENDING' END,
                  next_attempt_at = CASE WHEN $4::float8 IS NULL THEN next_attempt_at
                                         ELSE now() + make_interval(secs => $4::float8) END
           WHERE id = $1 AND attempts = $2""",
        row_id,
        attempt,
        error[:500],
        retry_in,
    )


# --------------------------------------------------------------------------- invitations


async def recent_invites(conn: Connection, deal_id: str, since: datetime) -> int:
    value = await conn.fetchval("SELECT count(*) FROM invites WHERE deal_id = $1 AND created_at >= $2", deal_id, since)
    return int(value)


async def add_invite(conn: Connection, invite_id: str, deal_id: str, party: str, recipient: str) -> None:
    await conn.execute(
        "INSERT INTO invites (invite_id, deal_id, party, recipient, status) VALUES ($1, $2, $3, $4, 'SENDING')",
        invite_id,
        deal_id,
        party,
        recipient,
    )


async def invite_sent(pool: Pool, invite_id: str, deal_id: str, party: str, recipient: str) -> None:
    """The invited address becomes the party's contact until the party fills its details: what it gives
    then, or leaves out, replaces it."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE invites SET status = 'SENT', sent_at = now() WHERE invite_id = $1", invite_id)
        await conn.execute(
            """UPDATE deal_sides SET email = $3
               WHERE deal_id = $1 AND party = $2 AND email IS NULL AND filled_at IS NULL""",
            deal_id,
            party,
            recipient,
        )


async def invite_failed(pool: Pool, invite_id: str, error: str) -> None:
    await pool.execute("UPDATE invites SET status = 'FAILED', error = $2 WHERE invite_id = $1", invite_id, error[:500])


# --------------------------------------------------------------------------- webhooks


async def add_deliveries(
    conn: Connection,
    *,
    event_id: str,
    urls: list[str],
    event_type: str,
    deal_id: str | None,
    occurred_at: datetime,
    body: bytes,
) -> None:
    await conn.executemany(
        """INSERT INTO webhook_deliveries (event_id, url, event_type, deal_id, occurred_at, body)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id, url) DO NOTHING""",
        [(event_id, url, event_type, deal_id, occurred_at, body) for url in urls],
    )


async def claim_deliveries(pool: Pool, limit: int, lease_seconds: float) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            """UPDATE webhook_deliveries SET attempts = attempts + 1,
                      next_attempt_at = now() + make_interval(secs => $2)
               WHERE id IN (SELECT id FROM webhook_deliveries
                            WHERE status = 'PENDING' AND next_attempt_at <= now()
                            ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
               RETURNING id, event_id, url, event_type, body, attempts, round_start""",
            limit,
            lease_seconds,
        )
    )


async def record_attempt(
    pool: Pool,
    *,
    delivery_id: int,
    attempt: int,
    round_start: int,
    http_status: int | None,
    error: str | None,
    duration_ms: int,
    outcome: str,
    retry_in: float | None,
) -> None:
    """outcome: DELIVERED, PENDING (retry after `retry_in` seconds) or FAILED (given up).

    The row is updated only if no other claim or manual redelivery happened meanwhile."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO webhook_attempts (delivery_id, attempt, http_status, error, duration_ms)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            delivery_id,
            attempt,
            http_status,
            error[:500] if error else None,
            duration_ms,
        )
        await conn.execute(
            """UPDATE webhook_deliveries SET status = $3, last_status = $4, last_error = $5,
                      delivered_at = CASE WHEN $3 = 'DELIVERED' THEN now() ELSE delivered_at END,
                      next_attempt_at = CASE WHEN $6::float8 IS NULL THEN next_attempt_at
                                             ELSE now() + make_interval(secs => $6::float8) END
               WHERE id = $1 AND attempts = $2 AND round_start = $7""",
            delivery_id,
            attempt,
            outcome,
            http_status,
            error[:500] if error else None,
            retry_in,
            round_start,
        )


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    at: datetime
    http_status: int | None
    error: str | None
    duration_ms: int


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    event_id: str
    event_type: str
    deal_id: str | None
    url: str
    status: str
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None
    log: list[Attempt] = []


_DELIVERY_COLUMNS = """id, event_id, event_type, deal_id, url, status, attempts, last_status, last_error,
                       next_attempt_at, created_at, delivered_at"""


def _delivery(row: asyncpg.Record, log: list[Attempt]) -> Delivery:
    return Delivery(**dict(row.items()), log=log)


async def list_deliveries(
    conn: Connection,
    *,
    status: str | None = None,
    deal_id: str | None = None,
    event_id: str | None = None,
    url: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[Delivery]:
    """Newest first, each with its attempts; `before_id` pages further back."""
    rows = await conn.fetch(
        f"""SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries
            WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR deal_id = $2)
              AND ($3::text IS NULL OR event_id = $3) AND ($4::text IS NULL OR url = $4)
              AND ($5::bigint IS NULL OR id < $5)
            ORDER BY id DESC LIMIT $6""",
        status,
        deal_id,
        event_id,
        url,
        before_id,
        max(1, min(limit, 1000)),
    )
    attempts = await conn.fetch(
        """SELECT delivery_id, attempt, at, http_status, error, duration_ms FROM webhook_attempts
           WHERE delivery_id = ANY($1::bigint[]) ORDER BY delivery_id, attempt""",
        [row["id"] for row in rows],
    )
    logs: dict[int, list[Attempt]] = {}
    for a in attempts:
        logs.setdefault(a["delivery_id"], []).append(
            Attempt(
                attempt=a["attempt"],
                at=a["at"],
                http_status=a["http_status"],
                error=a["error"],
                duration_ms=a["duration_ms"],
            )
        )
    return [_delivery(row, logs.get(row["id"], [])) for row in rows]


async def redeliver(conn: Connection, delivery_id: int) -> Delivery | None:
    """Sends a delivery again as soon as a sender picks it up, whatever its state, with a fresh
    round of retries; the body is the same bytes as before. None when there is no such delivery."""
    row = await conn.fetchrow(
        f"""UPDATE webhook_deliveries SET status = 'PENDING', round_start = attempts, next_attempt_at = now()
            WHERE id = $1 RETURNING {_DELIVERY_COLUMNS}""",
        delivery_id,
    )
    if row is None:
        return None
    found = await list_deliveries(conn, event_id=row["event_id"], url=row["url"], limit=1)
    return found[0] if found else _delivery(row, [])


def as_dict(value: Any) -> Any:
    """A Delivery (or list of them) as plain JSON-ready data, for a CLI."""
    return msgspec.to_builtins(value)
