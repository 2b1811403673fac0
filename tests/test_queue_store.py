"""The queue's record of deal facts: the first version of an escrow or of a party's details stands."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from otc_common.db import Pool, create_pool, migrate, package_migrations
from otc_common.messages import EscrowAssigned, Party, PartyDetailsFilled
from otc_queue import store


@pytest.fixture
async def queue_pool(database_url: str) -> AsyncIterator[Pool]:
    pool = await create_pool(database_url, "queue", max_size=2)
    await migrate(pool, "queue", package_migrations("otc_queue"))
    yield pool
    await pool.close()


def escrow(deal_id: str, index: int, address: str = "0xescrow") -> EscrowAssigned:
    return EscrowAssigned(
        deal_id=deal_id, party=Party.ALICE, chain="ETH", asset="ETH", address=address, escrow_index=index
    )


def details(payback: str, recipient: str) -> PartyDetailsFilled:
    return PartyDetailsFilled(deal_id="d1", party=Party.BOB, payback_address=payback, recipient_address=recipient)


async def test_an_escrow_announced_again_keeps_its_first_terms(queue_pool: Pool) -> None:
    async with queue_pool.acquire() as conn:
        assert await store.add_escrow(conn, escrow("d1", 7)) is None
        assert await store.add_escrow(conn, escrow("d1", 7)) is None, "the same terms again are no news"
        differs = await store.add_escrow(conn, escrow("d2", 8))
        assert differs is not None and (differs["deal_id"], differs["escrow_index"]) == ("d1", 7)
        assert await store.add_escrow(conn, escrow("d3", 9, "0xother")) is None
        rows = await conn.fetch("SELECT address, deal_id, escrow_index FROM deal_escrows ORDER BY address")
    assert [tuple(row) for row in rows] == [("0xescrow", "d1", 7), ("0xother", "d3", 9)]


async def test_party_details_are_filled_once_and_an_empty_version_decides_nothing(queue_pool: Pool) -> None:
    async with queue_pool.acquire() as conn:
        assert await store.add_party(conn, details("", "")) is None
        assert await store.add_party(conn, details("0xpay", "0xget")) is None, "completes the empty version"
        assert await store.add_party(conn, details("0xpay", "0xget")) is None
        assert await store.add_party(conn, details("", "")) is None
        differs = await store.add_party(conn, details("0xpay", "0xelsewhere"))
        assert differs is not None and differs["recipient_address"] == "0xget"
        row = await conn.fetchrow("SELECT payback_address, recipient_address FROM deal_parties")
    assert row is not None and tuple(row) == ("0xpay", "0xget")


async def test_a_run_of_escrows_stored_together_keeps_the_first_version_of_each(queue_pool: Pool) -> None:
    async with queue_pool.acquire() as conn:
        assert await store.add_escrow(conn, escrow("d0", 1, "0xknown")) is None
        run = [escrow("d1", 7), escrow("d2", 8), escrow("d1", 7), escrow("d3", 9, "0xknown"), escrow("d4", 2, "0xnew")]
        differing = await store.add_escrows(conn, run)
        assert [(msg.deal_id, row["deal_id"]) for msg, row in differing] == [("d2", "d1"), ("d3", "d0")]
        rows = await conn.fetch("SELECT address, deal_id, escrow_index FROM deal_escrows ORDER BY address")
    assert [tuple(row) for row in rows] == [("0xescrow", "d1", 7), ("0xknown", "d0", 1), ("0xnew", "d4", 2)]


async def test_a_run_of_details_stored_together_keeps_the_first_with_addresses(queue_pool: Pool) -> None:
    async with queue_pool.acquire() as conn:
        run = [details("", ""), details("0xpay", "0xget"), details("0xpay", "0xelsewhere"), details("", "")]
        differing = await store.add_parties(conn, run)
        assert [(msg.recipient_address, row["recipient_address"]) for msg, row in differing] == [
            ("0xelsewhere", "0xget")
        ]
        row = await conn.fetchrow("SELECT payback_address, recipient_address FROM deal_parties")
    assert row is not None and tuple(row) == ("0xpay", "0xget")
