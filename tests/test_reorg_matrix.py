"""Reorgs at every stage of a deal, on an EVM chain and on the UTXO chain, at every depth below the
confirmation threshold; and a reorg at the threshold, which halts payouts on that chain until an
operator resumes them.

Alice sends on the chain that reorganises (POLYGON, threshold 3, or UNICITY, threshold 2); Bob sends
ETH. Every block is mined by the test (automine is off on both anvils, the devnet mines on request), so
each reorg replaces exactly the blocks the case names: the deposit's, or the payout's. A case passes
when the deal ends with the right outcome, every balance is exact to the base unit, and what left each
escrow on chain is exactly the deal's confirmed transfers, each once (a re-broadcast carries the same
signed bytes).

One stack serves the whole module: each case uses fresh escrows and addresses and ends with its deal
closed and nothing in flight. After each case the stack is audited (no open deal, no transfer in
flight, no halt, every service alive); a case that leaves anything behind gets the next one a new stack.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from bitcoin.core import CTransaction, b2lx

from otc_cli import contracts
from otc_common.addresses import utxo_script_pubkey
from otc_common.electrum import ElectrumError
from otc_common.messages import AlertRaised, Party, Stage, decode_envelope
from otc_engine import ledger
from tests.conftest import EvmChains, create_database, drop_database, reset_streams
from tests.e2e import Deal, EvmStack, alpha_scripthash
from tests.support import ALPHA_ADDRESS, OPERATOR_EVM, TEST_SEED_HEX, write_test_registry
from tests.utxo_support import UnicityDevnet

ETH = 10**18
ALPHA = 10**8
THRESHOLD = {"ETH": 2, "POLYGON": 3, "UNICITY": 2}
#: Alice's side per reorganising chain: (asset, amount, base units per unit).
ALICE_SIDE = {"POLYGON": ("MATIC", "4", ETH), "UNICITY": ("ALPHA", "5", ALPHA)}
BOB_SIDE = ("ETH", "ETH", "0.2")
COMMISSION_BPS = 30
#: The anvil accounts the parties pay from.
FUNDER = {"ALICE": contracts.anvil_address(1), "BOB": contracts.anvil_address(3)}
WAIT = 90.0

STAGES = ["COLLECTION", "WAITING", "SWAP", "REVERTED", "CLOSED"]
CHAIN_DEPTHS = [("POLYGON", 1), ("POLYGON", 2), ("UNICITY", 1)]


# --------------------------------------------------------------------------- the shared stack


class Harness:
    """Anvils, a devnet, a database, and every service as a process; rebuilt when a case leaves a mess."""

    def __init__(self, pg_url: str, nats_url: str, work_dir: Path, tmp: Path) -> None:
        self.pg_url = pg_url
        self.nats_url = nats_url
        self.work_dir = work_dir
        self.tmp = tmp
        self.builds = 0
        self.dirty = False
        self.stack: EvmStack | None = None
        self.database_url = ""
        self.env: dict[str, str] = {}

    async def build(self) -> EvmStack:
        self.builds += 1
        await reset_streams(self.nats_url)
        self.database_url = await create_database(self.pg_url)
        # Started from the event loop's thread: the servers' parent-death signal is tied to it.
        devnet = UnicityDevnet(self.work_dir)
        chains = EvmChains(self.work_dir)
        registry = write_test_registry(
            self.tmp / f"registry-{self.builds}.toml",
            chains.rpc["ETH"],
            chains.rpc["POLYGON"],
            eth_usdt=chains.usdt["ETH"],
            polygon_usdt=chains.usdt["POLYGON"],
            electrum=devnet.url,
        )
        self.env = {
            "OTC_NATS_URL": self.nats_url,
            "OTC_DATABASE_URL": self.database_url,
            "OTC_REGISTRY_FILE": str(registry),
            "OTC_LOG_LEVEL": "INFO",
            "OTC_SEED": TEST_SEED_HEX,
        }
        stack = EvmStack(self.env, self.work_dir, chains, devnet=devnet)
        # A fee bump would replace a payout caught in the pool by another transaction; bumps have their own
        # tests, and here a payout must come back with the very bytes it left with.
        stack.procs["queue"].env["OTC_BUMP_AFTER_SECONDS"] = "600"
        await stack.start()
        for chain in (stack.eth, stack.polygon):
            await chain.call("evm_setAutomine", False)
        self.stack = stack
        self.dirty = False
        return stack

    async def close(self) -> None:
        stack, self.stack = self.stack, None
        if stack is None:
            return
        await stack.stop()
        stack.chains.stop()
        assert stack.devnet is not None
        await stack.devnet.close()
        stack.devnet.stop()
        await drop_database(self.pg_url, self.database_url)

    async def audit(self) -> list[str]:
        """What a case left behind that would disturb the next one."""
        stack = self.stack
        assert stack is not None
        await stack.miner.stop()
        problems = [f"{name} exited" for name, p in stack.procs.items() if p.proc is None or p.proc.poll() is not None]
        conn = await asyncpg.connect(self.database_url)
        try:
            open_deals = await conn.fetchval("SELECT count(*) FROM engine.deals WHERE stage <> 'CLOSED'")
            in_flight = await conn.fetchval(
                "SELECT count(*) FROM engine.transfers WHERE status NOT IN ('CONFIRMED', 'SKIPPED')"
            )
            halts = await conn.fetchval("SELECT count(*) FROM engine.chain_halts")
        finally:
            await conn.close()
        problems += [f"{open_deals} open deal(s)"] if open_deals else []
        problems += [f"{in_flight} transfer(s) in flight"] if in_flight else []
        problems += [f"{halts} halt(s)"] if halts else []
        return problems


@pytest.fixture(scope="module")
async def harness(
    pg_url: str, nats_url: str, work_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    held = Harness(pg_url, nats_url, work_dir, tmp_path_factory.mktemp("reorg"))
    try:
        yield held
    finally:
        await held.close()


@pytest.fixture
async def stack(harness: Harness) -> AsyncIterator[EvmStack]:
    if harness.stack is not None and harness.dirty:
        await harness.close()
    running = harness.stack or await harness.build()
    yield running
    problems = await harness.audit()
    if problems:
        harness.dirty = True
        print(f"\nthe stack is rebuilt for the next case: {', '.join(problems)}")


# --------------------------------------------------------------------------- chains, driven block by block


@dataclass(frozen=True)
class Spend:
    """One transaction out of an escrow, read from the chain, and the network fee it cost the escrow."""

    txid: str
    fee: int


class ReorgChain:
    """Alice's chain, EVM or UTXO, behind one interface: deposits, blocks, reorgs and what left an escrow."""

    def __init__(self, stack: EvmStack, name: str) -> None:
        self.stack = stack
        self.name = name
        self.threshold = THRESHOLD[name]
        self.utxo = name == "UNICITY"

    @property
    def devnet(self) -> UnicityDevnet:
        assert self.stack.devnet is not None
        return self.stack.devnet

    async def deposit(self, address: str, amount: int) -> str:
        if self.utxo:
            return await self.devnet.faucet(address, amount)
        return await evm_send(self.stack, self.name, FUNDER["ALICE"], address, amount)

    async def mine(self, blocks: int = 1) -> None:
        if self.utxo:
            await self.devnet.mine(blocks)
        else:
            await self.stack.chain(self.name).call("anvil_mine", hex(blocks))

    async def tip(self) -> tuple[int, str]:
        if self.utxo:
            info = await self.devnet.call("devnet.info")
            return int(info["height"]), str(info["tip"])
        return await evm_tip(self.stack, self.name)

    async def reorg(self, depth: int, drop: list[str]) -> None:
        """Replaces the last `depth` blocks by a longer branch without the `drop` transactions.

        Checked before any new block can take them again: the dropped transactions are mined no more.
        """
        if self.utxo:
            # The new branch's blocks are empty: nothing is mined again until the test mines.
            await self.devnet.reorg(depth, drop)
        else:
            # anvil's reorg keeps the height and drops every transaction of the replaced blocks; one more
            # block (below) makes the new branch the longer one, as a watcher sees a real reorg.
            await self.stack.chain(self.name).call("anvil_reorg", depth, [])
        for txid in drop:
            assert not await self.mined(txid), f"the reorg left {txid} mined"
        if not self.utxo:
            await self.stack.chain(self.name).call("anvil_mine", "0x1")

    async def block_of(self, txid: str) -> str | None:
        """The hash of the block holding the transaction in the best chain, None while it is not mined."""
        if self.utxo:
            try:
                verbose = await self.devnet.tx(txid)
            except ElectrumError:  # not known to the node
                return None
            return str(verbose["blockhash"]) if verbose.get("confirmations") else None
        receipt = await self.stack.chain(self.name).receipt(txid)
        return None if receipt is None else str(receipt["blockHash"])

    async def known(self, txid: str) -> bool:
        """The node has the transaction, mined or in its pool."""
        if self.utxo:
            try:
                await self.devnet.tx(txid)
            except ElectrumError:
                return False
            return True
        return await self.stack.chain(self.name).call("eth_getTransactionByHash", txid) is not None

    async def mined(self, txid: str) -> bool:
        if self.utxo:
            try:
                return bool((await self.devnet.tx(txid)).get("confirmations"))
            except ElectrumError:
                return False
        return await self.stack.chain(self.name).receipt(txid) is not None

    async def raw(self, txid: str) -> str:
        if self.utxo:
            return str(await self.devnet.call("blockchain.transaction.get", txid))
        return str(await self.stack.chain(self.name).call("eth_getRawTransactionByHash", txid))

    async def balance(self, address: str) -> int:
        if self.utxo:
            return await self.stack.alpha_balance(address)
        return await self.stack.chain(self.name).balance(address)

    async def spends(self, escrow: str, since: int) -> list[Spend]:
        if self.utxo:
            return await utxo_spends(self.devnet, escrow)
        return await evm_spends(self.stack, self.name, escrow, since)


