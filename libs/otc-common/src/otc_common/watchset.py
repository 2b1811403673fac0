"""The set of escrow addresses a chain watcher follows, fed by the engine's deal events.

Both watcher kinds keep it the same way, so it lives here once.
"""

from __future__ import annotations

from otc_common import subjects
from otc_common.db import Connection
from otc_common.messages import Envelope, EscrowAssigned, EscrowUnwatch, Message
from otc_common.subjects import ConsumerSpec

MIGRATIONS = [
    (
        "001_watch_set",
        """
        CREATE TABLE IF NOT EXISTS watch_set (
            address      text PRIMARY KEY,
            deal_id      text NOT NULL,
            party        text NOT NULL,
            asset        text NOT NULL,
            escrow_index bigint NOT NULL,
            added_at     timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        # When the engine assigned the escrow: deposits may have arrived from then on, however late the
        # watch set learns of it (NULL for escrows watched before this was recorded).
        "001_watch_set_assigned_at",
        "ALTER TABLE watch_set ADD COLUMN IF NOT EXISTS assigned_at timestamptz",
    ),
]


def consumer_spec(kind: str, chain: str) -> ConsumerSpec:
    return ConsumerSpec(
        durable=f"watcher-{kind}-{chain}-deals",
        stream="DEALS",
        filter_subjects=[subjects.ALL_DEALS],
        types=frozenset({EscrowAssigned.TYPE, EscrowUnwatch.TYPE}),
    )


def schema_name(kind: str, chain: str) -> str:
    return f"watcher_{kind}_{chain.lower()}"


class WatchSetHandler:
    def __init__(self, chain: str) -> None:
        self.chain = chain

    async def __call__(self, conn: Connection, envelope: Envelope, message: Message) -> None:
        if isinstance(message, EscrowAssigned) and message.chain == self.chain:
            await conn.execute(
                """INSERT INTO watch_set (address, deal_id, party, asset, escrow_index, assigned_at)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (address) DO NOTHING""",
                message.address,
                message.deal_id,
                message.party.value,
                message.asset,
                message.escrow_index,
                envelope.occurred_at,
            )
        elif isinstance(message, EscrowUnwatch) and message.chain == self.chain:
            await conn.execute("DELETE FROM watch_set WHERE address = $1", message.address)


async def watched_addresses(conn: Connection) -> list[str]:
    return [row["address"] for row in await conn.fetch("SELECT address FROM watch_set ORDER BY address")]
