"""The queue processor on the Unicity devnet (production Alpha rules: exactly one input per transaction).

The queue runs as a real process; the test plays the engine (deal events and payout commands) and,
where it matters, the watcher (TxConfirmation). Balances, inputs and fees are read from the devnet.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from bitcoin.core import CTransaction

from otc_common import subjects
from otc_common.addresses import electrum_scripthash, segwit_address, utxo_script_pubkey
from otc_common.bus import Bus
from otc_common.electrum import ElectrumError
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
from tests.e2e import fresh_address
from tests.support import ALPHA_ADDRESS, ServiceProcess
from tests.utxo_support import UnicityDevnet

CHAIN = "UNICITY"
COIN = 100_000_000
RBF = 0xFFFFFFFD
M = TypeVar("M", bound=Message)


def fresh_alpha() -> str:
    return segwit_address("alpha", 0, os.urandom(20))


class Deal:
    def __init__(self, deal_id: str, escrow: str, index: int) -> None:
        self.id = deal_id
        self.escrow = escrow
        self.index = index
        self.alice_payback = fresh_alpha()
        self.bob_recipient = fresh_alpha()


class Harness:
    """The queue processor as a process, a bus to talk to it, and the devnet to check it on."""

    def __init__(self, env: dict[str, str], work_dir: Path, devnet: UnicityDevnet) -> None:
        self.env = env
        self.work_dir = work_dir
        self.devnet = devnet
        registry = load_registry(env["OTC_REGISTRY_FILE"], env)
        unicity, eth = registry.chain(CHAIN), registry.chain("ETH")
        self.keyring = EscrowKeyring(unicity.account_xpub, unicity.derivation_path)
        self.evm_keyring = EscrowKeyring(eth.account_xpub, eth.derivation_path)
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

        await self.bus.js.subscribe("otc.queue.result.>", cb=on_result, ordered_consumer=True)
        await self.bus.js.subscribe("otc.alert.>", cb=on_result, ordered_consumer=True)

    async def start_queue(self, **env: str) -> ServiceProcess:
        settings = {"OTC_POLL_SECONDS": "0.2", "OTC_BUMP_AFTER_SECONDS": "60"}
        settings.update({f"OTC_{key.upper()}": value for key, value in env.items()})
        self.queue = ServiceProcess("queue-utxo", ["-m", "otc_queue"], {**self.env, **settings}, self.work_dir)
        await self.queue.start()
        return self.queue

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.stop()
        if self.bus is not None:
            await self.bus.close()

    # ----------------------------------------------------------------- playing the engine

    def new_deal(self, deal_id: str, index: int) -> Deal:
        return Deal(deal_id, self.keyring.utxo_address(index, "alpha"), index)

    async def deal(self, deal_id: str, index: int) -> Deal:
        """A deal whose ALICE side sends ALPHA from UNICITY escrow `index`; its events published."""
        assert self.bus is not None
        deal = self.new_deal(deal_id, index)
        events: list[Message] = [
            EscrowAssigned(
                deal_id=deal.id, party=Party.ALICE, chain=CHAIN, asset="ALPHA", address=deal.escrow, escrow_index=index
            ),
            EscrowAssigned(
                deal_id=deal.id,
                party=Party.BOB,
                chain="ETH",
                asset="ETH",
                address=self.evm_keyring.evm_address(index + 1000),
                escrow_index=index + 1000,
            ),
            PartyDetailsFilled(
                deal_id=deal.id,
                party=Party.ALICE,
                payback_address=deal.alice_payback,
                recipient_address=fresh_address(),
            ),
            PartyDetailsFilled(
                deal_id=deal.id, party=Party.BOB, payback_address=fresh_address(), recipient_address=deal.bob_recipient
            ),
        ]
        for event in events:
            await self.bus.publish(subjects.deal(deal.id), event)
        return deal

    async def command(
        self,
        deal: Deal,
        transfer_id: str,
        purpose: TransferPurpose,
        amount: int,
        to: str,
        *,
        fee_from_amount: bool = False,
        escrow_index: int | None = None,
        event_id: str | None = None,
    ) -> PayoutCommand:
        assert self.bus is not None
        command = PayoutCommand(
            transfer_id=transfer_id,
            deal_id=deal.id,
            chain=CHAIN,
            asset="ALPHA",
            escrow_address=deal.escrow,
            escrow_index=deal.index if escrow_index is None else escrow_index,
            to=to,
            amount=amount,
            purpose=purpose,
            fee_from_amount=fee_from_amount,
        )
        await self.bus.publish(subjects.queue_command(CHAIN), command, event_id=event_id or f"payout:{transfer_id}")
        return command

    async def confirmation(self, txid: str, confirmations: int) -> None:
        """What the watcher would say about `txid`."""
        assert self.bus is not None
        block_number = block_hash = None
        if confirmations:
            verbose = await self.devnet.tx(txid)
            block_hash = verbose["blockhash"]
            block_number = await self.devnet.height() - int(verbose["confirmations"]) + 1
        await self.bus.publish(
            subjects.chain_event(CHAIN, "confirmation"),
            TxConfirmation(
                chain=CHAIN,
                txid=txid,
                confirmations=confirmations,
                block_number=block_number,
                block_hash=block_hash,
            ),
        )

    # ----------------------------------------------------------------- the chain

    async def fund(self, address: str, sats: int) -> str:
        return await self.devnet.faucet(address, sats)

    async def mine(self, blocks: int = 1) -> None:
        await self.devnet.mine(blocks)

    async def balance(self, address: str) -> tuple[int, int]:
        """(confirmed, unconfirmed change) of an address."""
        got = await self.devnet.call("blockchain.scripthash.get_balance", scripthash(address))
        return int(got["confirmed"]), int(got["unconfirmed"])

    async def history(self, address: str) -> dict[str, int]:
        entries = await self.devnet.call("blockchain.scripthash.get_history", scripthash(address))
        return {entry["tx_hash"]: int(entry["height"]) for entry in entries}

    async def tx(self, txid: str) -> CTransaction:
        return CTransaction.deserialize(bytes.fromhex(await self.devnet.call("blockchain.transaction.get", txid)))

    async def known(self, txid: str) -> bool:
        try:
            await self.devnet.call("blockchain.transaction.get", txid)
        except ElectrumError:
            return False
        return True

    async def fee_of(self, txid: str) -> int:
        """Input value less output value, the input's value read from its own transaction."""
        tx = await self.tx(txid)
        spent = 0
        for txin in tx.vin:
            spent += (await self.tx(txin.prevout.hash[::-1].hex())).vout[txin.prevout.n].nValue
        return int(spent - sum(out.nValue for out in tx.vout))

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

    async def mempool(self, txid: str) -> None:
        await self.until(lambda: self.known(txid), what=f"{txid} at the devnet")

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


