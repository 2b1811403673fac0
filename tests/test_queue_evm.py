"""The queue processor on live anvil chains: it signs, broadcasts, replaces and confirms payouts.

The queue runs as a real process; the test plays the engine (deal events and payout commands) and,
where it matters, the watcher (TxConfirmation). Balances and nonces are read from the chain itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from hexbytes import HexBytes

from otc_cli import contracts
from otc_common import subjects
from otc_common.bus import Bus
from otc_common.keys import EscrowKeyring
from otc_common.messages import (
    AlertRaised,
    EscrowAssigned,
    Message,
    Party,
    PartyDetailsFilled,
    PayoutCommand,
    TransferConfirmed,
    TransferFailed,
    TransferProgress,
    TransferPurpose,
    TransferSubmitted,
    TxConfirmation,
    decode_envelope,
)
from otc_common.registry import load_registry
from tests.conftest import EvmChains
from tests.e2e import Chain, fresh_address
from tests.support import OPERATOR_EVM, ServiceProcess

ETH = 10**18
USDT = 10**6
M = TypeVar("M", bound=Message)


class Harness:
    """The queue processor as a process, a bus to talk to it, and the ETH chain to check it on."""

    def __init__(self, env: dict[str, str], work_dir: Path, chains: EvmChains) -> None:
        self.env = env
        self.work_dir = work_dir
        self.chains = chains
        self.eth = Chain(chains.rpc["ETH"])
        registry = load_registry(env["OTC_REGISTRY_FILE"], env)
        chain = registry.chain("ETH")
        self.keyring = EscrowKeyring(chain.account_xpub, chain.derivation_path)
        self.queue: ServiceProcess | None = None
        self.bus: Bus | None = None
        self.results: list[Message] = []
        self.alerts: list[AlertRaised] = []

    async def connect(self) -> None:
        self.bus = await Bus.connect(self.env["OTC_NATS_URL"], "test")
        await self.bus.provision_streams()

        async def on_result(msg: Any) -> None:
            _, payload = decode_envelope(msg.data)
            if isinstance(payload, AlertRaised):
                self.alerts.append(payload)
            else:
                self.results.append(payload)

        # JetStream consumers see each stored event once (a re-published duplicate is dropped).
        await self.bus.js.subscribe("otc.queue.result.>", cb=on_result, ordered_consumer=True)
        await self.bus.js.subscribe("otc.alert.>", cb=on_result, ordered_consumer=True)

    async def start_queue(self, **env: str) -> ServiceProcess:
        settings = {"OTC_POLL_SECONDS": "0.2", "OTC_BUMP_AFTER_SECONDS": "30"}
        settings.update({f"OTC_{key.upper()}": value for key, value in env.items()})
        self.queue = ServiceProcess("queue", ["-m", "otc_queue"], {**self.env, **settings}, self.work_dir)
        await self.queue.start()
        return self.queue

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.stop()
        if self.bus is not None:
            await self.bus.close()
        await self.eth.client.aclose()

    # ----------------------------------------------------------------- playing the engine

    def new_deal(self, deal_id: str, alice_index: int, alice_asset: str = "ETH") -> Deal:
        """A deal whose ALICE side sends `alice_asset` on ETH from escrow `alice_index`."""
        return Deal(deal_id, self.keyring.evm_address(alice_index), alice_index, alice_asset)

    async def announce(self, deal: Deal) -> None:
        """The deal events the engine publishes: both escrows, both parties' addresses."""
        assert self.bus is not None
        bob_escrow_index = deal.index + 1000
        events: list[Message] = [
            EscrowAssigned(
                deal_id=deal.id,
                party=Party.ALICE,
                chain="ETH",
                asset=deal.asset,
                address=deal.escrow,
                escrow_index=deal.index,
            ),
            EscrowAssigned(
                deal_id=deal.id,
                party=Party.BOB,
                chain="POLYGON",
                asset="MATIC",
                address=self.keyring.evm_address(bob_escrow_index),
                escrow_index=bob_escrow_index,
            ),
            PartyDetailsFilled(
                deal_id=deal.id,
                party=Party.ALICE,
                payback_address=deal.alice_payback,
                recipient_address=fresh_address(),
            ),
            PartyDetailsFilled(
                deal_id=deal.id,
                party=Party.BOB,
                payback_address=fresh_address(),
                recipient_address=deal.bob_recipient,
            ),
        ]
        for event in events:
            await self.bus.publish(subjects.deal(deal.id), event)

    async def deal(self, deal_id: str, alice_index: int, alice_asset: str = "ETH") -> Deal:
        deal = self.new_deal(deal_id, alice_index, alice_asset)
        await self.announce(deal)
        return deal

    async def command(
        self,
        deal: Deal,
        transfer_id: str,
        purpose: TransferPurpose,
        amount: int,
        to: str,
        *,
        asset: str | None = None,
        fee_from_amount: bool = False,
        escrow_index: int | None = None,
        event_id: str | None = None,
    ) -> PayoutCommand:
        assert self.bus is not None
        command = PayoutCommand(
            transfer_id=transfer_id,
            deal_id=deal.id,
            chain="ETH",
            asset=asset or deal.asset,
            escrow_address=deal.escrow,
            escrow_index=deal.index if escrow_index is None else escrow_index,
            to=to,
            amount=amount,
            purpose=purpose,
            fee_from_amount=fee_from_amount,
        )
        await self.bus.publish(subjects.queue_command("ETH"), command, event_id=event_id or f"payout:{transfer_id}")
        return command

    async def confirmation(self, txid: str, confirmations: int) -> None:
        """What the watcher would say about `txid`."""
        assert self.bus is not None
        receipt = await self.eth.receipt(txid)
        await self.bus.publish(
            subjects.chain_event("ETH", "confirmation"),
            TxConfirmation(
                chain="ETH",
                txid=txid,
                confirmations=confirmations,
                block_number=int(receipt["blockNumber"], 16) if receipt and confirmations else None,
                block_hash=receipt["blockHash"] if receipt and confirmations else None,
            ),
        )

    # ----------------------------------------------------------------- the chain

    async def fund(self, address: str, wei: int, account: int = 1) -> str:
        txid: str = await self.eth.call(
            "eth_sendTransaction", {"from": contracts.anvil_address(account), "to": address, "value": hex(wei)}
        )
        return txid

    async def fund_usdt(self, address: str, amount: int, account: int = 1) -> None:
        key = contracts.anvil_account(account).key.hex()
        await asyncio.to_thread(
            contracts.transfer, self.chains.rpc["ETH"], self.chains.usdt["ETH"], address, amount, key
        )

    async def usdt(self, address: str) -> int:
        return await self.eth.token_balance(self.chains.usdt["ETH"], address)

    async def mine(self, blocks: int = 1) -> None:
        await self.eth.call("anvil_mine", hex(blocks))

    async def nonce(self, address: str, tag: str = "latest") -> int:
        return int(await self.eth.call("eth_getTransactionCount", address, tag), 16)

    # ----------------------------------------------------------------- what the queue said

    def of(self, kind: type[M], transfer_id: str) -> list[M]:
        return [m for m in self.results if isinstance(m, kind) and getattr(m, "transfer_id", None) == transfer_id]

    async def first(
        self, kind: type[M], transfer_id: str, timeout: float = 20.0, where: Callable[[M], bool] = bool
    ) -> M:
        async def found() -> M | None:
            return next((m for m in self.of(kind, transfer_id) if where(m)), None)

        message: M = await self.until(found, timeout, f"{kind.__name__} for {transfer_id}")
        return message

    async def until(self, probe: Callable[[], Awaitable[Any]], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await probe()
            if value:
                return value
            await asyncio.sleep(0.05)
        tail = self.queue.log_tail() if self.queue else ""
        raise AssertionError(f"{what} not reached in {timeout}s; results {self.results}\n{tail}")

    async def mined(self, txid: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            return await self.eth.receipt(txid)

        found: dict[str, Any] = await self.until(probe, what=f"receipt of {txid}")
        return found

    async def facts_known(self, deal_id: str) -> None:
        """Until the queue has stored the deal's parties: a command before that waits for the next sweep."""

        async def known() -> bool:
            return len(await self.rows("SELECT 1 FROM deal_parties WHERE deal_id = $1", deal_id)) == 2

        await self.until(known, what=f"the queue knowing deal {deal_id}")

    async def rows(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.env["OTC_DATABASE_URL"], server_settings={"search_path": "queue"})
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()


class Deal:
    def __init__(self, deal_id: str, escrow: str, index: int, asset: str) -> None:
        self.id = deal_id
        self.escrow = escrow
        self.index = index
        self.asset = asset
        self.alice_payback = fresh_address()
        self.bob_recipient = fresh_address()


@pytest.fixture
async def harness(evm_env: dict[str, str], evm_chains: EvmChains, work_dir: Path) -> AsyncIterator[Harness]:
    running = Harness(evm_env, work_dir, evm_chains)
    await running.connect()
    try:
        yield running
    finally:
        await running.close()


async def funded_deal(h: Harness, deal_id: str, index: int, wei: int, *, confirm: bool = True) -> Deal:
    deal = await h.deal(deal_id, index)
    await h.fund(deal.escrow, wei)
    if confirm:
        await h.mine(1)
    return deal


# --------------------------------------------------------------------------- payouts


async def test_native_payout_sends_the_exact_amount_and_the_escrow_pays_the_fee(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "d-native", 1, ETH)
    await h.command(deal, "t-pay", TransferPurpose.SWAP_PAYOUT, ETH // 2, deal.bob_recipient)

    submitted = await h.first(TransferSubmitted, "t-pay")
    assert submitted.candidates == [submitted.txid]
    await h.mined(submitted.txid)
    await h.first(TransferProgress, "t-pay", where=lambda m: m.confirmations == 1)
    await h.mine(1)
    confirmed = await h.first(TransferConfirmed, "t-pay")

    fee = await h.eth.fee_of(submitted.txid)
    assert confirmed.txid == submitted.txid
    assert confirmed.amount_sent == ETH // 2
    assert confirmed.fee_paid == fee > 0
    assert confirmed.confirmations >= 2
    assert await h.eth.balance(deal.bob_recipient) == ETH // 2
    assert await h.eth.balance(deal.escrow) == ETH - ETH // 2 - fee
    tx = await h.eth.call("eth_getTransactionByHash", submitted.txid)
    assert tx["type"] == "0x2"

    assert h.queue is not None
    async with httpx.AsyncClient() as client:
        exposed = (await client.get(f"{h.queue.url}/metrics")).text
    for line in (
        'otc_queue_transfers_submitted_total{chain="ETH"} 1.0',
        'otc_queue_transfers_confirmed_total{chain="ETH"} 1.0',
        'otc_queue_command_to_broadcast_seconds_count{chain="ETH"} 1.0',
        'otc_queue_broadcast_to_confirmed_seconds_count{chain="ETH"} 1.0',
    ):
        assert line in exposed, line


async def test_native_refund_with_the_fee_from_the_amount_pays_amount_less_fee_to_the_wei(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deposit = 123_456_789_012_345_678
    deal = await funded_deal(h, "d-refund", 2, deposit)
    await h.command(deal, "t-refund", TransferPurpose.REFUND, deposit, deal.alice_payback, fee_from_amount=True)
    submitted = await h.first(TransferSubmitted, "t-refund")
    await h.mined(submitted.txid)
    await h.mine(1)
    confirmed = await h.first(TransferConfirmed, "t-refund")

    fee = await h.eth.fee_of(submitted.txid)
    assert confirmed.fee_paid == fee
    assert await h.eth.balance(deal.alice_payback) == deposit - fee == confirmed.amount_sent
    assert await h.eth.balance(deal.escrow) == 0, "the escrow paid exactly the amount, fee included"


async def test_erc20_payout_waits_for_gas_then_sends_exact_tokens(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await h.deal("d-token", 3, alice_asset="USDT")
    await h.fund_usdt(deal.escrow, 1_000 * USDT)
    await h.mine(2)
    await h.command(deal, "t-usdt", TransferPurpose.SWAP_PAYOUT, 900 * USDT, deal.bob_recipient)
    await h.command(deal, "t-fee", TransferPurpose.COMMISSION, 3 * USDT, OPERATOR_EVM)

    # No native coin in the escrow yet: nothing can be sent.
    await asyncio.sleep(1.0)
    assert not h.of(TransferSubmitted, "t-usdt")
    assert await h.nonce(deal.escrow, "pending") == 0

    # The tank's gas arrives (played here by an anvil account) and is confirmed.
    await h.fund(deal.escrow, ETH // 100, account=2)
    await h.mine(1)
    payout = await h.first(TransferSubmitted, "t-usdt")
    commission = await h.first(TransferSubmitted, "t-fee")
    await h.mined(commission.txid)
    await h.mine(1)
    confirmed = await h.first(TransferConfirmed, "t-usdt")
    await h.first(TransferConfirmed, "t-fee")

    assert confirmed.amount_sent == 900 * USDT and confirmed.txid == payout.txid
    assert await h.usdt(deal.bob_recipient) == 900 * USDT
    assert await h.usdt(deal.escrow) == 97 * USDT
    fees = await h.eth.fee_of(payout.txid) + await h.eth.fee_of(commission.txid)
    assert await h.eth.balance(deal.escrow) == ETH // 100 - fees, "the gas came out of the escrow's own native coin"


async def test_a_destination_the_deal_does_not_allow_is_refused_and_nothing_is_sent(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "d-refuse", 4, ETH)
    stranger = fresh_address()
    await h.command(deal, "t-stranger", TransferPurpose.SWAP_PAYOUT, ETH // 2, stranger)
    await h.command(deal, "t-wrong-purpose", TransferPurpose.COMMISSION, ETH // 2, deal.alice_payback)
    await h.command(deal, "t-wrong-index", TransferPurpose.REFUND, ETH // 2, deal.alice_payback, escrow_index=5)

    for transfer_id in ("t-stranger", "t-wrong-purpose", "t-wrong-index"):
        failed = await h.first(TransferFailed, transfer_id)
        assert failed.retryable is False
        assert not h.of(TransferSubmitted, transfer_id)
    await h.until(lambda: _async(len([a for a in h.alerts if a.kind == "payout_refused"]) == 3), what="three alerts")
    assert await h.nonce(deal.escrow, "pending") == 0
    assert await h.eth.balance(deal.escrow) == ETH
    assert await h.eth.balance(stranger) == 0
    assert not await h.rows("SELECT * FROM candidates")


async def test_more_than_the_confirmed_deposits_waits_and_is_sent_once_they_confirm(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "d-wait", 6, ETH)  # one confirmed ETH
    await h.fund(deal.escrow, ETH)  # one more, mined but not yet confirmed (threshold 2)
    await h.command(deal, "t-big", TransferPurpose.SWAP_PAYOUT, 3 * ETH // 2, deal.bob_recipient)

    await asyncio.sleep(1.5)
    assert not h.of(TransferSubmitted, "t-big"), "1.5 ETH is more than the 1 ETH confirmed"
    assert await h.nonce(deal.escrow, "pending") == 0

    await h.mine(1)
    submitted = await h.first(TransferSubmitted, "t-big")
    await h.mined(submitted.txid)
    assert await h.eth.balance(deal.bob_recipient) == 3 * ETH // 2


async def test_a_command_ahead_of_the_deal_events_waits_for_them(harness: Harness) -> None:
    h = harness
    # A sweep every 30 s: the deal events themselves must wake the payout.
    await h.start_queue(poll_seconds="30")
    deal = h.new_deal("d-early", 12)
    await h.fund(deal.escrow, ETH)
    await h.mine(1)
    await h.command(deal, "t-early", TransferPurpose.SWAP_PAYOUT, ETH // 2, deal.bob_recipient)
    await asyncio.sleep(1.0)
    assert not h.of(TransferSubmitted, "t-early"), "the destination cannot be checked yet"
    assert not h.of(TransferFailed, "t-early"), "...which is no reason to refuse it"

    await h.announce(deal)
    submitted = await h.first(TransferSubmitted, "t-early")
    await h.mined(submitted.txid)
    assert await h.eth.balance(deal.bob_recipient) == ETH // 2


async def test_the_same_command_twice_makes_one_transaction(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "d-twice", 7, ETH)
    await h.command(deal, "t-once", TransferPurpose.SWAP_PAYOUT, ETH // 4, deal.bob_recipient, event_id="first")
    await h.command(deal, "t-once", TransferPurpose.SWAP_PAYOUT, ETH // 4, deal.bob_recipient, event_id="second")
    submitted = await h.first(TransferSubmitted, "t-once")
    await h.mined(submitted.txid)
    await h.mine(1)
    await h.first(TransferConfirmed, "t-once")
    # Once more after it is done, and once with different terms: neither sends anything.
    await h.command(deal, "t-once", TransferPurpose.SWAP_PAYOUT, ETH // 4, deal.bob_recipient, event_id="third")
    await h.command(deal, "t-once", TransferPurpose.SWAP_PAYOUT, ETH // 2, deal.bob_recipient, event_id="fourth")
    await h.until(lambda: _async(any(a.kind == "conflicting_command" for a in h.alerts)), what="conflict alert")
    await asyncio.sleep(0.5)

    assert await h.nonce(deal.escrow, "pending") == 1
    assert await h.eth.balance(deal.bob_recipient) == ETH // 4
    assert len(h.of(TransferSubmitted, "t-once")) == 1
    assert len(await h.rows("SELECT * FROM candidates")) == 1


async def test_killed_right_after_signing_the_restart_broadcasts_the_stored_bytes(harness: Harness) -> None:
    h = harness
    crashing = await h.start_queue(test_crash_after_sign="true")
    deal = await funded_deal(h, "d-crash", 8, ETH)
    await h.command(deal, "t-crash", TransferPurpose.SWAP_PAYOUT, ETH // 3, deal.bob_recipient)

    async def died() -> bool:
        return crashing.proc is not None and crashing.proc.poll() is not None

    await h.until(died, what="the SIGKILL after signing")
    assert crashing.proc is not None and crashing.proc.returncode == -9
    stored = await h.rows("SELECT txid, raw FROM candidates")
    assert len(stored) == 1
    txid = stored[0]["txid"]
    assert await h.eth.call("eth_getTransactionByHash", txid) is None, "killed before the broadcast"
    assert await h.nonce(deal.escrow, "pending") == 0

    await h.start_queue()
    receipt = await h.mined(txid)
    assert receipt["status"] == "0x1"
    await h.mine(1)
    confirmed = await h.first(TransferConfirmed, "t-crash")
    assert confirmed.txid == txid
    assert {m.txid for m in h.of(TransferSubmitted, "t-crash")} == {txid}
    assert await h.nonce(deal.escrow) == 1
    assert await h.eth.balance(deal.bob_recipient) == ETH // 3
    assert len(await h.rows("SELECT * FROM candidates")) == 1


async def test_killed_at_random_points_every_transfer_is_paid_once_in_nonce_order(harness: Harness) -> None:
    h = harness
    rng = random.Random(7)
    deal = await funded_deal(h, "d-chaos", 13, ETH)
    start = await h.eth.height()
    purposes = (TransferPurpose.REFUND, TransferPurpose.SURPLUS, TransferPurpose.LATE_RETURN)
    amounts = [ETH // 100 * (i + 1) for i in range(6)]
    for i, amount in enumerate(amounts):
        await h.command(deal, f"c-{i}", purposes[i % 3], amount, deal.alice_payback)
    for _ in range(3):
        queue = await h.start_queue()
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        queue.kill()
    await h.start_queue()
    for i in range(len(amounts)):
        await h.mined((await h.first(TransferSubmitted, f"c-{i}")).txid)
    await h.mine(1)
    for i in range(len(amounts)):
        await h.first(TransferConfirmed, f"c-{i}")

    rows = await h.rows(
        "SELECT t.transfer_id, t.nonce, c.txid FROM transfers t JOIN candidates c USING (transfer_id) ORDER BY t.nonce"
    )
    assert [(r["transfer_id"], r["nonce"]) for r in rows] == [(f"c-{i}", i) for i in range(len(amounts))]
    sent = await h.eth.sent_from(deal.escrow, start)
    assert [tx["hash"] for tx in sent] == [r["txid"] for r in rows], "each stored transaction mined once, in order"
    assert await h.eth.balance(deal.alice_payback) == sum(amounts)


async def test_a_stuck_transaction_is_resent_then_replaced_at_the_same_nonce(harness: Harness) -> None:
    h = harness
    await h.start_queue(bump_after_seconds="2")
    deal = await funded_deal(h, "d-stuck", 9, ETH)
    await h.eth.call("evm_setAutomine", False)
    await h.command(deal, "t-stuck", TransferPurpose.SWAP_PAYOUT, ETH // 5, deal.bob_recipient)
    first = await h.first(TransferSubmitted, "t-stuck")

    # Dropped from the pool: the same bytes come back.
    await h.until(lambda: h.eth.call("eth_getTransactionByHash", first.txid), what="first broadcast")
    await h.eth.call("anvil_dropTransaction", first.txid)
    await h.until(lambda: h.eth.call("eth_getTransactionByHash", first.txid), timeout=1.5, what="re-broadcast")

    # Still not mined after OTC_BUMP_AFTER_SECONDS: replaced at the same nonce with higher fees.
    bumped = await h.first(TransferSubmitted, "t-stuck", where=lambda m: len(m.candidates) >= 2, timeout=10)
    assert bumped.candidates[0] == first.txid and bumped.txid == bumped.candidates[-1] != first.txid
    rows = await h.rows("SELECT raw, max_fee, priority_fee FROM candidates ORDER BY seq")
    nonces = {TypedTransaction.from_bytes(HexBytes(row["raw"])).as_dict()["nonce"] for row in rows}
    assert nonces == {0}
    for older, newer in itertools.pairwise(rows):
        assert newer["max_fee"] * 8 >= older["max_fee"] * 9
        assert newer["priority_fee"] * 8 >= older["priority_fee"] * 9

    start = await h.eth.height()
    await h.eth.call("evm_setAutomine", True)
    await h.mine(2)
    confirmed = await h.first(TransferConfirmed, "t-stuck")
    every = (await h.first(TransferSubmitted, "t-stuck", where=lambda m: confirmed.txid in m.candidates)).candidates
    assert confirmed.txid in every
    sent = await h.eth.sent_from(deal.escrow, start)
    assert [tx["hash"] for tx in sent] == [confirmed.txid], "exactly one of the candidates was mined"
    assert await h.eth.balance(deal.bob_recipient) == ETH // 5
    assert await h.nonce(deal.escrow) == 1


async def test_a_reorg_that_unmines_a_payout_resends_the_same_bytes(harness: Harness) -> None:
    h = harness
    # A slow sweep: here the watcher's TxConfirmation is what moves the queue.
    await h.start_queue(poll_seconds="60")
    deal = await funded_deal(h, "d-reorg", 10, ETH)
    await h.command(deal, "t-reorg", TransferPurpose.SWAP_PAYOUT, ETH // 7, deal.bob_recipient)
    submitted = await h.first(TransferSubmitted, "t-reorg")
    await h.mined(submitted.txid)
    await h.confirmation(submitted.txid, 1)
    await h.first(TransferProgress, "t-reorg", where=lambda m: m.confirmations == 1)

    await h.eth.call("anvil_reorg", 1, [])
    assert await h.eth.receipt(submitted.txid) is None
    assert await h.eth.balance(deal.bob_recipient) == 0
    await h.confirmation(submitted.txid, 0)
    receipt = await h.mined(submitted.txid)
    await h.first(TransferProgress, "t-reorg", where=lambda m: m.confirmations == 0)

    await h.mine(1)
    await h.confirmation(submitted.txid, 2)
    confirmed = await h.first(TransferConfirmed, "t-reorg")
    assert confirmed.txid == submitted.txid
    assert confirmed.block_number == int(receipt["blockNumber"], 16)
    assert await h.eth.balance(deal.bob_recipient) == ETH // 7, "paid once"
    assert await h.nonce(deal.escrow) == 1
    assert len(await h.rows("SELECT * FROM candidates")) == 1


async def test_several_transfers_from_one_escrow_take_consecutive_nonces(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "d-nonces", 11, 2 * ETH)
    plan = [
        ("n-0", TransferPurpose.SWAP_PAYOUT, deal.bob_recipient),
        ("n-1", TransferPurpose.COMMISSION, OPERATOR_EVM),
        ("n-2", TransferPurpose.SURPLUS, deal.alice_payback),
        ("n-3", TransferPurpose.LATE_RETURN, deal.alice_payback),
        ("n-4", TransferPurpose.REFUND, deal.alice_payback),
    ]
    operator_before = await h.eth.balance(OPERATOR_EVM)
    for transfer_id, purpose, to in plan:
        await h.command(deal, transfer_id, purpose, ETH // 10, to)
    for transfer_id, _, _ in plan:
        submitted = await h.first(TransferSubmitted, transfer_id)
        await h.mined(submitted.txid)
    await h.mine(1)
    for transfer_id, _, _ in plan:
        await h.first(TransferConfirmed, transfer_id)

    rows = await h.rows("SELECT transfer_id, nonce FROM transfers ORDER BY nonce")
    assert [(r["transfer_id"], r["nonce"]) for r in rows] == [(t, i) for i, (t, _, _) in enumerate(plan)]
    assert await h.nonce(deal.escrow) == len(plan)
    assert await h.eth.balance(deal.alice_payback) == 3 * ETH // 10
    assert await h.eth.balance(OPERATOR_EVM) - operator_before == ETH // 10


async def test_transfers_signed_together_count_what_the_ones_before_them_take(harness: Harness) -> None:
    h = harness
    deal = await funded_deal(h, "d-pair", 13, ETH)
    await h.command(deal, "p-0", TransferPurpose.SWAP_PAYOUT, 6 * ETH // 10, deal.bob_recipient)
    await h.command(deal, "p-1", TransferPurpose.COMMISSION, 6 * ETH // 10, OPERATOR_EVM)
    # Both commands wait in the stream, so the queue takes them in one run and signs them in one step.
    await h.start_queue()
    first = await h.first(TransferSubmitted, "p-0")
    await asyncio.sleep(1.0)
    assert not h.of(TransferSubmitted, "p-1"), "0.6 + 0.6 ETH is more than the 1 ETH confirmed"
    assert await h.nonce(deal.escrow, "pending") == 1

    await h.fund(deal.escrow, ETH)
    await h.mine(2)
    second = await h.first(TransferSubmitted, "p-1")
    await h.mined(first.txid)
    await h.mined(second.txid)
    rows = await h.rows("SELECT transfer_id, nonce FROM transfers ORDER BY nonce")
    assert [(r["transfer_id"], r["nonce"]) for r in rows] == [("p-0", 0), ("p-1", 1)]
    assert await h.eth.balance(deal.bob_recipient) == 6 * ETH // 10


async def test_a_report_at_the_threshold_confirms_only_what_the_node_shows_there(harness: Harness) -> None:
    h = harness
    # A sweep every 30 s: what happens below comes from the reports, not from the workers' periodic looks.
    await h.start_queue(poll_seconds="30")
    deal = await funded_deal(h, "d-report", 14, ETH)
    await h.facts_known(deal.id)
    await h.command(deal, "r-0", TransferPurpose.SWAP_PAYOUT, ETH // 2, deal.bob_recipient)
    submitted = await h.first(TransferSubmitted, "r-0")
    await h.mined(submitted.txid)  # in a block of its own (anvil mines each transaction)

    # The threshold is 2; the node shows 1.
    await h.confirmation(submitted.txid, 2)
    await asyncio.sleep(1.5)
    assert not h.of(TransferConfirmed, "r-0"), "a report ahead of the node confirms nothing"

    await h.mine(1)
    await h.confirmation(submitted.txid, 2)
    confirmed = await h.first(TransferConfirmed, "r-0", timeout=5.0)
    receipt = await h.mined(submitted.txid)
    assert (confirmed.txid, confirmed.block_number) == (submitted.txid, int(receipt["blockNumber"], 16))
    assert confirmed.confirmations >= 2
    assert confirmed.amount_sent == ETH // 2
    assert confirmed.fee_paid == int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)
    rows = await h.rows("SELECT status, confirmations FROM transfers WHERE transfer_id = 'r-0'")
    assert [(r["status"], r["confirmations"]) for r in rows] == [("CONFIRMED", confirmed.confirmations)]


async def test_a_deposit_that_has_just_reached_the_threshold_is_paid_at_once(harness: Harness) -> None:
    h = harness
    # A sweep every 30 s: a payout that waited would wait that long.
    await h.start_queue(poll_seconds="30")
    first = await funded_deal(h, "d-tip-0", 15, ETH)
    await h.facts_known(first.id)
    await h.command(first, "k-0", TransferPurpose.SWAP_PAYOUT, ETH // 10, first.bob_recipient)
    await h.mined((await h.first(TransferSubmitted, "k-0")).txid)  # the queue has seen the tip of then
    await h.mine(3)

    second = await funded_deal(h, "d-tip-1", 16, ETH)  # exactly 2 confirmations, the threshold
    await h.facts_known(second.id)
    await h.command(second, "k-1", TransferPurpose.SWAP_PAYOUT, ETH // 2, second.bob_recipient)
    submitted = await h.first(TransferSubmitted, "k-1", timeout=3.0)
    await h.mined(submitted.txid)
    assert await h.eth.balance(second.bob_recipient) == ETH // 2


async def test_command_to_broadcast_latency(harness: Harness) -> None:
    h = harness
    queue = await h.start_queue()
    deals = [await h.deal(f"d-lat-{i}", 100 + i) for i in range(24)]
    for deal in deals:
        await h.fund(deal.escrow, ETH // 10)
    await h.mine(1)
    for i, deal in enumerate(deals):
        await h.command(deal, f"t-lat-{i}", TransferPurpose.SWAP_PAYOUT, ETH // 20, deal.bob_recipient)
        await h.first(TransferSubmitted, f"t-lat-{i}")

    latencies = []
    for line in queue.log_path.read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("msg") == "broadcast":
            latencies.append(entry["command_to_broadcast_ms"])
    assert len(latencies) == len(deals)
    p50, worst = statistics.median(latencies), max(latencies)
    print(f"command → broadcast over {len(latencies)} commands: p50 {p50:.1f} ms, max {worst:.1f} ms")
    assert p50 < 100, latencies


async def _async(value: Any) -> Any:
    return value
