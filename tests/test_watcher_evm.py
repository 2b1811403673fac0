"""The EVM chain watcher as a real process against anvil, NATS and PostgreSQL.

The tests feed it the way the engine and the queue processor do (EscrowAssigned, TransferSubmitted
on JetStream) and read what it publishes from the CHAIN stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import nats
import pytest
from eth_account import Account
from nats.aio.msg import Msg

from otc_cli import contracts
from otc_common import subjects
from otc_common.bus import Bus
from otc_common.messages import (
    ChainReorg,
    ChainTip,
    DepositObserved,
    EscrowAssigned,
    Message,
    Party,
    TransferSubmitted,
    TxConfirmation,
    UnregisteredTokenDeposit,
    decode_envelope,
    encode_envelope,
)
from tests.conftest import EvmChains
from tests.support import ServiceProcess, free_port, write_test_registry

M = TypeVar("M", bound=Message)
SCHEMA = "watcher_evm_eth"
#: The reorg window of the test registry's chains (the registry's default).
WINDOW = 64
ETH = 10**18
#: ETH's threshold in the test registry is 2: a followed tx is reported up to 2 confirmations, followed up to 4.
STOP_AT = 4
THRESHOLD = 2

# --------------------------------------------------------------------------- helpers


class Anvil:
    """JSON-RPC to an anvil node; its dev accounts are unlocked, so it signs for them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.AsyncClient(timeout=30)
        self.ids = itertools.count(1)

    async def call(self, method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": list(params)}
        reply = (await self.client.post(self.url, json=body)).json()
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    async def send(self, sender: str, to: str | None, value: int = 0, data: str = "0x", gas: int | None = None) -> str:
        tx: dict[str, Any] = {"from": sender, "value": hex(value), "data": data}
        if to is not None:
            tx["to"] = to
        if gas is not None:
            tx["gas"] = hex(gas)
        txid: str = await self.call("eth_sendTransaction", tx)
        return txid

    async def receipt(self, txid: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            receipt: dict[str, Any] | None = await self.call("eth_getTransactionReceipt", txid)
            if receipt is not None:
                return receipt
            await asyncio.sleep(0.01)
        raise AssertionError(f"{txid} not mined within {timeout}s")

    async def block(self, number: int | str) -> dict[str, Any]:
        tag = number if isinstance(number, str) else hex(number)
        block: dict[str, Any] = await self.call("eth_getBlockByNumber", tag, False)
        return block

    async def height(self) -> int:
        return int(await self.call("eth_blockNumber"), 16)

    async def mine(self, blocks: int = 1) -> None:
        await self.call("anvil_mine", hex(blocks))

    async def deploy_forwarder(self, target: str, deployer: int = 0) -> str:
        """A contract wallet that passes any value it receives on to `target` (an internal transfer)."""
        # CALL(gas, target, callvalue, 0, 0, 0, 0); POP; STOP
        runtime = "6000600060006000" + "34" + "73" + target[2:].lower() + "5af15000"
        size = len(runtime) // 2
        init = f"60{size:02x}80600b6000396000f3" + runtime
        receipt = await self.receipt(await self.send(contracts.anvil_address(deployer), None, data="0x" + init))
        address: str = receipt["contractAddress"]
        return address

    async def close(self) -> None:
        await self.client.aclose()


@dataclass
class Feed:
    """Everything published on the CHAIN stream, in stream order."""

    events: list[tuple[str, Message]] = field(default_factory=list)

    async def on_message(self, msg: Msg) -> None:
        envelope, message = decode_envelope(msg.data)
        self.events.append((envelope.event_id, message))

    def of(self, kind: type[M]) -> list[M]:
        return [message for _, message in self.events if isinstance(message, kind)]

    def deposits(self, txid: str) -> list[DepositObserved]:
        return [d for d in self.of(DepositObserved) if d.txid == txid]

    def confirmations(self, txid: str) -> list[int]:
        return [c.confirmations for c in self.of(TxConfirmation) if c.txid == txid]

    def tip(self) -> int:
        tips = self.of(ChainTip)
        return tips[-1].height if tips else -1

    async def wait(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not observed within {timeout}s: {what}")

    async def wait_tip(self, height: int, timeout: float = 20.0) -> None:
        await self.wait(lambda: self.tip() >= height, f"chain tip {height}", timeout)


@dataclass
class Harness:
    env: dict[str, str]
    work_dir: Path
    anvil: Anvil
    bus: Bus
    feed: Feed
    db: asyncpg.Connection
    usdt: str
    deals: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def watcher(self, **extra: str) -> ServiceProcess:
        env = {**self.env, "OTC_POLL_INTERVAL_MS": "50", **extra}
        return ServiceProcess("watcher-evm-eth", ["-m", "otc_watcher_evm", "--chain", "ETH"], env, self.work_dir)

    async def assign(self, address: str, asset: str = "ETH", assigned_at: datetime | None = None) -> None:
        """As the engine does; `assigned_at`: when the engine did, for an event that reaches the watcher late."""
        number = next(self.deals)
        assigned = EscrowAssigned(
            deal_id=f"deal-{number}",
            party=Party.ALICE,
            chain="ETH",
            asset=asset,
            address=address,
            escrow_index=number,
        )
        await self.bus.js.publish(
            subjects.deal(f"deal-{number}"), encode_envelope(assigned, occurred_at=assigned_at or datetime.now(UTC))
        )

    async def follow(self, *txids: str, transfer_id: str = "transfer-1") -> None:
        await self.bus.publish(
            subjects.queue_result("ETH"),
            TransferSubmitted(
                transfer_id=transfer_id, deal_id="deal-x", chain="ETH", txid=txids[0], candidates=list(txids)
            ),
        )

    async def wait_db(self, query: str, expected: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = await self.db.fetchval(query)
            except asyncpg.UndefinedTableError:
                value = None
            if value == expected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{query} = {value!r}, expected {expected!r}")

    async def wait_watching(self, count: int) -> None:
        """The watcher has taken `count` escrows into its watch set and re-checked them."""
        await self.wait_db(f"SELECT count(*) FROM {SCHEMA}.balances", count)

    async def wait_following(self, txid: str) -> None:
        await self.wait_db(f"SELECT checked FROM {SCHEMA}.followed WHERE txid = '{txid}'", True)


def new_address() -> str:
    return str(Account.create().address)


@contextlib.asynccontextmanager
async def open_harness(env: dict[str, str], work_dir: Path, rpc_url: str, usdt: str) -> AsyncIterator[Harness]:
    bus = await Bus.connect(env["OTC_NATS_URL"], "test")
    await bus.provision_streams()
    feed = Feed()
    nc = await nats.connect(env["OTC_NATS_URL"])
    subscription = await nc.jetstream().subscribe("otc.chain.>", ordered_consumer=True, cb=feed.on_message)
    anvil = Anvil(rpc_url)
    db = await asyncpg.connect(env["OTC_DATABASE_URL"])
    try:
        yield Harness(env, work_dir, anvil, bus, feed, db, usdt)
    finally:
        await subscription.unsubscribe()
        await nc.close()
        await bus.close()
        await anvil.close()
        await db.close()


@pytest.fixture
async def harness(evm_env: dict[str, str], evm_chains: EvmChains, work_dir: Path) -> AsyncIterator[Harness]:
    async with open_harness(evm_env, work_dir, evm_chains.rpc["ETH"], evm_chains.usdt["ETH"]) as opened:
        yield opened


@pytest.fixture
async def watcher(harness: Harness) -> AsyncIterator[ServiceProcess]:
    process = harness.watcher()
    await process.start()
    # The first block it processes is the tip it found at its start.
    await harness.feed.wait_tip(await harness.anvil.height())
    try:
        yield process
    finally:
        await process.stop()


async def metric_values(process: ServiceProcess) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{process.url}/metrics", timeout=5)).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# --------------------------------------------------------------------------- deposits


async def test_native_token_and_unregistered_token_deposits(harness: Harness, watcher: ServiceProcess) -> None:
    anvil, feed = harness.anvil, harness.feed
    alice, bob = new_address(), new_address()
    await harness.assign(alice, "ETH")
    await harness.assign(bob, "USDT")
    await harness.wait_watching(2)

    native_tx = await anvil.send(contracts.anvil_address(1), alice, 15 * ETH // 10)
    token_tx = contracts.transfer(anvil.url, harness.usdt, bob, 250 * 10**6, contracts.ANVIL_PRIVATE_KEYS[2])
    other = contracts.deploy_test_token(anvil.url, "Other", "OTH", 18, contracts.ANVIL_PRIVATE_KEYS[0])
    other_tx = contracts.mint(anvil.url, other, bob, 7 * ETH, contracts.ANVIL_PRIVATE_KEYS[0])
    await anvil.send(contracts.anvil_address(3), new_address(), ETH)  # not watched
    await feed.wait(lambda: bool(feed.of(UnregisteredTokenDeposit)), "the unregistered token")
    await feed.wait_tip(await anvil.height())

    receipt = await anvil.receipt(native_tx)
    block = await anvil.block(receipt["blockNumber"])
    [native] = feed.deposits(native_tx)
    assert (native.address, native.asset, native.amount, native.index) == (alice, "ETH", 15 * ETH // 10, -1)
    assert native.block_number == int(receipt["blockNumber"], 16)
    assert native.block_hash == block["hash"]
    assert native.block_time == int(block["timestamp"], 16)

    token_receipt = await anvil.receipt(token_tx)
    [token] = feed.deposits(token_tx)
    assert (token.address, token.asset, token.amount) == (bob, "USDT", 250 * 10**6)
    assert token.index == int(token_receipt["logs"][0]["logIndex"], 16)
    assert token.block_hash == token_receipt["blockHash"]

    [ignored] = feed.of(UnregisteredTokenDeposit)
    assert (ignored.address, ignored.contract, ignored.amount, ignored.txid) == (bob, other, 7 * ETH, other_tx)
    assert feed.deposits(other_tx) == [], "an unregistered token must never be counted"
    assert len(feed.of(DepositObserved)) == 2

    heights = [tip.height for tip in feed.of(ChainTip)]
    assert heights == list(range(heights[0], heights[0] + len(heights))), "a tip per block, in order"


async def test_internal_transfers_and_escrows_watched_late(harness: Harness, watcher: ServiceProcess) -> None:
    anvil, feed = harness.anvil, harness.feed
    escrow = new_address()
    await harness.assign(escrow)
    await harness.wait_watching(1)
    forwarder = await anvil.deploy_forwarder(escrow)
    via_contract = await anvil.send(contracts.anvil_address(1), forwarder, 2 * ETH, gas=100_000)
    receipt = await anvil.receipt(via_contract)
    await feed.wait(lambda: len([d for d in feed.of(DepositObserved) if d.index == -2]) >= 1, "internal transfer")
    [internal] = [d for d in feed.of(DepositObserved) if d.index == -2]
    assert (internal.address, internal.amount, internal.asset) == (escrow, 2 * ETH, "ETH")
    assert internal.block_hash == receipt["blockHash"]
    assert internal.txid == f"internal:{receipt['blockHash']}:{escrow.lower()}"
    assert feed.deposits(via_contract) == [], "the transaction went to the contract, not the escrow"

    # A payout lowers the balance: nothing to report.
    await anvil.call("anvil_impersonateAccount", escrow)
    await anvil.send(escrow, new_address(), ETH // 2)
    await anvil.call("anvil_stopImpersonatingAccount", escrow)

    # Money that reached an escrow before the watcher heard of it, directly and through a contract.
    late = new_address()
    late_forwarder = await anvil.deploy_forwarder(late)
    direct_tx = await anvil.send(contracts.anvil_address(2), late, 3 * ETH)
    internal_tx = await anvil.send(contracts.anvil_address(2), late_forwarder, ETH // 4, gas=100_000)
    token_tx = contracts.transfer(anvil.url, harness.usdt, late, 42 * 10**6, contracts.ANVIL_PRIVATE_KEYS[3])
    await anvil.mine(2)
    await feed.wait_tip(await anvil.height())
    await harness.assign(late)
    await feed.wait(lambda: len([d for d in feed.of(DepositObserved) if d.address == late]) >= 3, "late deposits")
    await anvil.mine(3)
    await feed.wait_tip(await anvil.height())

    late_deposits = sorted(
        (d.index, d.asset, d.amount, d.block_number) for d in feed.of(DepositObserved) if d.address == late
    )
    direct_block = int((await anvil.receipt(direct_tx))["blockNumber"], 16)
    internal_block = int((await anvil.receipt(internal_tx))["blockNumber"], 16)
    token_receipt = await anvil.receipt(token_tx)
    assert late_deposits == [
        (-2, "ETH", ETH // 4, internal_block),
        (-1, "ETH", 3 * ETH, direct_block),
        (int(token_receipt["logs"][0]["logIndex"], 16), "USDT", 42 * 10**6, int(token_receipt["blockNumber"], 16)),
    ]
    assert [d for d in feed.of(DepositObserved) if d.address == escrow] == [internal], "the payout is no deposit"


async def test_escrows_learned_of_after_the_window_moved_past_their_deposits(
    harness: Harness, watcher: ServiceProcess
) -> None:
    """The watch set can learn of an escrow late: its watcher was down, or a deal event waited out a dead
    consumer's ack timeout. Deposits made since the assignment count even when the window no longer
    holds their blocks (the chaos run once left a deal's tokens in its escrow this way)."""
    anvil, feed = harness.anvil, harness.feed
    late = new_address()
    assigned_at = datetime.now(UTC)
    native_tx = await anvil.send(contracts.anvil_address(2), late, 3 * ETH)
    token_tx = contracts.transfer(anvil.url, harness.usdt, late, 42 * 10**6, contracts.ANVIL_PRIVATE_KEYS[3])
    native_block = int((await anvil.receipt(native_tx))["blockNumber"], 16)
    token_receipt = await anvil.receipt(token_tx)
    await anvil.mine(WINDOW + 5)
    await feed.wait_tip(await anvil.height())
    first_kept = await harness.db.fetchval(f"SELECT min(number) FROM {SCHEMA}.blocks")
    assert first_kept > max(native_block, int(token_receipt["blockNumber"], 16)), "both left the window"

    await harness.assign(late, "USDT", assigned_at=assigned_at)
    await feed.wait(lambda: len([d for d in feed.of(DepositObserved) if d.address == late]) >= 2, "both deposits")
    await anvil.mine(2)
    await feed.wait_tip(await anvil.height())
    found = sorted(
        (d.txid, d.index, d.asset, d.amount, d.block_number) for d in feed.of(DepositObserved) if d.address == late
    )
    assert found == sorted(
        [
            (native_tx, -1, "ETH", 3 * ETH, native_block),
            (
                token_tx,
                int(token_receipt["logs"][0]["logIndex"], 16),
                "USDT",
                42 * 10**6,
                int(token_receipt["blockNumber"], 16),
            ),
        ]
    )


# --------------------------------------------------------------------------- followed transactions


def failing_token_transfer(to: str) -> str:
    """Calldata of an ERC-20 transfer far above any balance: mined, but reverted."""
    return "0xa9059cbb" + to[2:].lower().rjust(64, "0") + f"{10**30:064x}"


async def test_followed_transactions_are_confirmed_up_to_the_threshold(
    harness: Harness, watcher: ServiceProcess
) -> None:
    anvil, feed = harness.anvil, harness.feed
    # Mined before the watcher hears of it, as when the node is faster than the bus.
    early = await anvil.send(contracts.anvil_address(4), new_address(), ETH)
    early_block = int((await anvil.receipt(early))["blockNumber"], 16)
    await harness.follow(early, transfer_id="t-early")
    await harness.wait_following(early)

    # Broadcast while already followed; one of them reverts.
    await anvil.call("evm_setAutomine", False)
    late = await anvil.send(contracts.anvil_address(5), new_address(), ETH)
    failing = await anvil.send(
        contracts.anvil_address(6), harness.usdt, data=failing_token_transfer(new_address()), gas=100_000
    )
    await harness.follow(late, "0x" + "ab" * 32, transfer_id="t-late")  # with a fee-bump candidate never mined
    await harness.follow(failing, transfer_id="t-failing")
    await harness.wait_following(failing)
    await anvil.mine(1)
    await anvil.call("evm_setAutomine", True)
    mined_at = await anvil.height()
    for _ in range(STOP_AT + 2):
        await anvil.mine(1)
        await feed.wait_tip(await anvil.height())

    assert feed.confirmations(late) == [1, 2], "counted per block up to the threshold"
    assert feed.confirmations(failing) == [1, 2]
    early_counts = feed.confirmations(early)
    first = mined_at - 1 - early_block + 1  # the tip when the watcher looked it up is at least this
    # Its first report (a look-up) at whatever depth, then block by block up to the threshold.
    assert 1 <= early_counts[0] <= first + 1
    assert early_counts == list(range(early_counts[0], max(early_counts[0], THRESHOLD) + 1))

    late_receipt = await anvil.receipt(late)
    [one] = [c for c in feed.of(TxConfirmation) if c.txid == late and c.confirmations == 1]
    assert one.success is True
    assert one.block_number == mined_at and one.block_hash == late_receipt["blockHash"]
    assert one.fee_paid == int(late_receipt["gasUsed"], 16) * int(late_receipt["effectiveGasPrice"], 16)
    assert {c.success for c in feed.of(TxConfirmation) if c.txid == failing} == {False}
    assert feed.confirmations("0x" + "ab" * 32) == []
    await harness.wait_db(f"SELECT count(*) FROM {SCHEMA}.followed WHERE NOT done", 0)


# --------------------------------------------------------------------------- reorgs


def signed_transfer(account: int, to: str, value: int, nonce: int) -> str:
    tx: dict[str, Any] = {
        "to": to,
        "value": value,
        "gas": 21_000,
        "maxFeePerGas": 10**11,
        "maxPriorityFeePerGas": 10**9,
        "nonce": nonce,
        "chainId": 31337,
        "type": 2,
    }
    raw = contracts.anvil_account(account).sign_transaction(tx).raw_transaction.hex()
    return raw if raw.startswith("0x") else "0x" + raw


async def test_reorg_unpublishes_removed_deposits_and_republishes_survivors(
    harness: Harness, watcher: ServiceProcess
) -> None:
    anvil, feed = harness.anvil, harness.feed
    dropped_to, kept_to = new_address(), new_address()
    await harness.assign(dropped_to)
    await harness.assign(kept_to)
    await harness.wait_watching(2)
    nonce = int(await anvil.call("eth_getTransactionCount", contracts.anvil_address(1), "pending"), 16)
    dropped_raw = signed_transfer(1, dropped_to, ETH, nonce)
    kept_raw = signed_transfer(2, kept_to, 2 * ETH, 0)
    dropped = await anvil.call("eth_sendRawTransaction", dropped_raw)
    dropped_block = int((await anvil.receipt(dropped))["blockNumber"], 16)
    await harness.follow(dropped, transfer_id="t-dropped")
    kept = await anvil.call("eth_sendRawTransaction", kept_raw)
    kept_receipt = await anvil.receipt(kept)
    top = await anvil.height()
    await feed.wait(lambda: bool(feed.deposits(kept)) and bool(feed.confirmations(dropped)), "deposits, confirmation")
    await feed.wait_tip(top)
    old_hashes = [(await anvil.block(n))["hash"] for n in range(dropped_block, top + 1)]
    depth = top - dropped_block + 1

    # Replace the blocks holding both deposits; only `kept` is mined again, in the first new block.
    await anvil.call("anvil_reorg", depth, [[kept_raw, 0]])
    await anvil.mine(1)
    await feed.wait(lambda: bool(feed.of(ChainReorg)), "the reorg")
    await feed.wait_tip(top + 1)

    [reorg] = feed.of(ChainReorg)
    assert reorg.depth == depth
    assert reorg.ancestor_height == dropped_block - 1
    assert reorg.ancestor_hash == (await anvil.block(dropped_block - 1))["hash"]
    assert reorg.removed_hashes == old_hashes
    assert reorg.new_tip_height == top + 1
    # Numbered, and everything reported after it says it followed it (the engine orders them by it).
    assert reorg.sequence == 1
    assert {t.reorgs for t in feed.of(ChainTip) if t.height > reorg.ancestor_height} >= {1}
    assert [t.reorgs for t in feed.of(ChainTip)][-1] == 1

    assert len(feed.deposits(dropped)) == 1, "a removed deposit is not published again"
    republished = feed.deposits(kept)
    new_receipt = await anvil.receipt(kept)
    assert [d.block_hash for d in republished] == [kept_receipt["blockHash"], new_receipt["blockHash"]]
    assert [d.reorgs for d in republished] == [0, 1]
    assert republished[1].block_number == dropped_block
    assert republished[1].amount == 2 * ETH

    # The followed transaction is unmined, and still followed: the same bytes mined again count anew.
    assert feed.confirmations(dropped)[-1] == 0
    [zero] = [c for c in feed.of(TxConfirmation) if c.txid == dropped and c.confirmations == 0]
    assert zero.block_hash is None and zero.block_number is None
    assert await anvil.call("eth_sendRawTransaction", dropped_raw) == dropped
    again = await anvil.receipt(dropped)
    await feed.wait(lambda: feed.confirmations(dropped)[-1] == 1, "confirmation after the re-broadcast")
    [after] = [c for c in feed.of(TxConfirmation) if c.txid == dropped and c.confirmations == 1][-1:]
    assert after.block_hash == again["blockHash"]
    events = [type(m).__name__ for _, m in feed.events]
    assert events.index("ChainReorg") < len(events) - 1 - events[::-1].index("DepositObserved")


# --------------------------------------------------------------------------- restarts and replicas


async def test_catches_up_after_downtime(harness: Harness) -> None:
    anvil, feed = harness.anvil, harness.feed
    process = harness.watcher()
    await process.start()
    await feed.wait_tip(await anvil.height())
    escrows = [new_address() for _ in range(3)]
    for escrow in escrows:
        await harness.assign(escrow)
    await harness.wait_watching(3)
    forwarder = await anvil.deploy_forwarder(escrows[0])
    await feed.wait_tip(await anvil.height())
    await process.stop()

    stopped_at = await anvil.height()
    native = [await anvil.send(contracts.anvil_address(1), escrows[i % 3], (i + 1) * ETH) for i in range(8)]
    token = contracts.transfer(anvil.url, harness.usdt, escrows[1], 5 * 10**6, contracts.ANVIL_PRIVATE_KEYS[2])
    internal = await anvil.send(contracts.anvil_address(3), forwarder, ETH, gas=100_000)
    newcomer = new_address()
    await harness.assign(newcomer)  # assigned while the watcher is down
    newcomer_tx = await anvil.send(contracts.anvil_address(4), newcomer, 7 * ETH)
    await anvil.receipt(newcomer_tx)
    await anvil.mine(20 - (await anvil.height() - stopped_at))
    assert await anvil.height() == stopped_at + 20

    restarted = harness.watcher()
    await restarted.start()
    try:
        await feed.wait_tip(stopped_at + 20)
        await feed.wait(lambda: bool(feed.deposits(newcomer_tx)), "the newcomer's deposit")
    finally:
        await restarted.stop()

    for i, txid in enumerate(native):
        [deposit] = feed.deposits(txid)
        assert (deposit.address, deposit.amount) == (escrows[i % 3], (i + 1) * ETH)
    assert [d.amount for d in feed.deposits(token)] == [5 * 10**6]
    internal_block = (await anvil.receipt(internal))["blockHash"]
    assert [d.amount for d in feed.deposits(f"internal:{internal_block}:{escrows[0].lower()}")] == [ETH]
    assert [d.amount for d in feed.deposits(newcomer_tx)] == [7 * ETH]
    tips = [t.height for t in feed.of(ChainTip) if t.height > stopped_at]
    assert tips == list(range(stopped_at + 1, stopped_at + 21)), "every missed block, once, in order"


async def test_two_replicas_publish_each_fact_once(harness: Harness) -> None:
    anvil, feed = harness.anvil, harness.feed
    first, second = harness.watcher(), harness.watcher()
    await asyncio.gather(first.start(), second.start())
    try:
        await feed.wait_tip(await anvil.height())
        escrows = [new_address() for _ in range(4)]
        for escrow in escrows:
            await harness.assign(escrow)
        await harness.wait_watching(4)
        forwarder = await anvil.deploy_forwarder(escrows[3])
        txids = [await anvil.send(contracts.anvil_address(1), escrows[i % 3], ETH + i) for i in range(6)]
        await harness.follow(txids[0], transfer_id="t-replicas")
        txids.append(contracts.transfer(anvil.url, harness.usdt, escrows[2], 10**6, contracts.ANVIL_PRIVATE_KEYS[2]))
        await anvil.send(contracts.anvil_address(3), forwarder, ETH, gas=100_000)
        await anvil.mine(3)
        await feed.wait_tip(await anvil.height())
        # One replica dies mid-stream; the other carries on alone.
        first.kill()
        txids += [await anvil.send(contracts.anvil_address(4), escrows[i % 3], 2 * ETH + i) for i in range(4)]
        await anvil.mine(STOP_AT)
        await feed.wait_tip(await anvil.height())
        await feed.wait(lambda: len(feed.of(DepositObserved)) >= len(txids) + 1, "all deposits")
        await asyncio.sleep(0.5)  # room for any duplicate to arrive
    finally:
        await asyncio.gather(first.stop(), second.stop())

    event_ids = [event_id for event_id, _ in feed.events]
    assert len(event_ids) == len(set(event_ids))
    facts = [(d.txid, d.index, d.block_hash) for d in feed.of(DepositObserved)]
    assert len(facts) == len(set(facts)) == len(txids) + 1
    assert {d.txid for d in feed.of(DepositObserved) if d.index != -2} == set(txids)
    heights = [t.height for t in feed.of(ChainTip)]
    assert len(heights) == len(set(heights))
    # Followed while blocks were being mined: the first report may come at any depth, then one per block.
    counted = feed.confirmations(txids[0])
    assert counted and counted == list(range(counted[0], max(counted[0], THRESHOLD) + 1)), counted


@contextlib.contextmanager
def pruning_anvil(work_dir: Path, states: int) -> Iterator[str]:
    """An anvil that, like a full (non-archive) node, serves the state of its last `states` blocks only."""
    from otc_cli.servers import find_anvil

    port = free_port()
    with (work_dir / f"anvil-pruned-{port}.log").open("ab") as log:
        proc = subprocess.Popen(
            [find_anvil(), "--port", str(port), "--chain-id", "31337", "--silent", "--prune-history", str(states)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_catches_up_on_a_node_without_old_state(service_env: dict[str, str], work_dir: Path) -> None:
    with pruning_anvil(work_dir, states=5) as url:
        registry = write_test_registry(work_dir / f"registry-pruned-{free_port()}.toml", url, eth_usdt=new_address())
        env = {**service_env, "OTC_REGISTRY_FILE": str(registry)}
        async with open_harness(env, work_dir, url, usdt="") as harness:
            anvil, feed = harness.anvil, harness.feed
            process = harness.watcher()
            await process.start()
            await feed.wait_tip(await anvil.height())
            escrow = new_address()
            await harness.assign(escrow)
            await harness.wait_watching(1)
            forwarder = await anvil.deploy_forwarder(escrow, deployer=1)
            await feed.wait_tip(await anvil.height())
            await process.stop()

            direct = await anvil.send(contracts.anvil_address(2), escrow, 3 * ETH)
            internal = await anvil.send(contracts.anvil_address(3), forwarder, ETH // 2, gas=100_000)
            internal_block = int((await anvil.receipt(internal))["blockNumber"], 16)
            await anvil.mine(30)
            top = await anvil.height()

            restarted = harness.watcher()
            await restarted.start()
            try:
                await feed.wait_tip(top)
                metrics = await metric_values(restarted)
            finally:
                await restarted.stop()

    assert [d.amount for d in feed.deposits(direct)] == [3 * ETH]
    [credit] = [d for d in feed.of(DepositObserved) if d.index == -2]
    # Credited in full, at the first block whose state the node still had.
    assert (credit.address, credit.amount) == (escrow, ETH // 2)
    assert internal_block <= credit.block_number <= top
    assert metrics['otc_watcher_balance_checks_deferred_total{chain="ETH"}'] > 0


# --------------------------------------------------------------------------- what the watcher keeps in memory


async def test_the_watcher_reads_its_state_again_only_after_a_change(harness: Harness, watcher: ServiceProcess) -> None:
    anvil, feed, db = harness.anvil, harness.feed, harness.db
    escrows = [new_address() for _ in range(3)]
    for escrow in escrows:
        await harness.assign(escrow)
    await harness.wait_watching(3)
    await anvil.mine(1)
    await feed.wait_tip(await anvil.height())

    async def reloads() -> tuple[float, float]:
        values = await metric_values(watcher)
        name = 'otc_watcher_state_reloads_total{chain="ETH",kind="%s"}'
        return values.get(name % "all", 0.0), values.get(name % "changes", 0.0)

    async def counted(name: str) -> int:
        return int(await db.fetchval(f"SELECT version FROM {SCHEMA}.feed WHERE name = $1", name))

    settled = await reloads()
    await anvil.mine(5)
    await feed.wait_tip(await anvil.height())
    assert await reloads() == settled, "blocks alone change nothing the watcher did not write itself"

    # Others' changes are counted in their own transaction; a statement that changed nothing is not.
    watch_set = await counted("watch_set")
    await db.execute(
        f"""INSERT INTO {SCHEMA}.watch_set (address, deal_id, party, asset, escrow_index)
            VALUES ($1, 'again', 'ALICE', 'ETH', 1) ON CONFLICT (address) DO NOTHING""",
        escrows[0],
    )
    assert await counted("watch_set") == watch_set
    late = new_address()
    await harness.assign(late)
    await harness.wait_watching(4)
    assert await counted("watch_set") == watch_set + 1
    deposit = await anvil.send(contracts.anvil_address(1), late, ETH)
    await feed.wait(lambda: bool(feed.deposits(deposit)), "the new escrow's deposit")
    everything, _ = await reloads()
    assert everything > settled[0], "a new escrow: the watch set is read again"

    # A new follow, or anyone moving the stored head (another replica, a rescan), costs only what changed.
    settled = await reloads()
    followed = await counted("followed")
    txid = await anvil.send(contracts.anvil_address(2), new_address(), ETH)
    await harness.follow(txid, transfer_id="t-reload")
    await harness.wait_following(txid)
    assert await counted("followed") == followed + 1
    await feed.wait(lambda: bool(feed.confirmations(txid)), "the follow's confirmation")
    await db.execute(f"UPDATE {SCHEMA}.head SET version = version + 1")
    await anvil.mine(1)
    await feed.wait_tip(await anvil.height())
    everything, changes = await reloads()
    assert everything == settled[0] and changes > settled[1]
    tips = [tip.height for tip in feed.of(ChainTip)]
    assert tips == list(range(tips[0], tips[0] + len(tips))), "a tip per block, in order"


# --------------------------------------------------------------------------- cost and failures


async def test_rpc_calls_per_block_do_not_grow_with_the_watch_set(
    harness: Harness, watcher: ServiceProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    anvil, feed = harness.anvil, harness.feed
    measured: dict[int, tuple[float, dict[str, float], float]] = {}
    assigned = 0
    for size in (10, 1000):
        while assigned < size:
            batch = min(100, size - assigned)
            await asyncio.gather(*(harness.assign(new_address()) for _ in range(batch)))
            assigned += batch
        await harness.wait_watching(size)
        await anvil.send(contracts.anvil_address(1), new_address(), ETH)  # not every block is empty
        await feed.wait_tip(await anvil.height())
        before = await metric_values(watcher)
        blocks = 20
        await anvil.mine(blocks)
        await feed.wait_tip(await anvil.height())
        after = await metric_values(watcher)

        def delta(name: str, before: dict[str, float] = before, after: dict[str, float] = after) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        processed = delta('otc_watcher_blocks_total{chain="ETH"}')
        idle = delta('otc_watcher_idle_polls_total{chain="ETH"}')
        calls = {
            name.split('method="')[1].rstrip('"}'): delta(name)
            for name in after
            if name.startswith("otc_watcher_rpc_calls_total{")
        }
        # An idle poll is counted as a call when it is sent and as idle when its answer comes: one may be
        # in flight at either reading.
        fetches = calls.get("eth_getBlockByNumber", 0.0) - idle
        assert processed - 1 <= fetches <= processed + 1, (fetches, processed)
        used = {method for method, count in calls.items() if count}
        assert used == {"eth_getBlockByNumber", "eth_getLogs", "eth_call"}, used
        per_block = (processed + calls["eth_getLogs"] + calls["eth_call"]) / processed
        cpu = delta('otc_watcher_block_cpu_seconds_sum{chain="ETH"}') / delta(
            'otc_watcher_block_cpu_seconds_count{chain="ETH"}'
        )
        assert processed == blocks
        reloads = [name for name in after if name.startswith("otc_watcher_state_reloads_total{")]
        assert sum(delta(name) for name in reloads) == 0, "nothing changed: nothing read again"
        measured[size] = (per_block, {k: v for k, v in calls.items() if v}, cpu)

    with capsys.disabled():
        for size, (per_block, calls, cpu) in measured.items():
            print(
                f"\n{size:>5} escrows: {per_block:.2f} RPC calls per block "
                f"(over 20 blocks: {calls}, idle polls included), CPU {cpu * 1000:.2f} ms per block"
            )
    assert measured[10][0] == measured[1000][0] == 3.0  # block, logs, balance check


async def test_unreachable_node_is_retried_and_the_service_stays_live(
    service_env: dict[str, str], work_dir: Path
) -> None:
    # The plain test registry points ETH at a closed port.
    process = ServiceProcess("watcher-evm-down", ["-m", "otc_watcher_evm", "--chain", "ETH"], service_env, work_dir)
    await process.start()
    try:
        deadline = time.monotonic() + 20
        errors = 0.0
        while time.monotonic() < deadline and errors < 3:
            errors = (await metric_values(process)).get('otc_chain_rpc_errors_total{chain="ETH"}', 0.0)
            await asyncio.sleep(0.1)
        assert errors >= 3, "failures are counted and retried"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{process.url}/healthz", timeout=5)).status_code == 200
        assert process.proc is not None and process.proc.poll() is None
    finally:
        assert await process.stop() == 0
    own = [line for line in process.log_path.read_text().splitlines() if '"logger":"otc.watcher.evm"' in line]
    assert own and all("chain rpc failed" in line and "Traceback" not in line for line in own)
    assert "127.0.0.1:1" not in "\n".join(own), "the node URL (it may hold an API key) is never logged"


# --------------------------------------------------------------------------- the balance reader


async def test_balance_reader_reads_ten_thousand_escrows_in_one_call_at_any_block(evm_chains: EvmChains) -> None:
    from prometheus_client import REGISTRY

    from otc_watcher_evm import rules
    from otc_watcher_evm.rpc import EvmRpc

    url = evm_chains.rpc["ETH"]
    anvil = Anvil(url)
    funded = [contracts.anvil_address(i).lower() for i in range(3)]
    strangers = sorted(new_address().lower() for _ in range(10_000 - len(funded)))
    addresses = [*funded, *strangers]

    def calls(chain: str) -> float:
        return REGISTRY.get_sample_value("otc_watcher_rpc_calls_total", {"chain": chain, "method": "eth_call"}) or 0.0

    rpc = EvmRpc("READER", url, 30.0)
    split = EvmRpc("READER-SPLIT", url, 30.0, balance_call_addresses=2)
    try:
        before_hash = (await anvil.block("latest"))["hash"]
        before = {a: int(await anvil.call("eth_getBalance", a, "latest"), 16) for a in funded}
        await anvil.receipt(await anvil.send(funded[0], strangers[0], 3 * ETH))

        # anvil holds an eth_call to its 30M block gas limit unless told otherwise: 10,000 need about 30.2M.
        now = await rpc.balances(addresses, None)
        assert calls("READER") == 1
        assert len(now) == 10_000
        assert {a: now[a] for a in funded[1:]} == {a: before[a] for a in funded[1:]}
        assert now[funded[0]] == int(await anvil.call("eth_getBalance", funded[0], "latest"), 16) < before[funded[0]]
        assert now[strangers[0]] == 3 * ETH
        assert all(now[a] == 0 for a in strangers[1:])

        then = await rpc.balances(addresses[:5], before_hash)
        assert then == {**before, strangers[0]: 0, strangers[1]: 0}

        assert await split.balances(addresses[:5], None) == {a: now[a] for a in addresses[:5]}
        assert calls("READER-SPLIT") == 3

        # The gas given covers what the node says the call needs.
        for count in (1, 1_000):
            call = rules.balance_call(addresses[:count])
            needed = await anvil.call(
                "eth_estimateGas", {"to": call["to"], "data": call["data"]}, "latest", rules.BALANCE_READER_OVERRIDE
            )
            assert int(needed, 16) <= rules.balance_call_gas(count) < int(needed, 16) * 11 // 10
    finally:
        await rpc.close()
        await split.close()
        await anvil.close()


# --------------------------------------------------------------------------- new heads


class WebSocketRelay:
    """A WebSocket endpoint in front of anvil's that can drop its connections and refuse new ones."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.open = True
        self.subscribes = 0
        self._sockets: set[Any] = set()
        self._runner: Any = None
        self.url = ""

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/", self._relay)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}/"

    async def _relay(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        if not self.open:
            return web.Response(status=503)
        inbound = web.WebSocketResponse()
        await inbound.prepare(request)
        self._sockets.add(inbound)
        async with aiohttp.ClientSession() as session, session.ws_connect(self.target) as outbound:

            async def downstream() -> None:
                async for message in outbound:
                    await inbound.send_str(message.data)

            pump = asyncio.create_task(downstream())
            try:
                async for message in inbound:
                    if message.type is aiohttp.WSMsgType.TEXT and "eth_subscribe" in message.data:
                        self.subscribes += 1
                    await outbound.send_str(message.data)
            finally:
                pump.cancel()
                self._sockets.discard(inbound)
        return inbound

    async def drop(self) -> None:
        self.open = False
        for socket in list(self._sockets):
            await socket.close()

    async def close(self) -> None:
        await self.drop()
        if self._runner is not None:
            await self._runner.cleanup()


async def tip_delay(harness: Harness) -> float:
    """Seconds from mining one block to the watcher's tip event for it."""
    await harness.anvil.mine(1)
    mined = time.monotonic()
    await harness.feed.wait_tip(await harness.anvil.height(), timeout=10)
    return time.monotonic() - mined


async def test_new_heads_wake_the_watcher_long_before_its_poll(harness: Harness) -> None:
    process = harness.watcher(OTC_POLL_INTERVAL_MS="5000")
    await process.start()
    try:
        await harness.feed.wait_tip(await harness.anvil.height(), timeout=15)
        await harness.feed.wait(
            lambda: "new-head subscription open" in process.log_path.read_text(), "the subscription", timeout=10
        )
        delays = [await tip_delay(harness) for _ in range(5)]
        metrics = await metric_values(process)
    finally:
        await process.stop()
    assert max(delays) < 1.0, delays
    assert metrics['otc_watcher_head_subscription_up{chain="ETH"}'] == 1
    assert metrics['otc_watcher_head_notifications_total{chain="ETH"}'] >= 5
    heights = [tip.height for tip in harness.feed.of(ChainTip)]
    assert heights == list(range(heights[0], heights[0] + len(heights))), "a tip per block, in order"


async def test_polling_finds_every_block_when_the_websocket_endpoint_is_unreachable(harness: Harness) -> None:
    process = harness.watcher(OTC_WS_URL=f"ws://127.0.0.1:{free_port()}")
    await process.start()
    try:
        start = await harness.anvil.height()
        await harness.feed.wait_tip(start)
        for _ in range(3):
            await harness.anvil.mine(1)
            await harness.feed.wait_tip(await harness.anvil.height(), timeout=10)
        await asyncio.sleep(1.5)  # long enough for a few reconnection attempts
        metrics = await metric_values(process)
    finally:
        await process.stop()
    assert metrics['otc_watcher_head_subscription_up{chain="ETH"}'] == 0
    heights = [tip.height for tip in harness.feed.of(ChainTip)]
    assert heights == list(range(start, start + 4))
    lines = process.log_path.read_text().splitlines()
    warnings = [line for line in lines if "new-head subscription unavailable" in line]
    assert len(warnings) == 1, "reported once, not at every attempt"
    assert "ConnectionRefused" in warnings[0] or "ClientConnector" in warnings[0], warnings[0]
    assert "127.0.0.1" not in "\n".join(line for line in lines if "new-head" in line), "the URL is never logged"
    assert "Traceback" not in "\n".join(lines)


async def test_a_dropped_subscription_loses_no_block_and_is_reopened(harness: Harness, evm_chains: EvmChains) -> None:
    relay = WebSocketRelay(evm_chains.rpc["ETH"].replace("http://", "ws://"))
    await relay.start()
    process = harness.watcher(OTC_POLL_INTERVAL_MS="1500", OTC_WS_URL=relay.url)
    await process.start()
    try:
        start = await harness.anvil.height()
        await harness.feed.wait_tip(start, timeout=15)
        await harness.feed.wait(lambda: relay.subscribes == 1, "the first subscription", timeout=10)
        assert await tip_delay(harness) < 1.0

        await relay.drop()
        await harness.anvil.mine(3)
        await harness.feed.wait_tip(await harness.anvil.height(), timeout=10)  # found by polling
        relay.open = True
        await harness.feed.wait(lambda: relay.subscribes == 2, "the subscription reopened", timeout=15)
        await asyncio.sleep(0.2)  # the reopened subscription's first wake-up passes
        assert await tip_delay(harness) < 1.0
    finally:
        await process.stop()
        await relay.close()
    heights = [tip.height for tip in harness.feed.of(ChainTip)]
    assert heights == list(range(start, start + 6)), "every block once, in order"
    log_text = process.log_path.read_text()
    assert "new-head subscription unavailable" in log_text and "new-head subscription restored" in log_text
