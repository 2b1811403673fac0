"""Cross-chain swaps ALPHA ⇄ ETH / USDT: the Unicity devnet over Electrum, two anvil chains, every service a process.

Balances are read from the chains themselves (Electrum for UNICITY, JSON-RPC for the EVM chains) and
checked to the satoshi and the wei. The devnet runs with the production Alpha rules: one input per
transaction, so each ALPHA payout is one transaction per escrow output it spends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bitcoin.core import CTransaction, b2lx

from otc_common.addresses import utxo_script_pubkey
from tests.conftest import EvmChains
from tests.e2e import Deal, EvmStack, alpha_scripthash, chains_env, mine_until, wait_until
from tests.support import ALPHA_ADDRESS, OPERATOR_EVM
from tests.utxo_support import UnicityDevnet

ETH = 10**18
USDT = 10**6
ALPHA = 10**8
UTXO_PHASES = ["SWAP_PAYOUT", "COMMISSION", "SURPLUS"]


@pytest.fixture
async def stack(
    service_env: dict[str, str], unicity_devnet: UnicityDevnet, tmp_path: Path, work_dir: Path
) -> AsyncIterator[EvmStack]:
    chains = await asyncio.to_thread(EvmChains, work_dir)
    env = chains_env(service_env, tmp_path / "registry.toml", chains, unicity_devnet)
    env["OTC_BUMP_AFTER_SECONDS"] = "3"
    running = EvmStack(env, work_dir, chains, devnet=unicity_devnet)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
        chains.stop()


class Spend:
    """One transaction spending from an escrow: its id, height (0 in the mempool), inputs, outputs and fee."""

    def __init__(self, txid: str, height: int, spent: int, outputs: list[tuple[bytes, int]]) -> None:
        self.txid = txid
        self.height = height
        self.spent = spent
        self.outputs = outputs
        self.fee = spent - sum(value for _, value in outputs)

    def paid(self, address: str) -> int:
        script = utxo_script_pubkey(address, "alpha")
        return sum(value for out_script, value in self.outputs if out_script == script)


async def raw_tx(devnet: UnicityDevnet, txid: str) -> CTransaction:
    return CTransaction.deserialize(bytes.fromhex(await devnet.call("blockchain.transaction.get", txid)))


async def spends_from(stack: EvmStack, escrow: str) -> list[Spend]:
    """Every transaction spending the escrow's outputs, read from the devnet (chain and mempool), by height."""
    devnet = stack.devnet
    assert devnet is not None
    script = utxo_script_pubkey(escrow, "alpha")
    spends = []
    for entry in await devnet.call("blockchain.scripthash.get_history", alpha_scripthash(escrow)):
        tx = await raw_tx(devnet, entry["tx_hash"])
        spent = 0
        for vin in tx.vin:
            funding = await raw_tx(devnet, b2lx(vin.prevout.hash))
            out = funding.vout[vin.prevout.n]
            if bytes(out.scriptPubKey) == script:
                spent += out.nValue
        if spent:
            outputs = [(bytes(out.scriptPubKey), out.nValue) for out in tx.vout]
            spends.append(Spend(entry["tx_hash"], entry["height"], spent, outputs))
    return sorted(spends, key=lambda spend: spend.height if spend.height > 0 else 1 << 30)


