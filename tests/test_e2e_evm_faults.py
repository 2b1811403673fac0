"""Reorgs, crashes and a watcher outage in the middle of deals: the right outcome, nothing paid twice.

These chains mine a block per transaction and otherwise only when the test says, so each
fault can be placed exactly: in WAITING, in SWAP, between a payout and its confirmation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import EvmChains
from tests.e2e import Deal, EvmStack, chains_env, mine_until

ETH = 10**18
USDT = 10**6


@pytest.fixture
async def stack(service_env: dict[str, str], tmp_path: Path, work_dir: Path) -> AsyncIterator[EvmStack]:
    chains = await asyncio.to_thread(EvmChains, work_dir)
    env = chains_env(service_env, tmp_path / "registry.toml", chains)
    running = EvmStack(env, work_dir, chains)
    await running.start()
    yield running
    await running.stop()
    chains.stop()


async def fund_both(deal: Deal) -> tuple[int, int]:
    alice, bob = await deal.required("ALICE"), await deal.required("BOB")
    await asyncio.gather(deal.deposit("ALICE", alice), deal.deposit("BOB", bob))
    return alice, bob


async def test_reorg_in_waiting_goes_back_to_collection_then_completes(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.3"), ("POLYGON", "MATIC", "400"))
    await deal.fill()
    alice, _ = await fund_both(deal)
    await deal.wait("WAITING", timeout=20)
    # The block holding Alice's deposit is replaced; anvil drops its transactions.
    await stack.eth.call("anvil_reorg", 1, [])
    await stack.eth.call("anvil_mine", "0x1")  # the new branch grows past the old tip
    await deal.wait("COLLECTION", timeout=20)
    status = await deal.status()
    assert status["collection"]["alice"]["deposited"] == "0"
    assert status["expiresAt"] is not None, "the deadline runs again"
    await deal.deposit("ALICE", alice)
    stack.miner.start()
    await deal.wait("CLOSED", outcome="SWAPPED", timeout=60)
    assert await stack.eth.balance(deal.recipient["BOB"]) == 3 * ETH // 10
    assert await stack.polygon.balance(deal.recipient["ALICE"]) == 400 * ETH


async def test_reorg_in_swap_rebroadcasts_the_same_payout(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.25"), ("POLYGON", "MATIC", "10"))
    await deal.fill()
    await fund_both(deal)
    await deal.wait("WAITING", timeout=20)
    # From here blocks come only when mined, so the payout can be caught with one confirmation.
    await stack.eth.call("evm_setAutomine", False)
    await mine_until(stack, deal, "SWAP")
    deadline = time.monotonic() + 20
    payout = None
    while time.monotonic() < deadline and not (payout and payout["txid"]):
        status = await deal.status()
        payout = next((t for t in status["transfers"] if t["purpose"] == "SWAP_PAYOUT" and t["chainId"] == "ETH"), None)
        await asyncio.sleep(0.1)
    assert payout and payout["txid"], stack.logs()
    first_txid = payout["txid"]
    await stack.eth.call("anvil_mine", "0x1")
    assert await stack.eth.receipt(first_txid) is not None
    await stack.eth.call("anvil_reorg", 1, [])
    assert await stack.eth.receipt(first_txid) is None, "the reorg removed the payout"
    await stack.eth.call("anvil_mine", "0x1")
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=60)
    [payout] = [t for t in final["transfers"] if t["purpose"] == "SWAP_PAYOUT" and t["chainId"] == "ETH"]
    assert payout["txid"] == first_txid, "the same signed bytes were broadcast again"
    assert await stack.eth.balance(deal.recipient["BOB"]) == ETH // 4, "paid exactly once"


@pytest.mark.parametrize("victim", ["engine", "queue", "tank", "watcher-ETH", "watcher-POLYGON", "gateway"])
async def test_service_killed_in_swap_deal_completes_paying_once(stack: EvmStack, victim: str) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.4"), ("POLYGON", "USDT", "900"))
    await deal.fill()
    await fund_both(deal)
    await mine_until(stack, deal, "SWAP")
    process = stack.procs[victim]
    process.kill()
    await stack.mine(3)
    await asyncio.sleep(1)
    await stack.mine(3)
    await process.start()
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=90)
    assert await stack.eth.balance(deal.recipient["BOB"]) == 4 * ETH // 10
    assert await stack.polygon.token_balance(stack.chains.usdt["POLYGON"], deal.recipient["ALICE"]) == 900 * USDT
    for party, chain in (("ALICE", "ETH"), ("BOB", "POLYGON")):
        sent = await stack.chain(chain).sent_from(await deal.escrow(party), 0)
        confirmed = [t for t in final["transfers"] if t["chainId"] == chain and t["status"] == "CONFIRMED"]
        assert len(sent) == len(confirmed), f"{party}: {len(sent)} transactions for {len(confirmed)} transfers"
        assert sorted(tx["hash"] for tx in sent) == sorted(t["txid"] for t in confirmed)


async def test_watcher_down_for_twenty_blocks_catches_up(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("ETH", "ETH", "0.1"), ("POLYGON", "MATIC", "50"))
    await deal.fill()
    watcher = stack.procs["watcher-ETH"]
    await watcher.stop()
    await fund_both(deal)
    await stack.eth.call("anvil_mine", hex(20))
    await watcher.start()
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=60)
    assert final["collection"]["alice"]["deposits"][0]["blockHeight"] is not None
    assert await stack.eth.balance(deal.recipient["BOB"]) == ETH // 10