def scripthash(address: str) -> str:
    return electrum_scripthash(utxo_script_pubkey(address, "alpha"))


def paid_to(tx: CTransaction, address: str) -> int:
    script = utxo_script_pubkey(address, "alpha")
    return sum(out.nValue for out in tx.vout if bytes(out.scriptPubKey) == script)


def outpoint(tx: CTransaction) -> tuple[str, int]:
    assert len(tx.vin) == 1
    return tx.vin[0].prevout.hash[::-1].hex(), tx.vin[0].prevout.n


@pytest.fixture
async def harness(utxo_env: dict[str, str], unicity_devnet: UnicityDevnet, work_dir: Path) -> AsyncIterator[Harness]:
    running = Harness(utxo_env, work_dir, unicity_devnet)
    await running.connect()
    try:
        yield running
    finally:
        await running.close()


async def funded_deal(h: Harness, deal_id: str, index: int, *deposits: int, confirm: bool = True) -> Deal:
    deal = await h.deal(deal_id, index)
    for sats in deposits:
        await h.fund(deal.escrow, sats)
    if confirm:
        await h.mine(2)  # the threshold of UNICITY in the test registry
    return deal


# --------------------------------------------------------------------------- payouts


async def test_payout_from_one_deposit_pays_the_exact_amount_and_its_change_waits_for_confirmations(
    harness: Harness,
) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "u-one", 1, COIN)
    deposit = next(iter(await h.history(deal.escrow)))
    await h.command(deal, "u-pay", TransferPurpose.SWAP_PAYOUT, 60_000_000, deal.bob_recipient)

    submitted = await h.first(TransferSubmitted, "u-pay")
    assert submitted.candidates == [submitted.txid]
    await h.mempool(submitted.txid)
    payout = await h.tx(submitted.txid)
    assert outpoint(payout)[0] == deposit
    assert payout.vin[0].nSequence == RBF and payout.nVersion == 2
    assert paid_to(payout, deal.bob_recipient) == 60_000_000
    change = paid_to(payout, deal.escrow)
    assert len(payout.vout) == 2 and change > 0
    fee = await h.fee_of(submitted.txid)
    vsize = (payout.calc_weight() + 3) // 4
    assert fee >= vsize, "at least the devnet's relay fee of 1 sat/vB"
    assert 60_000_000 + change + fee == COIN

    # The commission fits only in the change, which is not confirmed yet: it waits.
    await h.command(deal, "u-fee", TransferPurpose.COMMISSION, 10_000_000, ALPHA_ADDRESS)
    await asyncio.sleep(1.0)
    assert not h.of(TransferSubmitted, "u-fee")
    await h.mine(1)
    await h.first(TransferProgress, "u-pay", where=lambda m: m.confirmations == 1)
    await asyncio.sleep(0.5)
    assert not h.of(TransferSubmitted, "u-fee"), "one confirmation is below the threshold of 2"

    await h.mine(1)
    confirmed = await h.first(TransferConfirmed, "u-pay")
    assert confirmed.txid == submitted.txid
    assert confirmed.amount_sent == 60_000_000
    assert confirmed.fee_paid == fee
    assert confirmed.confirmations >= 2
    commission = await h.first(TransferSubmitted, "u-fee")
    await h.mempool(commission.txid)
    assert outpoint(await h.tx(commission.txid)) == (submitted.txid, 1), "it spends the now confirmed change"
    await h.mine(2)
    done = await h.first(TransferConfirmed, "u-fee")

    assert await h.balance(deal.bob_recipient) == (60_000_000, 0)
    assert await h.balance(ALPHA_ADDRESS) == (10_000_000, 0)
    assert await h.balance(deal.escrow) == (COIN - 70_000_000 - fee - done.fee_paid, 0)

    assert h.queue is not None
    async with httpx.AsyncClient() as client:
        exposed = (await client.get(f"{h.queue.url}/metrics")).text
    for line in (
        'otc_queue_transfers_submitted_total{chain="UNICITY"} 2.0',
        'otc_queue_transfers_confirmed_total{chain="UNICITY"} 2.0',
        'otc_queue_rpc_calls_total{chain="UNICITY",method="blockchain.transaction.broadcast"} 2.0',
    ):
        assert line in exposed, line