async def transfer(deal: Deal, purpose: str, chain: str, timeout: float = 30) -> dict[str, Any]:
    """The deal's transfer of `purpose` on `chain` once it has a txid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in (await deal.status())["transfers"]:
            if t["purpose"] == purpose and t["chainId"] == chain and t["txid"]:
                return dict(t)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {purpose} on {chain}: {(await deal.status())['transfers']}\n{deal.stack.logs()}")


async def mempool_of(stack: EvmStack, address: str) -> list[str]:
    assert stack.devnet is not None
    return [
        e["tx_hash"] for e in await stack.devnet.call("blockchain.scripthash.get_mempool", alpha_scripthash(address))
    ]


async def mine_evm(stack: EvmStack, blocks: int = 1) -> None:
    for chain in (stack.eth, stack.polygon):
        await chain.call("anvil_mine", hex(blocks))


def assert_one_spend_per_transfer(final: dict[str, Any], spends: list[Spend]) -> None:
    """No payout exists twice: every ALPHA transfer's txid is on chain once, and nothing else left the escrow."""
    txids = [spend.txid for spend in spends]
    assert len(txids) == len(set(txids))
    alpha = [t for t in final["transfers"] if t["chainId"] == "UNICITY"]
    assert all(t["status"] == "CONFIRMED" for t in alpha), alpha
    assert {t["txid"] for t in alpha} <= set(txids)


async def test_alpha_for_eth_happy_path_with_surplus_in_three_phases(stack: EvmStack) -> None:
    devnet = stack.devnet
    assert devnet is not None
    started = time.monotonic()
    deal = await Deal.create(stack, ("UNICITY", "ALPHA", "25"), ("ETH", "ETH", "1.5"))
    await deal.fill()
    operator_eth = await stack.eth.balance(OPERATOR_EVM)
    operator_alpha = await stack.alpha_balance(ALPHA_ADDRESS)
    alice_in = await deal.required("ALICE") + 2 * ALPHA
    bob_in = await deal.required("BOB") + ETH // 10
    alice_escrow, bob_escrow = await deal.escrow("ALICE"), await deal.escrow("BOB")
    await asyncio.gather(deal.deposit("ALICE", alice_in), deal.deposit("BOB", bob_in))
    # One block: both deposits are mined (ETH's already has its own block), neither side is locked yet.
    await devnet.mine(1)
    await deal.wait("WAITING", timeout=30)
    # The locking block: both sides reach the threshold (2) with it; the ALPHA payout follows at once.
    locked_at = time.monotonic()
    await stack.mine()
    while not await mempool_of(stack, deal.recipient["BOB"]):
        assert time.monotonic() - locked_at < 10, stack.logs()
        await asyncio.sleep(0.005)
    lock_to_broadcast = time.monotonic() - locked_at
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=120)
    wall = time.monotonic() - started
    await stack.miner.stop()

    # Each side receives the trade amount exactly; the operator the commission exactly (30 bps).
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 25 * ALPHA
    assert await stack.eth.balance(deal.recipient["ALICE"]) == 3 * ETH // 2
    assert await stack.alpha_balance(ALPHA_ADDRESS) - operator_alpha == 25 * ALPHA * 30 // 10_000
    assert await stack.eth.balance(OPERATOR_EVM) - operator_eth == 45 * ETH // 10_000
    # The three ALPHA phases, each mined only after the previous one had its 2 confirmations.
    spends = await spends_from(stack, alice_escrow)
    assert_one_spend_per_transfer(final, spends)
    by_purpose = {t["purpose"]: t["txid"] for t in final["transfers"] if t["chainId"] == "UNICITY"}
    heights = [next(s.height for s in spends if s.txid == by_purpose[purpose]) for purpose in UTXO_PHASES]
    assert heights[0] > 0 and heights[1] >= heights[0] + 2 and heights[2] >= heights[1] + 2, heights
    # ALPHA's payback gets the rest to the satoshi: deposit - amount - commission - the payouts' own fees.
    fees = sum(spend.fee for spend in spends)
    assert len(spends) == 3 and 0 < fees < await deal.required("ALICE") - 25 * ALPHA - 25 * ALPHA * 30 // 10_000
    assert await stack.alpha_balance(deal.payback["ALICE"]) == alice_in - 25 * ALPHA - 7_500_000 - fees
    assert await stack.alpha_balance(alice_escrow) == 0
    assert await stack.eth.balance(bob_escrow) == 0
    print(
        f"\nALPHA-ETH happy path: wall {wall:.1f}s, "
        f"locking block -> phase-1 broadcast {lock_to_broadcast * 1000:.0f} ms"
    )


