"""PostgreSQL: one pool per service, each service in its own schema, plain-SQL migrations.

Connections get `search_path = <schema>` so a service's SQL names its tables
unqualified and cannot touch another service's tables by accident.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger("otc.db")

#: How a PostgreSQL restart, failover or cut connection surfaces: a loop waits it out and retries (its
#: transaction was rolled back). InternalClientError is asyncpg's for a pooled connection cut mid-reply.
DATABASE_TRANSIENT: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Pool = asyncpg.Pool
    Connection = asyncpg.Connection | PoolConnectionProxy

#: Tables every service has: the outbox its relay publishes, the inbox its consumers dedupe with.
BUS_MIGRATION = (
    "000_bus",
    """
    CREATE TABLE IF NOT EXISTS outbox (
        id         bigserial PRIMARY KEY,
        event_id   text NOT NULL UNIQUE,
        subject    text NOT NULL,
        data       bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS inbox (
        consumer    text NOT NULL,
        event_id    text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, event_id)
    );
    """,
)


def quote_ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unsafe SQL identifier: {name!r}")
    return f'"{name}"'


async def create_pool(url: str, schema: str, *, min_size: int = 1, max_size: int = 10) -> Pool:
    """Waits for the server (it may start after us) and returns a pool bound to `schema`."""
    delay = 0.2
    while True:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                server_settings={"search_path": schema, "application_name": f"otc-{schema}"},
                command_timeout=30,
                reset=_keep_session,
            )
            assert pool is not None
            return pool
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("database not reachable yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is (asyncpg still rolls back an open transaction).

    The default reset costs a round trip on every release, and nothing here leaves session state
    behind: locks and settings are transaction-scoped, listeners have connections of their own, and
    the one session-level advisory lock (the engine's solvency round) closes its connection when it
    cannot unlock."""


def package_migrations(package: str) -> list[tuple[str, str]]:
    """`NNN_name.sql` files of `<package>/migrations`, in name order."""
    folder = resources.files(package).joinpath("migrations")
    files = sorted((entry for entry in folder.iterdir() if entry.name.endswith(".sql")), key=lambda entry: entry.name)
    return [(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8")) for entry in files]


#: A lost connection, not a bad migration: `migrate_when_reachable` tries again.
CONNECTION_LOST: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


async def migrate_when_reachable(pool: Pool, schema: str, migrations: Sequence[tuple[str, str]]) -> list[str]:
    """`migrate`, waiting out a database that restarts meanwhile (a service started then must not give up)."""
    delay = 0.2
    while True:
        try:
            return await migrate(pool, schema, migrations)
        except CONNECTION_LOST as exc:
            log.warning("migrations interrupted (%s: %s); retrying", type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def migrate(pool: Pool, schema: str, migrations: Sequence[tuple[str, str]]) -> list[str]:
    """Applies what is missing, once, even with several replicas starting together."""
    applied_now: list[str] = []
    ident = quote_ident(schema)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"otc-migrate:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {ident}.schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["name"] for row in await conn.fetch(f"SELECT name FROM {ident}.schema_migrations")}
        await conn.execute(f"SET LOCAL search_path = {ident}")
        for name, sql in [BUS_MIGRATION, *migrations]:
            if name in done:
                continue
            await conn.execute(sql)
            await conn.execute(f"INSERT INTO {ident}.schema_migrations(name) VALUES ($1)", name)
            applied_now.append(name)
    if applied_now:
        log.info("applied migrations", extra={"schema": schema, "migrations": applied_now})
    return applied_now


def record_to_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return None if record is None else dict(record.items())