async def evm_send(stack: EvmStack, chain: str, sender: str, to: str, amount: int) -> str:
    """A payment from an unlocked anvil account that waits in the pool until a block is mined."""
    txid: str = await stack.chain(chain).call("eth_sendTransaction", {"from": sender, "to": to, "value": hex(amount)})
    return txid


async def evm_tip(stack: EvmStack, chain: str) -> tuple[int, str]:
    block = await stack.chain(chain).call("eth_getBlockByNumber", "latest", False)
    return int(block["number"], 16), str(block["hash"])


async def evm_spends(stack: EvmStack, chain: str, escrow: str, since: int) -> list[Spend]:
    spends = []
    for tx in await stack.chain(chain).sent_from(escrow, since):
        spends.append(Spend(tx["hash"], await stack.chain(chain).fee_of(tx["hash"])))
    return spends


async def raw_utxo(devnet: UnicityDevnet, txid: str) -> CTransaction:
    return CTransaction.deserialize(bytes.fromhex(await devnet.call("blockchain.transaction.get", txid)))


async def utxo_spends(devnet: UnicityDevnet, escrow: str) -> list[Spend]:
    """Every transaction spending the escrow's outputs (chain and mempool), with its fee."""
    script = utxo_script_pubkey(escrow, "alpha")
    spends = []
    for entry in await devnet.call("blockchain.scripthash.get_history", alpha_scripthash(escrow)):
        tx = await raw_utxo(devnet, entry["tx_hash"])
        spent = 0
        for vin in tx.vin:
            funding = await raw_utxo(devnet, b2lx(vin.prevout.hash))
            out = funding.vout[vin.prevout.n]
            if bytes(out.scriptPubKey) == script:
                spent += out.nValue
        if spent:
            spends.append(Spend(entry["tx_hash"], spent - sum(out.nValue for out in tx.vout)))
    return spends