async def test_alpha_for_usdt_on_polygon(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("POLYGON", "USDT", "3000"), ("UNICITY", "ALPHA", "40"))
    await deal.fill()
    usdt = stack.chains.usdt["POLYGON"]
    alice_in, bob_in = await deal.required("ALICE"), await deal.required("BOB")
    await asyncio.gather(deal.deposit("ALICE", alice_in), deal.deposit("BOB", bob_in))
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=120)
    assert await stack.polygon.token_balance(usdt, deal.recipient["BOB"]) == 3000 * USDT
    assert await stack.alpha_balance(deal.recipient["ALICE"]) == 40 * ALPHA
    bob_escrow = await deal.escrow("BOB")
    spends = await spends_from(stack, bob_escrow)
    assert_one_spend_per_transfer(final, spends)
    # Paid exactly what was required: the unused fee reserve comes back to Bob, less its own fee.
    fees = sum(spend.fee for spend in spends)
    assert await stack.alpha_balance(deal.payback["BOB"]) == bob_in - 40 * ALPHA - 12_000_000 - fees
    assert await stack.alpha_balance(bob_escrow) == 0
    assert await stack.polygon.token_balance(usdt, await deal.escrow("ALICE")) == 0


async def test_alpha_side_times_out_with_only_eth_funded_both_refunded(stack: EvmStack) -> None:
    deal = await Deal.create(stack, ("UNICITY", "ALPHA", "10"), ("ETH", "ETH", "0.5"), timeout=6)
    await deal.fill()
    alpha_part = 4 * ALPHA
    eth_in = await deal.required("BOB")
    await asyncio.gather(deal.deposit("ALICE", alpha_part), deal.deposit("BOB", eth_in))
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="REFUNDED", timeout=60)
    assert not any(t["purpose"] == "SWAP_PAYOUT" for t in final["transfers"])
    spends = await spends_from(stack, await deal.escrow("ALICE"))
    assert_one_spend_per_transfer(final, spends)
    assert [spend.paid(deal.payback["ALICE"]) for spend in spends] == [alpha_part - spends[0].fee]
    assert await stack.alpha_balance(deal.payback["ALICE"]) == alpha_part - spends[0].fee
    refund_fee = eth_in - await stack.eth.balance(deal.payback["BOB"])
    assert 0 < refund_fee < 10**15, "Bob gets his ETH back less only the refund's own fee"
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 0
    assert await stack.eth.balance(deal.recipient["ALICE"]) == 0


async def test_reorg_on_unicity_in_waiting_goes_back_to_collection(stack: EvmStack) -> None:
    assert stack.devnet is not None
    deal = await Deal.create(stack, ("UNICITY", "ALPHA", "5"), ("ETH", "ETH", "0.2"))
    await deal.fill()
    alice_in = await deal.required("ALICE")
    deposit, _ = await asyncio.gather(deal.deposit("ALICE", alice_in), deal.deposit("BOB", await deal.required("BOB")))
    await stack.devnet.mine(1)
    await deal.wait("WAITING", timeout=20)
    # The block holding Alice's deposit is replaced by a branch without it.
    await stack.devnet.reorg(1, [deposit])
    await deal.wait("COLLECTION", timeout=20)
    assert (await deal.status())["collection"]["alice"]["deposited"] == "0"
    await deal.deposit("ALICE", alice_in)
    stack.miner.start()
    await deal.wait("CLOSED", outcome="SWAPPED", timeout=90)
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 5 * ALPHA
    assert await stack.eth.balance(deal.recipient["ALICE"]) == ETH // 5