async def test_a_payout_needing_three_deposits_is_three_one_input_transactions_with_an_exact_total(
    harness: Harness,
) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "u-three", 2, 40_000_000, 40_000_000, 40_000_000)
    deposits = set(await h.history(deal.escrow))
    await h.command(deal, "u-big", TransferPurpose.SWAP_PAYOUT, COIN, deal.bob_recipient)

    submitted = await h.first(TransferSubmitted, "u-big")
    assert len(submitted.candidates) == 3 and submitted.txid == submitted.candidates[0]
    for txid in submitted.candidates:
        await h.mempool(txid)
    txs = [await h.tx(txid) for txid in submitted.candidates]
    assert {outpoint(tx)[0] for tx in txs} == deposits, "each deposit spent once, each by its own transaction"
    assert sum(paid_to(tx, deal.bob_recipient) for tx in txs) == COIN
    fees = [await h.fee_of(txid) for txid in submitted.candidates]
    await h.mine(2)
    confirmed = await h.first(TransferConfirmed, "u-big")

    assert confirmed.txid == submitted.candidates[0]
    assert confirmed.amount_sent == COIN
    assert confirmed.fee_paid == sum(fees)
    assert await h.balance(deal.bob_recipient) == (COIN, 0)
    assert await h.balance(deal.escrow) == (120_000_000 - COIN - sum(fees), 0)
    print(f"three-leg payout of 1 ALPHA: fees {fees} sat")