# --------------------------------------------------------------------------- waiting


async def until(check: Callable[[], Awaitable[Any]], what: str, stack: EvmStack, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{stack.logs()}")


async def settled(harness: Harness, stack: EvmStack, chain: ReorgChain) -> None:
    """The engine has handled the chain's current tip, so the watcher's head is the node's."""
    height, tip = await chain.tip()

    async def engine_at_tip() -> bool:
        conn = await asyncpg.connect(harness.database_url)
        try:
            row = await conn.fetchrow("SELECT height, hash FROM engine.chain_tips WHERE chain = $1", chain.name)
        finally:
            await conn.close()
        return row is not None and row["height"] == height and row["hash"].lower() == tip.lower()

    await until(engine_at_tip, f"the engine at {chain.name}'s tip {height}", stack)


async def transfers_of(deal: Deal, chain: str, purposes: set[str] | None = None) -> list[dict[str, Any]]:
    return [
        t
        for t in (await deal.status())["transfers"]
        if t["chainId"] == chain and (purposes is None or t["purpose"] in purposes)
    ]


async def broadcast(deal: Deal, chain: ReorgChain, purposes: set[str]) -> dict[str, str]:
    """purpose → txid of the deal's transfers on `chain`, once each is signed and known to the node."""

    async def ready() -> dict[str, str] | None:
        found = {t["purpose"]: t["txid"] for t in await transfers_of(deal, chain.name, purposes) if t["txid"]}
        if set(found) != purposes:
            return None
        return found if all([await chain.known(txid) for txid in found.values()]) else None

    found: dict[str, str] = await until(ready, f"{sorted(purposes)} broadcast on {chain.name}", deal.stack)
    return found


async def deposited(deal: Deal, party: str) -> int:
    text = (await deal.status())["collection"][party.lower()]["deposited"]
    return 0 if text == "0" else deal.units(party, text)  # parse_amount refuses zero, as the API must


async def stage_is(deal: Deal, stage: str) -> bool:
    return bool((await deal.status())["stage"] == stage)


# --------------------------------------------------------------------------- one deal


@dataclass
class Case:
    harness: Harness
    stack: EvmStack
    chain: ReorgChain
    depth: int
    deal: Deal
    #: Heights where the case began, for reading what left the EVM escrows.
    since: dict[str, int]
    #: What each escrow received on chain (deposits a reorg took away excluded).
    received: dict[str, int]
    operator_before: dict[str, int]

    @classmethod
    async def start(cls, harness: Harness, stack: EvmStack, chain_name: str, depth: int, timeout: int = 600) -> Case:
        assert depth < THRESHOLD[chain_name]
        chain = ReorgChain(stack, chain_name)
        asset, amount, _ = ALICE_SIDE[chain_name]
        deal = await Deal.create(stack, (chain_name, asset, amount), BOB_SIDE, timeout=timeout)
        await deal.fill()
        since = {name: (await evm_tip(stack, name))[0] for name in ("ETH", "POLYGON")}
        operator = {"ETH": await stack.eth.balance(OPERATOR_EVM), chain_name: await chain.balance(operator_of(chain))}
        return cls(harness, stack, chain, depth, deal, since, {"ALICE": 0, "BOB": 0}, operator)

    async def alice_pays(self, amount: int | None = None) -> str:
        amount = amount if amount is not None else await self.deal.required("ALICE")
        return await self.chain.deposit(await self.deal.escrow("ALICE"), amount)

    async def bob_pays(self) -> str:
        amount = await self.deal.required("BOB")
        self.received["BOB"] += amount
        return await evm_send(self.stack, "ETH", FUNDER["BOB"], await self.deal.escrow("BOB"), amount)

    async def mine_eth(self, blocks: int = 1) -> None:
        await self.stack.eth.call("anvil_mine", hex(blocks))

    async def settled(self) -> None:
        await settled(self.harness, self.stack, self.chain)

    async def finish(self, stage: str, outcome: str) -> dict[str, Any]:
        self.stack.miner.start()
        final = await self.deal.wait(stage, outcome=outcome, timeout=WAIT * 2)

        async def all_confirmed() -> bool:
            return all(t["status"] in ("CONFIRMED", "SKIPPED") for t in (await self.deal.status())["transfers"])

        await until(all_confirmed, "every transfer confirmed", self.stack)
        await self.stack.miner.stop()
        return final

    async def paid_once(self) -> dict[str, list[Spend]]:
        """Every transaction out of each escrow is one of the deal's confirmed transfers, each exactly once."""
        transfers = (await self.deal.status())["transfers"]
        spends = {}
        for party, chain_name in (("ALICE", self.chain.name), ("BOB", "ETH")):
            escrow = await self.deal.escrow(party)
            if chain_name == self.chain.name:
                out = await self.chain.spends(escrow, self.since.get(chain_name, 0))
            else:
                out = await evm_spends(self.stack, chain_name, escrow, self.since["ETH"])
            txids = [s.txid for s in out]
            confirmed = [t["txid"] for t in transfers if t["chainId"] == chain_name and t["status"] == "CONFIRMED"]
            assert len(txids) == len(set(txids)), f"{party}: a transaction twice: {txids}"
            assert sorted(txids) == sorted(confirmed), f"{party}: on chain {txids}, confirmed transfers {confirmed}"
            spends[party] = out
            assert await self._balance(party, escrow) == 0, f"{party}'s escrow is not empty"
        return spends

    async def _balance(self, party: str, address: str) -> int:
        return await (self.chain.balance(address) if party == "ALICE" else self.stack.eth.balance(address))

    async def check_swapped(self) -> None:
        """Each side got the other's trade amount, the operator both commissions, the paybacks the rest."""
        spends = await self.paid_once()
        amounts = {"ALICE": self.deal.units("ALICE", ALICE_SIDE[self.chain.name][1]), "BOB": ETH // 5}
        commission = {party: amount * COMMISSION_BPS // 10_000 for party, amount in amounts.items()}
        assert await self.chain.balance(self.deal.recipient["BOB"]) == amounts["ALICE"]
        assert await self.stack.eth.balance(self.deal.recipient["ALICE"]) == amounts["BOB"]
        operator_gained = await self.chain.balance(operator_of(self.chain)) - self.operator_before[self.chain.name]
        assert operator_gained == commission["ALICE"]
        assert await self.stack.eth.balance(OPERATOR_EVM) - self.operator_before["ETH"] == commission["BOB"]
        for party in ("ALICE", "BOB"):
            fees = sum(s.fee for s in spends[party])
            expected = self.received[party] - amounts[party] - commission[party] - fees
            assert await self._balance(party, self.deal.payback[party]) == expected, party

    async def check_refunded(self) -> None:
        """Alice got back what she paid less the refund's own fee; nobody got anything else."""
        spends = await self.paid_once()
        [refund] = spends["ALICE"]
        assert await self.chain.balance(self.deal.payback["ALICE"]) == self.received["ALICE"] - refund.fee
        assert await self.chain.balance(self.deal.recipient["BOB"]) == 0
        assert await self.stack.eth.balance(self.deal.recipient["ALICE"]) == 0
        assert spends["BOB"] == []


def operator_of(chain: ReorgChain) -> str:
    return ALPHA_ADDRESS if chain.utxo else OPERATOR_EVM


# --------------------------------------------------------------------------- the stages


async def reorg_in_collection(case: Case) -> None:
    """Alice's deposit is seen in a block, then the block is replaced."""
    deal, chain = case.deal, case.chain
    need = await deal.required("ALICE")
    first = await case.alice_pays(need)
    await chain.mine(case.depth)  # `depth` confirmations: below the threshold
    await until(lambda: _equals(deposited(deal, "ALICE"), need), "Alice's deposit seen", case.stack)
    await case.settled()
    assert (await deal.status())["stage"] == "COLLECTION"
    # On the devnet the replaced deposit goes back to the pool (as a node does); anvil drops it.
    await chain.reorg(case.depth, [])
    await until(lambda: _equals(deposited(deal, "ALICE"), 0), "the deposit unmined", case.stack)
    status = await deal.status()
    assert status["stage"] == "COLLECTION" and status["expiresAt"] is not None
    assert not await chain.mined(first)
    if chain.utxo:
        assert await chain.known(first), "the devnet keeps the replaced deposit in its pool"
    else:
        assert not await chain.known(first), "anvil dropped the replaced deposit"
        await case.alice_pays(need)
    case.received["ALICE"] = need
    await case.bob_pays()
    await case.finish("CLOSED", "SWAPPED")
    await case.check_swapped()
    alice_deposits = (await deal.status())["collection"]["alice"]["deposits"]
    assert sum(deal.units("ALICE", d["amount"]) for d in alice_deposits if d["blockHeight"] is not None) == need
    # anvil's vanished deposit stays on the page as seen but not mined.
    assert [d["txid"] for d in alice_deposits if d["blockHeight"] is None] == ([] if chain.utxo else [first])


async def reorg_in_waiting(case: Case) -> None:
    """Both sides funded, neither locked; Alice's deposit is reorged away: back to COLLECTION, then done."""
    deal, chain = case.deal, case.chain
    need = await deal.required("ALICE")
    await case.bob_pays()
    await case.mine_eth()  # one confirmation of two
    first = await case.alice_pays(need)
    await chain.mine(case.depth)
    await until(lambda: stage_is(deal, "WAITING"), "WAITING", case.stack)
    await case.settled()
    await chain.reorg(case.depth, [first])
    await until(lambda: stage_is(deal, "COLLECTION"), "back to COLLECTION", case.stack)
    status = await deal.status()
    assert status["collection"]["alice"]["deposited"] == "0"
    assert status["expiresAt"] is not None, "the deadline runs again"
    assert not await chain.known(first)
    await case.alice_pays(need)
    case.received["ALICE"] = need
    await case.finish("CLOSED", "SWAPPED")
    await case.check_swapped()
    reasons = [e["detail"].get("reason") for e in (await deal.status())["events"] if e["type"] == "deal.stage_changed"]
    assert "a reorg took a side below its requirement" in reasons, reasons


async def reorg_in_swap(case: Case) -> None:
    """The swap payout is mined, then its block replaced: the same bytes are broadcast again, paid once."""
    deal, chain = case.deal, case.chain
    need = await deal.required("ALICE")
    await case.bob_pays()
    await case.alice_pays(need)
    case.received["ALICE"] = need
    await chain.mine(chain.threshold)
    await case.mine_eth(THRESHOLD["ETH"])
    await until(lambda: stage_is(deal, "SWAP"), "SWAP", case.stack)
    # The first phase out of Alice's escrow: payout and commission on EVM; the payout alone on UTXO.
    phase_one = {"SWAP_PAYOUT"} if chain.utxo else {"SWAP_PAYOUT", "COMMISSION"}
    first = await broadcast(deal, chain, phase_one)
    raw = {purpose: await chain.raw(txid) for purpose, txid in first.items()}
    await chain.mine(case.depth)
    blocks = {purpose: await chain.block_of(txid) for purpose, txid in first.items()}
    assert None not in blocks.values(), blocks
    await case.settled()
    assert (await deal.status())["stage"] == "SWAP"
    await chain.reorg(case.depth, list(first.values()))
    await case.finish("CLOSED", "SWAPPED")
    for purpose, txid in first.items():
        [again] = await transfers_of(deal, chain.name, {purpose})
        assert again["txid"] == txid, f"{purpose}: the same transaction, not a new one"
        assert await chain.raw(txid) == raw[purpose], f"{purpose}: the same signed bytes"
        assert await chain.block_of(txid) not in (None, blocks[purpose]), f"{purpose}: mined again, in a new block"
    await case.check_swapped()


async def reorg_in_reverted(case: Case) -> None:
    """The deadline passes with only Alice paid; her refund is mined, then reorged: refunded once."""
    deal, chain = case.deal, case.chain
    need = await deal.required("ALICE")
    await case.alice_pays(need)
    case.received["ALICE"] = need
    await chain.mine(chain.threshold)
    await until(lambda: stage_is(deal, "REVERTED"), "REVERTED", case.stack)
    first = (await broadcast(deal, chain, {"REFUND"}))["REFUND"]
    raw = await chain.raw(first)
    await chain.mine(case.depth)
    block = await chain.block_of(first)
    assert block is not None
    await case.settled()
    assert (await deal.status())["stage"] == "REVERTED"
    await chain.reorg(case.depth, [first])
    await case.finish("CLOSED", "REFUNDED")
    [refund] = await transfers_of(deal, chain.name, {"REFUND"})
    assert refund["txid"] == first and await chain.raw(first) == raw
    assert await chain.block_of(first) not in (None, block), "mined again, in a new block"
    await case.check_refunded()


async def reorg_in_closed(case: Case) -> None:
    """After the swap closed, a late deposit's return is mined, then reorged: returned once."""
    deal, chain = case.deal, case.chain
    need = await deal.required("ALICE")
    await case.bob_pays()
    await case.alice_pays(need)
    case.received["ALICE"] = need
    await case.finish("CLOSED", "SWAPPED")
    await case.check_swapped()
    payback_before = await chain.balance(deal.payback["ALICE"])
    late = 2 * ALICE_SIDE[chain.name][2]
    await case.alice_pays(late)
    await chain.mine(chain.threshold)
    first = (await broadcast(deal, chain, {"LATE_RETURN"}))["LATE_RETURN"]
    raw = await chain.raw(first)
    await chain.mine(case.depth)
    block = await chain.block_of(first)
    assert block is not None
    await case.settled()
    await chain.reorg(case.depth, [first])
    case.received["ALICE"] += late
    final = await case.finish("CLOSED", "SWAPPED")
    [returned] = [t for t in final["transfers"] if t["purpose"] == "LATE_RETURN"]
    assert returned["txid"] == first and await chain.raw(first) == raw
    assert await chain.block_of(first) not in (None, block), "mined again, in a new block"
    spends = await case.paid_once()
    [late_spend] = [s for s in spends["ALICE"] if s.txid == first]
    assert await chain.balance(deal.payback["ALICE"]) == payback_before + late - late_spend.fee
    assert await chain.balance(deal.recipient["BOB"]) == deal.units("ALICE", ALICE_SIDE[chain.name][1]), (
        "the swap is not paid again"
    )


SCENARIOS: dict[str, Callable[[Case], Awaitable[None]]] = {
    "COLLECTION": reorg_in_collection,
    "WAITING": reorg_in_waiting,
    "SWAP": reorg_in_swap,
    "REVERTED": reorg_in_reverted,
    "CLOSED": reorg_in_closed,
}


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("chain", "depth"), CHAIN_DEPTHS, ids=[f"{c}-depth{d}" for c, d in CHAIN_DEPTHS])
async def test_reorg_below_threshold(harness: Harness, stack: EvmStack, stage: str, chain: str, depth: int) -> None:
    started = time.monotonic()
    # A deadline short enough to pass while only Alice has paid; long for every other stage.
    case = await Case.start(harness, stack, chain, depth, timeout=6 if stage == "REVERTED" else 600)
    await SCENARIOS[stage](case)
    print(f"\nreorg of depth {depth} on {chain} in {stage}: {time.monotonic() - started:.1f}s")


# --------------------------------------------------------------------------- at the threshold


async def otc_cli(env: dict[str, str], *args: str) -> Any:
    """The operator's `otc` command with the services' connection settings; its --json output."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTC_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otc_cli",
        *args,
        "--json",
        env={**base, **{k: env[k] for k in ("OTC_DATABASE_URL", "OTC_NATS_URL", "OTC_REGISTRY_FILE")}},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"otc {' '.join(args)} exited {proc.returncode}\n{out.decode()}\n{err.decode()}"
    return json.loads(out)


async def alerts(nats_url: str, since: float) -> list[AlertRaised]:
    """The alerts in the ALERTS stream raised after `since` (a time.time())."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("ALERTS")
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg("ALERTS", seq)
            except nats.js.errors.NotFoundError:
                continue
            envelope, message = decode_envelope(msg.data or b"")
            if isinstance(message, AlertRaised) and envelope.occurred_at.timestamp() >= since:
                found.append(message)
        return found
    finally:
        await nc.close()


@pytest.mark.parametrize("chain_name", ["POLYGON", "UNICITY"])
async def test_reorg_at_threshold_halts_the_chain_until_resumed(
    harness: Harness, stack: EvmStack, chain_name: str
) -> None:
    """A locked deposit is reorged away: the engine halts the chain and alerts; no payout leaves it
    until `otc chain resume`; then the deal completes, paid once."""
    started_at = time.time()
    case = await Case.start(harness, stack, chain_name, THRESHOLD[chain_name] - 1)
    deal, chain = case.deal, case.chain
    need = await deal.required("ALICE")
    await case.bob_pays()
    await case.mine_eth()  # Bob funded but not locked, so the deal waits in WAITING
    locked = await case.alice_pays(need)
    await chain.mine(chain.threshold)
    await until(lambda: stage_is(deal, "WAITING"), "WAITING", stack)
    await until(lambda: _equals(_alice_locked(deal), True), "Alice's side locked", stack)  # confirmed to the threshold
    await case.settled()

    await chain.reorg(chain.threshold, [locked])
    await until(lambda: stage_is(deal, "COLLECTION"), "back to COLLECTION", stack)
    [halt] = await until(lambda: otc_cli(harness.env, "chain", "halts"), "the halt", stack)
    assert halt["chain"] == chain_name and f"reorg of depth {chain.threshold}" in halt["reason"], halt

    async def deep_reorg_alerts() -> list[AlertRaised]:
        return [a for a in await alerts(harness.nats_url, started_at) if a.kind == "deep_reorg_halt"]

    raised = await until(deep_reorg_alerts, "the alert published", stack)
    assert [(a.chain, a.source) for a in raised] == [(chain_name, "engine")], raised

    # Paid again and locked on both sides: Bob's ETH side pays out, Alice's halted side does not.
    await case.alice_pays(need)
    case.received["ALICE"] = need
    await chain.mine(chain.threshold)
    await case.mine_eth()
    await until(lambda: stage_is(deal, "SWAP"), "SWAP", stack)
    stack.miner.start()

    async def eth_side_done() -> bool:
        eth = await transfers_of(deal, "ETH")
        return bool(eth) and all(t["status"] == "CONFIRMED" for t in eth)

    await until(eth_side_done, "Bob's side paid out on ETH", stack)
    blocks_before = (await chain.tip())[0]
    await until(lambda: _at_least(chain.tip(), blocks_before + 2 * chain.threshold), "more blocks", stack)
    await stack.miner.stop()
    held = await transfers_of(deal, chain_name)
    assert held and {t["status"] for t in held} == {"PLANNED"}, held
    assert await chain.spends(await deal.escrow("ALICE"), case.since.get(chain_name, 0)) == [], (
        "nothing left the escrow on the halted chain"
    )
    assert (await deal.status())["stage"] == "SWAP"

    resumed = await otc_cli(harness.env, "chain", "resume", chain_name, "--yes")
    assert resumed["resumed"] is True and resumed["commanded"] >= 1 and resumed["deals"] == 1, resumed
    assert await otc_cli(harness.env, "chain", "halts") == []
    await case.finish("CLOSED", "SWAPPED")
    await case.check_swapped()


async def _alice_locked(deal: Deal) -> bool:
    return bool((await deal.status())["collection"]["alice"]["locked"])


async def _at_least(tip: Awaitable[tuple[int, str]], height: int) -> bool:
    return (await tip)[0] >= height


async def test_a_deposit_unmined_by_a_reorg_does_not_hold_a_reverted_deal_open() -> None:
    """The ledger rule behind the test below: only mined deposits are waited for before closing."""
    escrow = ledger.Escrow(
        deal_id="d",
        party=Party.ALICE,
        native=True,
        amount=10,
        commission=1,
        fee_reserve=1,
        confirmations_needed=3,
        tip_height=50,
        deposits=[ledger.DepositFact(amount=12, block_number=None, block_time=None)],
        transfers=[],
    )
    to = ledger.Destinations(counterparty_recipient="r", operator="o", payback="p", tank=None)
    assert ledger.next_steps(Stage.REVERTED, escrow, to) == ledger.Steps(complete=True)
    mined = msgspec.structs.replace(escrow, deposits=[ledger.DepositFact(amount=12, block_number=49, block_time=None)])
    assert ledger.next_steps(Stage.REVERTED, mined, to) == ledger.Steps(), "a mined deposit is waited for"


@pytest.mark.parametrize("chain_name", ["POLYGON", "UNICITY"])
async def test_deposit_unmined_by_a_reorg_when_the_deadline_passes(
    harness: Harness, stack: EvmStack, chain_name: str
) -> None:
    """The only deposit is unmined by a reorg, and the deadline passes: the deal has nothing to refund and
    closes REFUNDED rather than wait for that deposit forever. On POLYGON the deposit is gone for good; on
    UNICITY it went back to the pool and is mined again after the close: it is returned as a late deposit."""
    case = await Case.start(harness, stack, chain_name, 1, timeout=6)
    deal, chain = case.deal, case.chain
    need = await deal.required("ALICE")
    first = await case.alice_pays(need)
    await chain.mine(1)
    await until(lambda: _equals(deposited(deal, "ALICE"), need), "the deposit seen", stack)
    await case.settled()
    await chain.reorg(1, [] if chain.utxo else [first])
    await until(lambda: _equals(deposited(deal, "ALICE"), 0), "the deposit unmined", stack)
    final = await deal.wait("CLOSED", outcome="REFUNDED", timeout=WAIT)
    assert final["transfers"] == []
    if not chain.utxo:
        assert await case.paid_once() == {"ALICE": [], "BOB": []}
        assert await chain.balance(deal.payback["ALICE"]) == 0
        return
    assert await chain.known(first) and not await chain.mined(first)
    case.received["ALICE"] = need
    stack.miner.start()

    async def returned() -> bool:
        return [(t["purpose"], t["status"]) for t in (await deal.status())["transfers"]] == [
            ("LATE_RETURN", "CONFIRMED")
        ]

    await until(returned, "the deposit, mined again, returned", stack)
    await stack.miner.stop()
    spends = await case.paid_once()
    [late_return] = spends["ALICE"]
    assert [t["purpose"] for t in (await deal.status())["transfers"]] == ["LATE_RETURN"]
    assert await chain.balance(deal.payback["ALICE"]) == need - late_return.fee
    assert await chain.balance(deal.recipient["BOB"]) == 0