async def test_reorg_on_unicity_in_phase_one_rebroadcasts_the_same_bytes(stack: EvmStack) -> None:
    assert stack.devnet is not None
    deal = await Deal.create(stack, ("UNICITY", "ALPHA", "7"), ("ETH", "ETH", "0.3"))
    await deal.fill()
    await asyncio.gather(
        deal.deposit("ALICE", await deal.required("ALICE")), deal.deposit("BOB", await deal.required("BOB"))
    )
    await mine_until(stack, deal, "SWAP")
    first = (await transfer(deal, "SWAP_PAYOUT", "UNICITY"))["txid"]
    original = (await raw_tx(stack.devnet, first)).serialize()
    await stack.devnet.mine(1)
    assert await stack.alpha_confirmed(deal.recipient["BOB"]) == 7 * ALPHA
    # The block holding the payout is replaced and the payout dropped from the node altogether.
    await stack.devnet.reorg(1, [first])
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 0, "the reorg removed the payout"
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=90)
    [payout] = [t for t in final["transfers"] if t["purpose"] == "SWAP_PAYOUT" and t["chainId"] == "UNICITY"]
    assert payout["txid"] == first
    assert (await raw_tx(stack.devnet, first)).serialize() == original, "the same signed bytes were broadcast again"
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 7 * ALPHA, "paid exactly once"
    assert_one_spend_per_transfer(final, await spends_from(stack, await deal.escrow("ALICE")))


async def test_deposit_split_over_three_transactions(stack: EvmStack) -> None:
    devnet = stack.devnet
    assert devnet is not None
    deal = await Deal.create(stack, ("ETH", "ETH", "0.1"), ("UNICITY", "ALPHA", "30"))
    await deal.fill()
    required = await deal.required("BOB")
    parts = [required // 3, required // 3, required - 2 * (required // 3)]
    for part in parts:
        await deal.deposit("BOB", part)
        await devnet.mine(1)
    await deal.deposit("ALICE", await deal.required("ALICE"))
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=120)
    assert len(final["collection"]["bob"]["deposits"]) == 3
    bob_escrow = await deal.escrow("BOB")
    spends = await spends_from(stack, bob_escrow)
    # One input per transaction on Alpha: the 30 ALPHA leave in several transactions that add up exactly.
    assert all([len((await raw_tx(devnet, s.txid)).vin) == 1 for s in spends])
    assert sum(spend.paid(deal.recipient["ALICE"]) for spend in spends) == 30 * ALPHA
    assert await stack.alpha_balance(deal.recipient["ALICE"]) == 30 * ALPHA
    assert sum(spend.paid(ALPHA_ADDRESS) for spend in spends) == 9_000_000
    fees = sum(spend.fee for spend in spends)
    assert await stack.alpha_balance(deal.payback["BOB"]) == required - 30 * ALPHA - 9_000_000 - fees
    assert await stack.alpha_balance(bob_escrow) == 0


async def test_stuck_phase_one_payout_is_replaced_by_fee(stack: EvmStack) -> None:
    devnet = stack.devnet
    assert devnet is not None
    deal = await Deal.create(stack, ("UNICITY", "ALPHA", "6"), ("ETH", "ETH", "0.2"))
    await deal.fill()
    await asyncio.gather(
        deal.deposit("ALICE", await deal.required("ALICE") + ALPHA),
        deal.deposit("BOB", await deal.required("BOB")),
    )
    await mine_until(stack, deal, "SWAP")
    first = (await transfer(deal, "SWAP_PAYOUT", "UNICITY"))["txid"]
    first_fee = next(s.fee for s in await spends_from(stack, await deal.escrow("ALICE")) if s.txid == first)
    # Blocks keep coming but none takes the payout: after OTC_BUMP_AFTER_SECONDS the queue replaces it.
    deadline = time.monotonic() + 30
    while (pending := await mempool_of(stack, deal.recipient["BOB"])) == [first]:
        assert time.monotonic() < deadline, stack.logs()
        await devnet.call("devnet.mine", 1, None, False)
        await mine_evm(stack)
        await asyncio.sleep(0.5)
    [replacement] = pending
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=90)
    spends = await spends_from(stack, await deal.escrow("ALICE"))
    assert first not in [s.txid for s in spends], "the replaced payout never confirmed"
    bumped = next(s for s in spends if s.txid == replacement)
    assert bumped.fee > first_fee and bumped.paid(deal.recipient["BOB"]) == 6 * ALPHA
    [payout] = [t for t in final["transfers"] if t["purpose"] == "SWAP_PAYOUT" and t["chainId"] == "UNICITY"]
    assert payout["txid"] == replacement
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 6 * ALPHA
    assert_one_spend_per_transfer(final, spends)