async def test_a_surplus_sweep_takes_each_fee_from_the_amount_and_a_dust_return_is_refused(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "u-sweep", 3, 30_000_000, 20_000_000)
    await h.command(deal, "u-surplus", TransferPurpose.SURPLUS, 50_000_000, deal.alice_payback, fee_from_amount=True)
    submitted = await h.first(TransferSubmitted, "u-surplus")
    assert len(submitted.candidates) == 2
    for txid in submitted.candidates:
        await h.mempool(txid)
        assert len((await h.tx(txid)).vout) == 1, "a sweep leaves no change"
    await h.mine(2)
    confirmed = await h.first(TransferConfirmed, "u-surplus")

    fees = [await h.fee_of(txid) for txid in submitted.candidates]
    assert confirmed.fee_paid == sum(fees)
    assert confirmed.amount_sent + confirmed.fee_paid == 50_000_000
    assert await h.balance(deal.alice_payback) == (50_000_000 - sum(fees), 0)
    assert await h.balance(deal.escrow) == (0, 0)

    await h.command(deal, "u-dust", TransferPurpose.REFUND, 300, deal.alice_payback, fee_from_amount=True)
    failed = await h.first(TransferFailed, "u-dust")
    assert failed.reason.startswith("dust:") and failed.retryable is False
    assert not h.of(TransferSubmitted, "u-dust")
    assert not [a for a in h.alerts if a.kind == "payout_refused"], "a dust return is not an incident"


async def test_deposits_are_spent_only_once_confirmed(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "u-wait", 4, 30_000_000)
    confirmed_deposit = next(iter(await h.history(deal.escrow)))
    young = await h.fund(deal.escrow, 50_000_000)
    await h.mine(1)  # one confirmation: below the threshold
    pending = await h.fund(deal.escrow, 20_000_000)  # in the mempool only
    await h.command(deal, "u-later", TransferPurpose.SWAP_PAYOUT, 60_000_000, deal.bob_recipient)

    await asyncio.sleep(1.5)
    assert not h.of(TransferSubmitted, "u-later"), "0.6 is more than the 0.3 confirmed"
    assert not await h.rows("SELECT * FROM utxo_reservations")

    await h.mine(1)
    submitted = await h.first(TransferSubmitted, "u-later")
    spent = set()
    for txid in submitted.candidates:
        await h.mempool(txid)
        spent.add(outpoint(await h.tx(txid))[0])
    assert spent == {confirmed_deposit, young}, "the deposit with one confirmation is not touched"
    assert pending not in spent
    await h.mine(2)
    await h.first(TransferConfirmed, "u-later")
    assert await h.balance(deal.bob_recipient) == (60_000_000, 0)


async def test_two_transfers_from_one_escrow_never_spend_the_same_output(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "u-two", 11, 50_000_000, 50_000_000)
    await h.command(deal, "u-a", TransferPurpose.SWAP_PAYOUT, 30_000_000, deal.bob_recipient)
    await h.command(deal, "u-b", TransferPurpose.LATE_RETURN, 30_000_000, deal.alice_payback)
    first = await h.first(TransferSubmitted, "u-a")
    second = await h.first(TransferSubmitted, "u-b")
    await h.mempool(first.txid)
    await h.mempool(second.txid)
    spent = {outpoint(await h.tx(first.txid)), outpoint(await h.tx(second.txid))}
    assert {txid for txid, _ in spent} == set(await h.history(deal.escrow)) - {first.txid, second.txid}
    assert len(spent) == 2, "each deposit held by one transfer"
    reserved = await h.rows("SELECT transfer_id, txid, vout FROM utxo_reservations ORDER BY transfer_id")
    assert [(r["txid"], r["vout"]) for r in reserved] == [outpoint(await h.tx(t)) for t in (first.txid, second.txid)]

    await h.mine(2)
    await h.first(TransferConfirmed, "u-a")
    await h.first(TransferConfirmed, "u-b")
    assert await h.balance(deal.bob_recipient) == (30_000_000, 0)
    assert await h.balance(deal.alice_payback) == (30_000_000, 0)


