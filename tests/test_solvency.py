"""The solvency check: the pure comparison (in-flight payouts, reorged deposits, tank gas, reads racing
the ledger) and, on a live chain, an escrow drained behind the system's back halting its chain."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from otc_cli import contracts
from otc_common.messages import Party, Stage, TransferPurpose
from otc_common.money import parse_amount
from otc_common.registry import load_registry
from otc_engine import ledger, solvency
from otc_engine.ledger import DepositFact, Destinations, Escrow, GasFact, TransferFact
from tests.conftest import EvmChains
from tests.e2e import Chain, fresh_address
from tests.support import ALPHA_ADDRESS, UNLIMITED_RATES, RpcClient, ServiceProcess, write_test_registry

P = TransferPurpose
NOW = datetime(2026, 11, 25, tzinfo=UTC)
TO = Destinations(counterparty_recipient="0xRecipient", operator="0xOperator", payback="0xPayback", tank="0xTank")


def escrow(
    *,
    native: bool = True,
    deposits: list[DepositFact] | None = None,
    transfers: list[TransferFact] | None = None,
    gas: list[GasFact] | None = None,
    fee_reserve: int = 50,
    phased: bool = False,
) -> Escrow:
    return Escrow(
        deal_id="d",
        party=Party.ALICE,
        native=native,
        amount=1000,
        commission=3,
        fee_reserve=fee_reserve if native else 0,
        confirmations_needed=2,
        tip_height=100,
        deposits=deposits or [],
        transfers=transfers or [],
        gas=gas or [],
        phased=phased,
    )


def mined(amount: int, block: int | None = 90) -> DepositFact:
    return DepositFact(amount=amount, block_number=block, block_time=NOW)


def transfer(
    purpose: TransferPurpose,
    amount: int,
    status: str,
    *,
    fee: int | None = None,
    fee_from_amount: bool = False,
) -> TransferFact:
    confirmed = status == "CONFIRMED"
    return TransferFact(
        transfer_id=f"t-{purpose}-{amount}",
        purpose=purpose,
        amount=amount,
        status=status,
        fee_from_amount=fee_from_amount,
        amount_sent=(amount - (fee or 0) if fee_from_amount else amount) if confirmed else None,
        fee_paid=fee if confirmed else None,
    )


# --------------------------------------------------------------------------- the comparison


def test_untouched_deposit_must_be_held_in_full_and_any_loss_is_the_shortfall() -> None:
    held = escrow(deposits=[mined(1053)])
    assert solvency.minimum_holding(held, held) == 1053
    assert solvency.shortfall(held, held, 1053) == 0
    assert solvency.shortfall(held, held, 1053 + 10**18) == 0, "more than the minimum is never judged"
    assert solvency.shortfall(held, held, 1052) == 1
    assert solvency.shortfall(held, held, 0) == 1053


def test_native_payouts_in_flight_count_at_their_amount_with_the_fee_reserve_as_tolerance() -> None:
    in_flight = escrow(
        deposits=[mined(1100)],
        transfers=[transfer(P.SWAP_PAYOUT, 1000, "SUBMITTED"), transfer(P.COMMISSION, 3, "COMMANDED")],
    )
    # 1100 in, 1003 leaving, their fees unknown yet: up to the 50 reserve may already be gone.
    assert solvency.minimum_holding(in_flight, in_flight) == 1100 - 1003 - 50
    # Both mined, each fee 7: the chain holds 1100 - 1003 - 14 = 83.
    assert solvency.shortfall(in_flight, in_flight, 83) == 0
    # Not mined yet: the whole deposit is still there.
    assert solvency.shortfall(in_flight, in_flight, 1100) == 0
    settled = escrow(
        deposits=[mined(1100)],
        transfers=[
            transfer(P.SWAP_PAYOUT, 1000, "CONFIRMED", fee=7),
            transfer(P.COMMISSION, 3, "CONFIRMED", fee=7),
        ],
    )
    # Once confirmed the fees are known exactly and the tolerance goes away.
    assert solvency.minimum_holding(settled, settled) == 83
    assert solvency.shortfall(settled, settled, 82) == 1


def test_native_return_paying_its_fee_from_the_amount_needs_no_tolerance() -> None:
    refunding = escrow(deposits=[mined(400)], transfers=[transfer(P.REFUND, 400, "SUBMITTED", fee_from_amount=True)])
    assert solvency.fee_tolerance(refunding) == 0
    assert solvency.minimum_holding(refunding, refunding) == 0
    refunded = escrow(
        deposits=[mined(400)], transfers=[transfer(P.REFUND, 400, "CONFIRMED", fee=9, fee_from_amount=True)]
    )
    assert solvency.minimum_holding(refunded, refunded) == 0


def test_refused_and_skipped_transfers_take_nothing_but_a_reverted_one_may_have_paid_its_fee() -> None:
    skipped = escrow(deposits=[mined(40)], transfers=[transfer(P.LATE_RETURN, 40, "SKIPPED", fee_from_amount=True)])
    assert solvency.minimum_holding(skipped, skipped) == 40, "dust that was not worth its fee stays"
    failed = escrow(deposits=[mined(1100)], transfers=[transfer(P.SWAP_PAYOUT, 1000, "FAILED")])
    assert solvency.minimum_holding(failed, failed) == 1100 - 50


def test_deposits_unmined_by_a_reorg_or_not_yet_confirmed_are_not_required() -> None:
    reorged = escrow(deposits=[mined(700, block=None), mined(300)])
    assert solvency.minimum_holding(reorged, reorged) == 300
    assert solvency.shortfall(reorged, reorged, 300) == 0, "the reorged deposit is gone from the chain too"
    maturing = escrow(deposits=[mined(500, block=100), mined(300)])  # 1 confirmation of 2
    assert solvency.minimum_holding(maturing, maturing) == 300
    assert solvency.shortfall(maturing, maturing, 300) == 0


def test_token_escrow_ignores_tank_gas_and_never_takes_network_fees_from_the_tokens() -> None:
    gas = [GasFact(request_id="d:ALICE:gas:swap", status="FUNDED", amount=5 * 10**15)]
    waiting = escrow(native=False, deposits=[mined(1010)], gas=gas)
    assert solvency.minimum_holding(waiting, waiting) == 1010
    swapping = escrow(
        native=False,
        deposits=[mined(1010)],
        gas=gas,
        transfers=[
            transfer(P.SWAP_PAYOUT, 1000, "CONFIRMED", fee=60_000 * 10**9),
            transfer(P.COMMISSION, 3, "CONFIRMED", fee=60_000 * 10**9),
            transfer(P.SURPLUS, 7, "SUBMITTED"),
            transfer(P.GAS_RETURN, 4 * 10**15, "SUBMITTED", fee_from_amount=True),
        ],
    )
    # Fees were paid in native gas: the tokens still owed are exact, with no tolerance.
    assert solvency.fee_tolerance(swapping) == 0
    assert solvency.minimum_holding(swapping, swapping) == 0
    one_short = escrow(
        native=False, deposits=[mined(1010)], gas=gas, transfers=[transfer(P.SWAP_PAYOUT, 1000, "CONFIRMED", fee=1)]
    )
    assert solvency.shortfall(one_short, one_short, 9) == 1


def test_a_payout_racing_the_balance_read_is_covered_by_the_second_ledger_read() -> None:
    before = escrow(deposits=[mined(1100)])
    after = escrow(deposits=[mined(1100)], transfers=[transfer(P.SWAP_PAYOUT, 1000, "COMMANDED")])
    # Planned, commanded and mined between the first ledger read and the balance read.
    balance_read = 1100 - 1000 - 7
    assert solvency.shortfall(before, before, balance_read) > 0, "one read alone would see a loss"
    assert solvency.shortfall(before, after, balance_read) == 0


def test_a_deposit_racing_the_balance_read_counts_only_from_the_first_ledger_read() -> None:
    before = escrow(deposits=[mined(300)])
    after = escrow(deposits=[mined(300), mined(700)])
    # The 700 arrived (and was confirmed) after the balance was read.
    assert solvency.shortfall(before, after, 300) == 0
    assert solvency.shortfall(after, after, 300) > 0, "the later read alone would see a loss"


def test_estimate_skips_escrows_with_nothing_to_hold() -> None:
    assert solvency.estimate(escrow()) == 0
    assert solvency.estimate(escrow(deposits=[mined(5, block=None)])) == 0
    assert solvency.estimate(escrow(deposits=[mined(5)])) == 5


# --------------------------------------------------------------------------- whole lifecycles


@dataclass(frozen=True)
class Frame:
    """The ledger as the engine knows it, and the balance the chain holds, at one moment."""

    escrow: Escrow
    balance: int


def lifecycle(
    *,
    native: bool,
    phased: bool,
    stage: Stage,
    deposits: list[int],
    fees: list[int],
    mined_first: list[bool],
    late_deposit: int,
) -> list[Frame]:
    """Drives one escrow through the real ledger planner, recording every step on either side.

    Chain and engine move separately: a deposit is on chain before the engine sees it and confirmed
    later; a transfer is planned, commanded, mined (before or after the queue reports it submitted)
    and confirmed with the fee it really paid.
    """
    frames: list[Frame] = []
    balance = 0
    seen: list[DepositFact] = []
    transfers: dict[str, TransferFact] = {}
    gas: list[GasFact] = []
    tip = 100
    fee_iter = iter(fees * 20)
    order_iter = iter(mined_first * 20)

    def current() -> Escrow:
        return Escrow(
            deal_id="d",
            party=Party.BOB,
            native=native,
            amount=1_000_000,
            commission=3_000,
            fee_reserve=900 if native else 0,
            confirmations_needed=2,
            tip_height=tip,
            deposits=list(seen),
            transfers=list(transfers.values()),
            gas=list(gas),
            phased=phased,
        )

    def snap() -> None:
        frames.append(Frame(current(), balance))

    def deposit(amount: int) -> None:
        nonlocal balance, tip
        balance += amount
        snap()
        seen.append(DepositFact(amount=amount, block_number=tip, block_time=NOW))
        snap()
        tip += 1
        snap()

    def set_status(t: TransferFact, status: str, **kw: Any) -> None:
        transfers[t.transfer_id] = TransferFact(**{**_fields(t), "status": status, **kw})
        snap()

    for amount in deposits:
        deposit(amount)
    for round_no in range(8):
        steps = ledger.next_steps(stage, current(), TO, late_round=round_no)
        if steps.gas_request is not None:
            gas.append(GasFact(request_id=steps.gas_request[0], status="FUNDED", amount=10**15))
            snap()
            continue
        if not steps.transfers:
            break
        new = []
        for p in steps.transfers:
            t = TransferFact(
                transfer_id=f"{p.purpose}:{len(transfers)}",
                purpose=p.purpose,
                amount=p.amount,
                status="PLANNED",
                fee_from_amount=p.fee_from_amount,
            )
            transfers[t.transfer_id] = t
            new.append(t)
        snap()
        for t in new:
            set_status(t, "COMMANDED")
        if round_no == 0 and late_deposit:
            deposit(late_deposit)  # a deposit arriving while the payouts are under way
        for t in new:
            fee = next(fee_iter)
            moves_asset = native or t.purpose is not P.GAS_RETURN
            leaving = t.amount + (fee if native and not t.fee_from_amount else 0)
            if next(order_iter):
                balance -= leaving if moves_asset else 0
                snap()
                set_status(t, "SUBMITTED")
            else:
                set_status(t, "SUBMITTED")
                balance -= leaving if moves_asset else 0
                snap()
            sent = t.amount - fee if t.fee_from_amount else t.amount
            set_status(t, "CONFIRMED", amount_sent=sent, fee_paid=fee)
    return frames


def _fields(t: TransferFact) -> dict[str, Any]:
    return {name: getattr(t, name) for name in t.__struct_fields__}


@settings(max_examples=120, deadline=None)
@given(
    native=st.booleans(),
    phased=st.booleans(),
    stage=st.sampled_from([Stage.SWAP, Stage.REVERTED]),
    extra=st.lists(st.integers(min_value=1, max_value=500_000), min_size=0, max_size=2),
    fees=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=6),
    mined_first=st.lists(st.booleans(), min_size=1, max_size=6),
    late_deposit=st.sampled_from([0, 1, 250_000]),
)
def test_a_healthy_escrow_is_never_short_whenever_the_ledger_and_the_balance_are_read(
    native: bool,
    phased: bool,
    stage: Stage,
    extra: list[int],
    fees: list[int],
    mined_first: list[bool],
    late_deposit: int,
) -> None:
    # Enough for the swap (amount, commission, fee reserve) in a first deposit, then any top-ups.
    deposits = [1_000_000 + 3_000 + (900 if native else 0), *extra]
    frames = lifecycle(
        native=native,
        phased=phased and native,
        stage=stage,
        deposits=deposits,
        fees=fees,
        mined_first=mined_first,
        late_deposit=late_deposit,
    )
    for i, before in enumerate(frames):
        for j in range(i, len(frames)):
            read = frames[j].balance
            assert read >= 0
            for k in range(j, len(frames)):
                missing = solvency.shortfall(before.escrow, frames[k].escrow, read)
                assert missing == 0, (i, j, k, before.escrow, frames[k].escrow, read)
    # And the check is not blind: at the end, a single unit taken away is seen (tokens exactly).
    last = frames[-1]
    if not native and solvency.minimum_holding(last.escrow, last.escrow) > 0:
        assert solvency.shortfall(last.escrow, last.escrow, last.balance - 1) == 1


# --------------------------------------------------------------------------- on a live chain


@pytest.fixture
async def solvency_stack(
    evm_env: dict[str, str], evm_chains: EvmChains, work_dir: Path
) -> AsyncIterator[dict[str, ServiceProcess]]:
    env = {**evm_env, "OTC_SOLVENCY_INTERVAL_SECONDS": "0.5"}
    procs = {
        "engine": ServiceProcess("engine", ["-m", "otc_engine"], env, work_dir),
        "gateway": ServiceProcess(
            "gateway",
            ["-m", "otc_gateway"],
            {**env, **UNLIMITED_RATES, "OTC_PUBLIC_BASE_URL": "https://otc.example"},
            work_dir,
        ),
        "watcher": ServiceProcess(
            "watcher-ETH", ["-m", "otc_watcher_evm", "--chain", "ETH"], {**env, "OTC_POLL_INTERVAL_MS": "100"}, work_dir
        ),
    }
    await procs["engine"].start()
    await asyncio.gather(procs["gateway"].start(), procs["watcher"].start())
    try:
        yield procs
    finally:
        await asyncio.gather(*(p.stop() for p in procs.values()))


async def metric(base_url: str, name: str, **labels: str) -> float | None:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, logs: Callable[[], str] = str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


async def alerts(nats_url: str) -> list[dict[str, Any]]:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe("otc.alert.>", stream="ALERTS", ordered_consumer=True)
        found: list[dict[str, Any]] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return found
            found.append(json.loads(msg.data)["payload"])
    finally:
        await nc.close()


async def test_an_escrow_drained_behind_the_systems_back_halts_its_chain_and_raises_an_alert(
    solvency_stack: dict[str, ServiceProcess], evm_env: dict[str, str], evm_chains: EvmChains
) -> None:
    engine = solvency_stack["engine"]

    def logs() -> str:
        return "\n".join(f"--- {name}\n{p.log_tail(30)}" for name, p in solvency_stack.items())

    rpc = RpcClient(solvency_stack["gateway"].url)
    eth = Chain(evm_chains.rpc["ETH"])
    created = await rpc.result(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "0.5"},
            "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "1000"},
            "timeoutSeconds": 600,
        },
    )
    deal_id = created["dealId"]
    for party, token in (("ALICE", created["aliceToken"]), ("BOB", created["bobToken"])):
        await rpc.result(
            "otc.fillPartyDetails",
            {
                "dealId": deal_id,
                "party": party,
                "token": token,
                "paybackAddress": fresh_address(),
                "recipientAddress": fresh_address(),
            },
        )
    status = await rpc.result("otc.status", {"dealId": deal_id})
    escrow = status["instructions"]["alice"]["to"]
    required = parse_amount(status["instructions"]["alice"]["amount"], 18)
    await asyncio.to_thread(
        contracts.send_native, evm_chains.rpc["ETH"], escrow, required, contracts.anvil_account(1).key.hex()
    )
    await eth.call("anvil_mine", "0x2")

    async def locked() -> bool:
        view = await rpc.result("otc.status", {"dealId": deal_id})
        return bool(view["collection"]["alice"]["locked"])

    await wait_until(locked, "Alice's deposit confirmed", logs)
    # Healthy: rounds pass over the funded escrow and find it whole.
    rounds = await metric(engine.url, "otc_solvency_rounds_total", result="ok") or 0

    async def two_more_rounds() -> bool:
        return (await metric(engine.url, "otc_solvency_rounds_total", result="ok") or 0) >= rounds + 2

    await wait_until(two_more_rounds, "two solvency rounds", logs)
    assert await metric(engine.url, "otc_solvency_shortfall_base_units", chain="ETH", asset="ETH") == 0
    assert (await metric(engine.url, "otc_solvency_last_check_timestamp_seconds", chain="ETH") or 0) > 0
    conn = await asyncpg.connect(evm_env["OTC_DATABASE_URL"], server_settings={"search_path": "engine"})
    try:
        assert await conn.fetch("SELECT * FROM chain_halts") == []

        # The escrow's coins leave by no transaction the broker made.
        await eth.call("anvil_setBalance", escrow, "0x0")

        async def halted() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM chain_halts WHERE chain = 'ETH'"))

        await wait_until(halted, "the ETH halt", logs)
        reason = await conn.fetchval("SELECT reason FROM chain_halts WHERE chain = 'ETH'")
        assert reason.startswith("solvency mismatch") and escrow in reason and deal_id in reason
        assert [row["chain"] for row in await conn.fetch("SELECT chain FROM chain_halts")] == ["ETH"]
    finally:
        await conn.close()
    shortfall = await metric(engine.url, "otc_solvency_shortfall_base_units", chain="ETH", asset="ETH")
    assert shortfall == required

    async def alerted() -> bool:
        return any(a["kind"] == "solvency_mismatch" for a in await alerts(evm_env["OTC_NATS_URL"]))

    await wait_until(alerted, "the solvency alert", logs)
    [alert] = [a for a in await alerts(evm_env["OTC_NATS_URL"]) if a["kind"] == "solvency_mismatch"]
    assert (alert["source"], alert["chain"], alert["deal_id"]) == ("engine", "ETH", deal_id)
    assert f"holds 0 ETH; the ledger needs at least {status['instructions']['alice']['amount']} ETH" in alert["detail"]
    # Later rounds find the same shortfall without alerting it again.
    rounds = await metric(engine.url, "otc_solvency_rounds_total", result="ok") or 0
    await wait_until(two_more_rounds, "two more rounds", logs)
    assert len([a for a in await alerts(evm_env["OTC_NATS_URL"]) if a["kind"] == "solvency_mismatch"]) == 1

    # An operator who resumes after looking into it is not overruled by the same finding...
    answer = await admin_request(evm_env["OTC_NATS_URL"], "chain.resume", {"chain": "ETH"})
    assert answer["result"]["resumed"] is True
    rounds = await metric(engine.url, "otc_solvency_rounds_total", result="ok") or 0
    await wait_until(two_more_rounds, "two rounds after the resume", logs)
    assert (await admin_request(evm_env["OTC_NATS_URL"], "chain.halts", {}))["result"]["halts"] == []
    # ...but anything new about the escrow halts the chain again.
    await eth.call("anvil_setBalance", escrow, hex(required // 2))

    async def halted_again() -> bool:
        halts = (await admin_request(evm_env["OTC_NATS_URL"], "chain.halts", {}))["result"]["halts"]
        return [h["chain"] for h in halts] == ["ETH"]

    await wait_until(halted_again, "the second halt", logs)
    assert (
        await metric(engine.url, "otc_solvency_shortfall_base_units", chain="ETH", asset="ETH")
        == required - required // 2
    )


async def admin_request(nats_url: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(
            "otc.admin.engine", json.dumps({"method": method, "params": params}).encode(), timeout=10
        )
        answer: dict[str, Any] = json.loads(reply.data)
        return answer
    finally:
        await nc.close()


async def test_utxo_escrow_balances_come_from_the_electrum_server_mempool_included(
    work_dir: Path, tmp_path: Path
) -> None:
    utxo_support = pytest.importorskip("tests.utxo_support")
    devnet = utxo_support.UnicityDevnet(work_dir)
    registry = load_registry(str(write_test_registry(tmp_path / "registry.toml", electrum=devnet.url)))
    electrum = solvency._electrum_module()
    assert electrum is not None
    source = solvency.ElectrumSource(registry.chain("UNICITY"), electrum)
    escrow = solvency.Holding(address=ALPHA_ADDRESS, contract=None)
    try:
        assert await source.balances([escrow], 0) == {escrow: 0}
        await devnet.faucet(ALPHA_ADDRESS, 123_456)
        assert await source.balances([escrow], 0) == {escrow: 123_456}, "an unconfirmed deposit counts"
        await devnet.mine(1)
        assert await source.balances([escrow], 0) == {escrow: 123_456}
        assert await source.height() == await devnet.height()
    finally:
        await source.close()
        await devnet.close()
        devnet.stop()