async def test_queue_killed_between_phases_pays_each_phase_once(stack: EvmStack) -> None:
    devnet = stack.devnet
    assert devnet is not None
    deal = await Deal.create(stack, ("UNICITY", "ALPHA", "12"), ("ETH", "ETH", "0.4"))
    await deal.fill()
    alice_in = await deal.required("ALICE") + ALPHA
    await asyncio.gather(deal.deposit("ALICE", alice_in), deal.deposit("BOB", await deal.required("BOB")))
    await mine_until(stack, deal, "SWAP")
    phase_one = (await transfer(deal, "SWAP_PAYOUT", "UNICITY"))["txid"]
    stack.procs["queue"].kill()
    # Phase 1 reaches its threshold on chain while the queue is dead; phase 2 waits for the queue to see that.
    await stack.mine(3)
    await asyncio.sleep(1)
    alice_escrow = await deal.escrow("ALICE")
    [only] = await spends_from(stack, alice_escrow)
    assert only.txid == phase_one and (await devnet.tx(phase_one))["confirmations"] >= 3
    await stack.procs["queue"].start()
    stack.miner.start()
    final = await deal.wait("CLOSED", outcome="SWAPPED", timeout=90)
    spends = await spends_from(stack, alice_escrow)
    assert_one_spend_per_transfer(final, spends)
    assert len(spends) == 3 and spends[0].txid == phase_one
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 12 * ALPHA
    assert await stack.alpha_balance(ALPHA_ADDRESS) >= 3_600_000
    assert sum(spend.paid(ALPHA_ADDRESS) for spend in spends) == 3_600_000
    fees = sum(spend.fee for spend in spends)
    assert await stack.alpha_balance(deal.payback["ALICE"]) == alice_in - 12 * ALPHA - 3_600_000 - fees


async def test_late_alpha_deposit_after_close_is_returned(stack: EvmStack) -> None:
    devnet = stack.devnet
    assert devnet is not None
    deal = await Deal.create(stack, ("UNICITY", "ALPHA", "3"), ("ETH", "ETH", "0.1"))
    await deal.fill()
    await asyncio.gather(
        deal.deposit("ALICE", await deal.required("ALICE")), deal.deposit("BOB", await deal.required("BOB"))
    )
    stack.miner.start()
    await deal.wait("CLOSED", outcome="SWAPPED", timeout=90)
    before = await stack.alpha_balance(deal.payback["ALICE"])
    late = await deal.deposit("ALICE", 2 * ALPHA)
    returned = await transfer(deal, "LATE_RETURN", "UNICITY", timeout=60)
    spend = next(s for s in await spends_from(stack, await deal.escrow("ALICE")) if s.txid == returned["txid"])
    assert [b2lx(vin.prevout.hash) for vin in (await raw_tx(devnet, spend.txid)).vin] == [late]
    assert spend.paid(deal.payback["ALICE"]) == 2 * ALPHA - spend.fee
    await wait_until(lambda: stack.alpha_balance(deal.payback["ALICE"]), before + 2 * ALPHA - spend.fee, stack)
    assert await stack.alpha_balance(deal.recipient["BOB"]) == 3 * ALPHA, "the swap is not paid again"
    [late_return] = [t for t in (await deal.status())["transfers"] if t["purpose"] == "LATE_RETURN"]
    assert late_return["txid"] == returned["txid"]