async def test_a_destination_the_deal_does_not_allow_is_refused_and_nothing_is_signed(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "u-refuse", 5, COIN)
    stranger = fresh_alpha()
    await h.command(deal, "u-stranger", TransferPurpose.SWAP_PAYOUT, COIN // 2, stranger)
    await h.command(deal, "u-purpose", TransferPurpose.COMMISSION, COIN // 2, deal.alice_payback)
    await h.command(deal, "u-index", TransferPurpose.REFUND, COIN // 2, deal.alice_payback, escrow_index=6)

    for transfer_id in ("u-stranger", "u-purpose", "u-index"):
        failed = await h.first(TransferFailed, transfer_id)
        assert failed.retryable is False
        assert not h.of(TransferSubmitted, transfer_id)

    async def three_alerts() -> bool:
        return len([a for a in h.alerts if a.kind == "payout_refused"]) == 3

    await h.until(three_alerts, what="three alerts")
    assert not await h.rows("SELECT * FROM utxo_candidates")
    assert not await h.rows("SELECT * FROM utxo_reservations")
    assert await h.balance(deal.escrow) == (COIN, 0)
    assert await h.balance(stranger) == (0, 0)


async def test_the_same_command_twice_makes_one_set_of_transactions(harness: Harness) -> None:
    h = harness
    await h.start_queue()
    deal = await funded_deal(h, "u-twice", 7, 30_000_000, 30_000_000)
    args = (deal, "u-once", TransferPurpose.SWAP_PAYOUT, 50_000_000, deal.bob_recipient)
    await h.command(*args, event_id="first")
    await h.command(*args, event_id="second")
    submitted = await h.first(TransferSubmitted, "u-once")
    for txid in submitted.candidates:
        await h.mempool(txid)
    await h.mine(2)
    await h.first(TransferConfirmed, "u-once")
    await h.command(*args, event_id="third")
    await h.command(deal, "u-once", TransferPurpose.SWAP_PAYOUT, 60_000_000, deal.bob_recipient, event_id="fourth")

    async def conflict() -> bool:
        return any(a.kind == "conflicting_command" for a in h.alerts)

    await h.until(conflict, what="conflict alert")
    await asyncio.sleep(0.5)
    assert len(h.of(TransferSubmitted, "u-once")) == 1
    assert len(await h.rows("SELECT * FROM utxo_candidates")) == len(submitted.candidates) == 2
    assert await h.balance(deal.bob_recipient) == (50_000_000, 0)


async def test_killed_right_after_signing_the_restart_broadcasts_the_stored_bytes(harness: Harness) -> None:
    h = harness
    crashing = await h.start_queue(test_crash_after_sign="true")
    deal = await funded_deal(h, "u-crash", 8, 30_000_000, 30_000_000)
    await h.command(deal, "u-crash", TransferPurpose.SWAP_PAYOUT, 50_000_000, deal.bob_recipient)

    async def died() -> bool:
        return crashing.proc is not None and crashing.proc.poll() is not None

    await h.until(died, what="the SIGKILL after signing")
    assert crashing.proc is not None and crashing.proc.returncode == -9
    stored = await h.rows("SELECT txid, raw FROM utxo_candidates ORDER BY leg")
    assert len(stored) == 2
    for row in stored:
        assert not await h.known(row["txid"]), "killed before the broadcast"
    assert await h.balance(deal.escrow) == (60_000_000, 0)

    await h.start_queue()
    for row in stored:
        await h.mempool(row["txid"])
        raw = await h.devnet.call("blockchain.transaction.get", row["txid"])
        assert bytes.fromhex(raw) == bytes(row["raw"]), "the stored bytes, not a new signature"
    await h.mine(2)
    confirmed = await h.first(TransferConfirmed, "u-crash")
    assert confirmed.txid == stored[0]["txid"]
    assert {tuple(m.candidates) for m in h.of(TransferSubmitted, "u-crash")} == {tuple(r["txid"] for r in stored)}
    assert await h.balance(deal.bob_recipient) == (50_000_000, 0)
    assert len(await h.rows("SELECT * FROM utxo_candidates")) == 2


async def test_a_stuck_transaction_is_replaced_by_fee_and_exactly_one_candidate_is_mined(harness: Harness) -> None:
    h = harness
    await h.start_queue(bump_after_seconds="2")
    deal = await funded_deal(h, "u-stuck", 9, COIN)
    await h.command(deal, "u-stuck", TransferPurpose.SWAP_PAYOUT, 50_000_000, deal.bob_recipient)
    first = await h.first(TransferSubmitted, "u-stuck")
    await h.mempool(first.txid)

    # Nothing is mined for longer than OTC_BUMP_AFTER_SECONDS: replaced, spending the same input.
    bumped = await h.first(TransferSubmitted, "u-stuck", where=lambda m: len(m.candidates) >= 2, timeout=15)
    assert bumped.candidates[0] == first.txid and bumped.txid == bumped.candidates[-1] != first.txid
    await h.mempool(bumped.txid)
    assert not await h.known(first.txid), "the replacement evicted the first candidate"
    rows = await h.rows("SELECT txid, seq, raw, fee, vsize, to_value FROM utxo_candidates ORDER BY seq")
    stored = [CTransaction.deserialize(bytes(row["raw"])) for row in rows]
    assert len({outpoint(tx) for tx in stored}) == 1, "every candidate spends the same escrow output"
    for older, newer in itertools.pairwise(rows):
        assert newer["to_value"] == older["to_value"] == 50_000_000
        assert newer["fee"] >= older["fee"] + newer["vsize"], "BIP125: the old fee plus the relay fee for the size"

    await h.mine(2)
    confirmed = await h.first(TransferConfirmed, "u-stuck")
    every = [row["txid"] for row in await h.rows("SELECT txid FROM utxo_candidates")]
    mined = [txid for txid in (await h.history(deal.escrow)) if txid in every]
    assert mined == [confirmed.txid], "exactly one of the candidates was mined"
    assert confirmed.fee_paid == await h.fee_of(confirmed.txid)
    assert await h.balance(deal.bob_recipient) == (50_000_000, 0)
    assert await h.balance(deal.escrow) == (COIN - 50_000_000 - confirmed.fee_paid, 0)
    print(f"fees of the candidates: {[int(row['fee']) for row in rows]} sat for {rows[0]['vsize']} vB")


async def test_a_report_at_the_threshold_confirms_only_what_the_server_shows_there(harness: Harness) -> None:
    h = harness
    # A slow sweep: what happens below comes from the reports, not from the workers' periodic looks.
    await h.start_queue(poll_seconds="60")
    deal = await funded_deal(h, "u-report", 11, COIN)
    await h.facts_known(deal.id)
    await h.command(deal, "u-report", TransferPurpose.SWAP_PAYOUT, 30_000_000, deal.bob_recipient)
    submitted = await h.first(TransferSubmitted, "u-report")
    await h.mempool(submitted.txid)
    fee = await h.fee_of(submitted.txid)
    await h.mine(1)

    # The threshold is 2; the server shows 1.
    await h.confirmation(submitted.txid, 2)
    await asyncio.sleep(1.5)
    assert not h.of(TransferConfirmed, "u-report"), "a report ahead of the server confirms nothing"

    await h.mine(1)
    await h.confirmation(submitted.txid, 2)
    confirmed = await h.first(TransferConfirmed, "u-report", timeout=5.0)
    assert confirmed.txid == submitted.txid
    assert confirmed.block_number == await h.devnet.height() - 1
    assert (confirmed.amount_sent, confirmed.fee_paid) == (30_000_000, fee)
    assert confirmed.confirmations >= 2
    rows = await h.rows("SELECT status, confirmations FROM transfers WHERE transfer_id = 'u-report'")
    assert [(r["status"], r["confirmations"]) for r in rows] == [("CONFIRMED", confirmed.confirmations)]


async def test_a_reorg_that_drops_the_payout_sends_the_same_bytes_again(harness: Harness) -> None:
    h = harness
    # A slow sweep: here the watcher's TxConfirmation is what moves the queue.
    await h.start_queue(poll_seconds="60")
    deal = await funded_deal(h, "u-reorg", 10, COIN)
    await h.command(deal, "u-reorg", TransferPurpose.SWAP_PAYOUT, 40_000_000, deal.bob_recipient)
    submitted = await h.first(TransferSubmitted, "u-reorg")
    await h.mempool(submitted.txid)
    raw = await h.devnet.call("blockchain.transaction.get", submitted.txid)
    await h.mine(1)
    await h.confirmation(submitted.txid, 1)
    await h.first(TransferProgress, "u-reorg", where=lambda m: m.confirmations == 1)

    await h.devnet.reorg(1, [submitted.txid])
    assert not await h.known(submitted.txid)
    assert await h.balance(deal.bob_recipient) == (0, 0)
    await h.confirmation(submitted.txid, 0)
    await h.mempool(submitted.txid)
    assert await h.devnet.call("blockchain.transaction.get", submitted.txid) == raw
    await h.first(TransferProgress, "u-reorg", where=lambda m: m.confirmations == 0)

    await h.mine(2)
    await h.confirmation(submitted.txid, 2)
    confirmed = await h.first(TransferConfirmed, "u-reorg")
    assert confirmed.txid == submitted.txid
    assert await h.balance(deal.bob_recipient) == (40_000_000, 0), "paid once"
    assert len(await h.rows("SELECT * FROM utxo_candidates")) == 1
