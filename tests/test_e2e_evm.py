"""Swaps, refunds, reorgs and crashes on two live anvil chains, every service a real process.

Balances are read from the chains themselves and checked to the base unit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from otc_cli import contracts
from tests.conftest import EvmChains
from tests.e2e import Deal, EvmStack, chains_env, wait_until
from tests.support import OPERATOR_EVM

ETH = 10**18
USDT = 10**6
BLOCK_SECONDS = 0.25


@pytest.fixture
async def live_chains(work_dir: Path) -> AsyncIterator[EvmChains]:
    chains = await asyncio.to_thread(EvmChains, work_dir, BLOCK_SECONDS)
    yield chains
    chains.stop()


@pytest.fixture
async def stack(
    service_env: dict[str, str], live_chains: EvmChains, tmp_path: Path, work_dir: Path
) -> AsyncIterator[EvmStack]:
    env = chains_env(service_env, tmp_path / "registry.toml", live_chains)
    running = EvmStack(env, work_dir, live_chains)
    await running.start()
    yield running
    await running.stop()


async def escrow_fees(stack: EvmStack, chain: str, escrow: str, since: int) -> tuple[int, int]:
    """(transactions the escrow sent, the network fees they cost) read from the chain."""
    sent = await stack.chain(chain).sent_from(escrow, since)
    fees = [await stack.chain(chain).fee_of(tx["hash"]) for tx in sent]
    return len(sent), sum(fees)


async def test_happy_path_eth_for_usdt_with_surplus_on_both_sides(stack: EvmStack) -> None:
    started = time.monotonic()
    first_block = {"ETH": await stack.eth.height(), "POLYGON": await stack.polygon.height()}
    deal = await Deal.create(stack, ("ETH", "ETH", "1.5"), ("POLYGON", "USDT", "40000"))
    await deal.fill()
    operator_eth = await stack.eth.balance(OPERATOR_EVM)
    operator_usdt = await stack.polygon.token_balance(stack.chains.usdt["POLYGON"], OPERATOR_EVM)
    alice_in = await deal.required("ALICE") + ETH // 10
    bob_in = await deal.required("BOB") + 5 * USDT
    alice_escrow, bob_escrow = await deal.escrow("ALICE"), await deal.escrow("BOB")
    await asyncio.gather(deal.deposit("ALICE", alice_in), deal.deposit("BOB", bob_in))

    final = await deal.wait("CLOSED", outcome="SWAPPED")
    wall = time.monotonic() - started

    # Each side receives the trade amount exactly; the operator the commission exactly.
    assert await stack.eth.balance(deal.recipient["BOB"]) == 3 * ETH // 2
    assert await stack.polygon.token_balance(stack.chains.usdt["POLYGON"], deal.recipient["ALICE"]) == 40_000 * USDT
    assert await stack.eth.balance(OPERATOR_EVM) - operator_eth == 45 * ETH // 10_000  # 30 bps of 1.5
    assert await stack.polygon.token_balance(stack.chains.usdt["POLYGON"], OPERATOR_EVM) - operator_usdt == 121 * USDT
    # The token side's payback gets its surplus exactly; the native side's, less only its escrow's gas.
    assert await stack.polygon.token_balance(stack.chains.usdt["POLYGON"], deal.payback["BOB"]) == 5 * USDT
    sent, fees = await escrow_fees(stack, "ETH", alice_escrow, first_block["ETH"])
    assert sent == 3  # payout, commission, surplus: each once
    assert await stack.eth.balance(deal.payback["ALICE"]) == alice_in - 3 * ETH // 2 - 45 * ETH // 10_000 - fees
    # Nothing is left behind: the escrows are empty and the tank got its unused gas back.
    assert await stack.eth.balance(alice_escrow) == 0
    assert await stack.polygon.token_balance(stack.chains.usdt["POLYGON"], bob_escrow) == 0
    assert await stack.polygon.balance(bob_escrow) == 0
    purposes = sorted(t["purpose"] for t in final["transfers"])
    assert purposes == sorted(
        ["SWAP_PAYOUT", "COMMISSION", "SURPLUS", "SWAP_PAYOUT", "COMMISSION", "SURPLUS", "GAS_RETURN"]
    )
    assert all(t["status"] == "CONFIRMED" for t in final["transfers"])
    print(f"happy path wall time: {wall:.1f}s")


async def test_deposits_made_before_the_details_are_filled_count_once_they_are(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.2"), ("POLYGON", "MATIC", "10"))
    # No instructions are given before the details are in, but the escrows exist: someone who knows one pays in.
    conn = await asyncpg.connect(stack.env["OTC_DATABASE_URL"])
    try:
        sides = {
            row["party"]: (row["escrow_address"], int(row["owed"]))
            for row in await conn.fetch(
                """SELECT party, escrow_address, amount + commission + fee_reserve AS owed FROM engine.deal_sides
                   WHERE deal_id = $1""",
                deal.id,
            )
        }
    finally:
        await conn.close()
    key = contracts.anvil_account(5).key.hex()
    for party, rpc in (("ALICE", stack.chains.rpc["ETH"]), ("BOB", stack.chains.rpc["POLYGON"])):
        await asyncio.to_thread(contracts.send_native, rpc, sides[party][0], sides[party][1], key)

    async def both_locked() -> bool:
        collection = (await deal.status())["collection"]
        return all(collection[p]["locked"] for p in ("alice", "bob"))

    async def stage() -> str:
        return str((await deal.status())["stage"])

    await wait_until(both_locked, True, stack)
    await deal.fill_one("ALICE")
    assert await stage() == "CREATED", "one party's details: nothing moves yet"
    await deal.fill_one("BOB")
    await deal.wait("CLOSED", outcome="SWAPPED")
    assert await stack.eth.balance(deal.recipient["BOB"]) == ETH // 5
    assert await stack.polygon.balance(deal.recipient["ALICE"]) == 10 * ETH


async def test_usdt_for_usdt_on_two_chains_both_need_the_tank(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "USDT", "2500"), ("POLYGON", "USDT", "2490.5"))
    await deal.fill()
    await asyncio.gather(
        deal.deposit("ALICE", await deal.required("ALICE")), deal.deposit("BOB", await deal.required("BOB"))
    )
    await deal.wait("CLOSED", outcome="SWAPPED")
    assert await stack.eth.token_balance(stack.chains.usdt["ETH"], deal.recipient["BOB"]) == 2500 * USDT
    assert await stack.polygon.token_balance(stack.chains.usdt["POLYGON"], deal.recipient["ALICE"]) == 2_490_500_000
    for party, chain in (("ALICE", "ETH"), ("BOB", "POLYGON")):
        escrow = await deal.escrow(party)
        assert await stack.chain(chain).balance(escrow) == 0, "unused tank gas returned"


async def test_one_side_funded_deadline_refunds_and_a_late_deposit_is_refunded_too(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.5"), ("POLYGON", "USDT", "1000"), timeout=6)
    await deal.fill()
    deposit = await deal.required("ALICE")
    await deal.deposit("ALICE", deposit)
    await deal.wait("REVERTED", timeout=30)
    # Bob pays after the deadline: refunded (or, if the deal closed first, returned as a late deposit), never swapped.
    bob_paid = await deal.required("BOB")
    await deal.deposit("BOB", bob_paid)
    await deal.wait("CLOSED", outcome="REFUNDED")
    usdt = stack.chains.usdt["POLYGON"]
    await wait_until(lambda: stack.polygon.token_balance(usdt, deal.payback["BOB"]), bob_paid, stack)
    final = await deal.status()
    assert not any(t["purpose"] == "SWAP_PAYOUT" for t in final["transfers"])
    refund_fee = deposit - await stack.eth.balance(deal.payback["ALICE"])
    assert 0 < refund_fee < 10**15, "Alice gets her deposit back less only the refund's own fee"
    assert await stack.eth.balance(deal.recipient["BOB"]) == 0


async def test_underpayment_then_top_up_aggregates(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.2"), ("POLYGON", "MATIC", "300"))
    await deal.fill()
    alice_needed = await deal.required("ALICE")
    await deal.deposit("ALICE", alice_needed // 2)
    await deal.deposit("BOB", await deal.required("BOB"))
    await asyncio.sleep(2)
    assert (await deal.status())["stage"] == "COLLECTION", "half a deposit does not fund a side"
    await deal.deposit("ALICE", alice_needed - alice_needed // 2)
    final = await deal.wait("CLOSED", outcome="SWAPPED")
    assert len(final["collection"]["alice"]["deposits"]) == 2
    assert await stack.eth.balance(deal.recipient["BOB"]) == ETH // 5
    assert await stack.polygon.balance(deal.recipient["ALICE"]) == 300 * ETH


async def test_late_deposit_after_close_is_returned(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.1"), ("POLYGON", "USDT", "100"))
    await deal.fill()
    await asyncio.gather(
        deal.deposit("ALICE", await deal.required("ALICE")), deal.deposit("BOB", await deal.required("BOB"))
    )
    await deal.wait("CLOSED", outcome="SWAPPED")
    usdt = stack.chains.usdt["POLYGON"]
    before = await stack.polygon.token_balance(usdt, deal.payback["BOB"])
    await deal.deposit("BOB", 7 * USDT)
    await wait_until(lambda: stack.polygon.token_balance(usdt, deal.payback["BOB"]), before + 7 * USDT, stack)
    late = [t for t in (await deal.status())["transfers"] if t["purpose"] == "LATE_RETURN"]
    assert len(late) == 1
