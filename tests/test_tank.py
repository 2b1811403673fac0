"""The tank as a real process against anvil, NATS and PostgreSQL: it funds escrows with gas, once each."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from eth_account import Account

from otc_common import subjects
from otc_common.bus import Bus
from otc_common.messages import AlertRaised, GasFunded, GasFundingRequest, Message, TankLowBalance, decode_envelope
from tests.conftest import EvmChains
from tests.support import ServiceProcess, tank_address

ETHER = 10**18
GAS_PER_TRANSFER = 65_000
FAST = {
    "OTC_TANK_RETRY_SECONDS": "0.3",
    "OTC_TANK_POLL_SECONDS": "0.3",
    "OTC_TANK_CONFIRM_POLL_SECONDS": "0.1",
}


async def rpc(url: str, method: str, params: list[Any]) -> Any:
    async with httpx.AsyncClient() as client:
        response = await client.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    body = response.json()
    assert "error" not in body, body
    return body["result"]


async def balance(url: str, address: str) -> int:
    return int(await rpc(url, "eth_getBalance", [address, "latest"]), 16)


async def nonce(url: str, address: str) -> int:
    return int(await rpc(url, "eth_getTransactionCount", [address, "latest"]), 16)


async def set_balance(url: str, address: str, wei: int) -> None:
    await rpc(url, "anvil_setBalance", [address, hex(wei)])


async def mine(url: str, blocks: int = 1) -> None:
    await rpc(url, "anvil_mine", [hex(blocks)])


async def wait_for(what: str, predicate: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached within {timeout}s: {what}")


def new_escrow() -> str:
    return str(Account.create().address)


class Events:
    """Everything the tank publishes (results and alerts), decoded, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Message]] = []

    def of(self, kind: type[Message], chain: str | None = None) -> list[Any]:
        return [
            m for _, m in self.items if isinstance(m, kind) and (chain is None or getattr(m, "chain", None) == chain)
        ]

    def event_ids(self, kind: type[Message]) -> list[str]:
        return [event_id for event_id, m in self.items if isinstance(m, kind)]


class Harness:
    def __init__(self, env: dict[str, str], work_dir: Path, chains: EvmChains | None) -> None:
        self.env = {**env, **FAST}
        self.work_dir = work_dir
        self._chains = chains
        self.tank = tank_address()
        self.events = Events()
        self.processes: list[ServiceProcess] = []
        self.bus: Bus | None = None

    @property
    def chains(self) -> EvmChains:
        assert self._chains is not None, "this test runs without anvil"
        return self._chains

    def process(self, **extra: str) -> ServiceProcess:
        proc = ServiceProcess("tank", ["-m", "otc_tank"], {**self.env, **extra}, self.work_dir)
        self.processes.append(proc)
        return proc

    async def start(self, **extra: str) -> ServiceProcess:
        proc = self.process(**extra)
        await proc.start()
        await self.listen()
        return proc

    async def listen(self) -> None:
        """Collects the TANK results and the tank's alerts (the streams exist once the tank has started)."""
        if self.bus is not None:
            return
        self.bus = await Bus.connect(self.env["OTC_NATS_URL"], "test")

        async def collect(msg: Any) -> None:
            envelope, payload = decode_envelope(msg.data)
            self.events.items.append((envelope.event_id, payload))

        await self.bus.js.subscribe("otc.tank.result.>", cb=collect, ordered_consumer=True)
        await self.bus.js.subscribe(subjects.alert("tank"), cb=collect, ordered_consumer=True)

    async def request(self, chain: str, escrow: str, request_id: str | None = None, transfers: int = 2) -> str:
        """Publishes a GasFundingRequest under a fresh message id, as a redelivery from another replica would be."""
        if self.bus is None:
            self.bus = await Bus.connect(self.env["OTC_NATS_URL"], "test")
        request_id = request_id or f"req-{secrets.token_hex(4)}"
        await self.bus.publish(
            subjects.tank_command(chain),
            GasFundingRequest(
                request_id=request_id,
                deal_id="deal-1",
                chain=chain,
                escrow_address=escrow,
                transfers=transfers,
                gas_per_transfer=GAS_PER_TRANSFER,
            ),
        )
        return request_id

    async def funded(self, request_id: str) -> GasFunded:
        async def found() -> GasFunded | None:
            matches = [m for m in self.events.of(GasFunded) if m.request_id == request_id]
            return matches[0] if matches else None

        result: GasFunded = await wait_for(f"GasFunded for {request_id}", found)
        return result

    async def row(self, request_id: str) -> asyncpg.Record | None:
        conn = await asyncpg.connect(self.env["OTC_DATABASE_URL"])
        try:
            return await conn.fetchrow("SELECT * FROM tank.fundings WHERE request_id = $1", request_id)
        finally:
            await conn.close()

    async def metric(self, proc: ServiceProcess, name: str, chain: str, **labels: str) -> float | None:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{proc.url}/metrics", timeout=5)).text
        wanted = {"chain": chain, **labels}
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            label_text, value = line[len(name) + 1 :].rsplit("} ", 1)
            found = dict(part.split("=", 1) for part in label_text.split(","))
            if {k: v.strip('"') for k, v in found.items()} == wanted:
                return float(value)
        return None

    async def close(self) -> None:
        # Every state the tank keeps is in the database, so a kill is a fair way to end a test (and a fast one).
        for proc in self.processes:
            proc.kill()
        if self.bus is not None:
            await self.bus.close()


@pytest.fixture
async def harness(evm_env: dict[str, str], evm_chains: EvmChains, work_dir: Path) -> AsyncIterator[Harness]:
    running = Harness(evm_env, work_dir, evm_chains)
    try:
        yield running
    finally:
        await running.close()


def expected_amount(transfers: int, base_fee: int, priority_fee: int, held: int = 0) -> int:
    estimate = transfers * GAS_PER_TRANSFER * (2 * base_fee + priority_fee)
    return max(0, -(-estimate * 11 // 10) - held)


async def fee_market_before(url: str, block_number: int) -> tuple[int, int]:
    """The base fee the tank saw (the block before its own) and the node's tip suggestion."""
    block = await rpc(url, "eth_getBlockByNumber", [hex(block_number - 1), False])
    return int(block["baseFeePerGas"], 16), int(await rpc(url, "eth_maxPriorityFeePerGas", []), 16)


async def test_funds_escrow_with_the_estimate_once_confirmed(harness: Harness) -> None:
    url = harness.chains.rpc["ETH"]
    await set_balance(url, harness.tank, 10 * ETHER)
    proc = await harness.start()
    escrow = new_escrow()
    request_id = await harness.request("ETH", escrow)

    mined = await wait_for("funding mined", lambda: _mined_row(harness, request_id))
    receipt = await rpc(url, "eth_getTransactionReceipt", [mined["tx_hash"]])
    block = int(receipt["blockNumber"], 16)
    base_fee, priority_fee = await fee_market_before(url, block)
    amount = expected_amount(2, base_fee, priority_fee)
    assert base_fee > 0 and priority_fee > 0
    assert int(mined["amount"]) == amount
    assert await balance(url, escrow) == amount
    tx = await rpc(url, "eth_getTransactionByHash", [mined["tx_hash"]])
    assert tx["from"].lower() == harness.tank.lower()
    assert int(tx["maxFeePerGas"], 16) == 2 * base_fee + priority_fee
    # One confirmation of the two ETH needs: the tank has looked and must not have published yet.
    assert mined["confirmations"] == 1
    assert harness.events.of(GasFunded) == []

    await mine(url)
    funded = await harness.funded(request_id)
    assert funded.amount == amount
    assert funded.txid == mined["tx_hash"]
    assert funded.escrow_address == escrow
    assert funded.deal_id == "deal-1"
    assert await nonce(url, harness.tank) == 1
    assert await harness.metric(proc, "otc_tank_fundings_total", "ETH", outcome="funded") == 1.0
    assert await proc.stop() == 0


async def _mined_row(harness: Harness, request_id: str) -> asyncpg.Record | None:
    row = await harness.row(request_id)
    return row if row is not None and row["block_number"] is not None else None


async def test_same_request_twice_gives_one_funding(harness: Harness) -> None:
    url = harness.chains.rpc["POLYGON"]
    await set_balance(url, harness.tank, 10 * ETHER)
    await harness.start()
    escrow = new_escrow()
    # Different message ids, same request: the inbox lets both through, the tank must not.
    request_id = await harness.request("POLYGON", escrow, "req-dup")
    await harness.request("POLYGON", escrow, "req-dup")
    await wait_for("funding mined", lambda: _mined_row(harness, request_id))
    await mine(url, 2)
    funded = await harness.funded(request_id)
    await harness.request("POLYGON", escrow, "req-dup")

    async def all_handled() -> bool:
        conn = await asyncpg.connect(harness.env["OTC_DATABASE_URL"])
        try:
            return bool(await conn.fetchval("SELECT count(*) FROM tank.inbox") == 3)
        finally:
            await conn.close()

    await wait_for("three deliveries handled", all_handled)
    assert await nonce(url, harness.tank) == 1
    assert await balance(url, escrow) == funded.amount > 0
    assert len(harness.events.of(GasFunded)) == 1


async def test_escrow_holding_enough_gets_amount_zero_and_no_transaction(harness: Harness) -> None:
    url = harness.chains.rpc["ETH"]
    await set_balance(url, harness.tank, 10 * ETHER)
    escrow = new_escrow()
    await set_balance(url, escrow, ETHER)
    await harness.start()
    request_id = await harness.request("ETH", escrow)
    funded = await harness.funded(request_id)
    assert (funded.amount, funded.txid) == (0, "")
    assert await nonce(url, harness.tank) == 0
    assert await balance(url, escrow) == ETHER
    row = await harness.row(request_id)
    assert row is not None and row["status"] == "FUNDED" and row["raw_tx"] is None


async def test_empty_tank_makes_the_request_wait_until_refilled(harness: Harness) -> None:
    url = harness.chains.rpc["ETH"]
    proc = await harness.start()
    escrow = new_escrow()
    request_id = await harness.request("ETH", escrow)

    async def announced() -> bool:
        row = await harness.row(request_id)
        return row is not None and (row["reason"] or "").startswith("tank too low")

    await wait_for("the wait is recorded", announced)
    # Several retry periods pass without a transaction, an event or a failure.
    retries = await harness.metric(proc, "otc_tank_rpc_calls_total", "ETH", method="eth_getBlockByNumber") or 0
    await wait_for(
        "three more retries",
        lambda: _metric_above(
            harness, proc, "otc_tank_rpc_calls_total", "ETH", retries + 3, method="eth_getBlockByNumber"
        ),
    )
    row = await harness.row(request_id)
    assert row is not None and row["status"] == "WAITING" and row["raw_tx"] is None
    assert harness.events.of(GasFunded) == []
    assert all(alert.kind == "tank_low" for alert in harness.events.of(AlertRaised))
    assert await harness.metric(proc, "otc_tank_waiting_requests", "ETH") == 1.0
    assert await balance(url, escrow) == 0

    await set_balance(url, harness.tank, 5 * ETHER)
    await wait_for("funding mined after the refill", lambda: _mined_row(harness, request_id))
    await mine(url)
    funded = await harness.funded(request_id)
    assert funded.amount > 0
    assert await balance(url, escrow) == funded.amount


async def _metric_above(
    harness: Harness, proc: ServiceProcess, name: str, chain: str, floor: float, **labels: str
) -> bool:
    value = await harness.metric(proc, name, chain, **labels)
    return value is not None and value >= floor


async def test_low_balance_is_published_once_per_crossing(harness: Harness) -> None:
    url = harness.chains.rpc["ETH"]
    await set_balance(url, harness.tank, 3 * ETHER // 10)
    # POLYGON's tank is empty but its threshold is off, so it must stay silent.
    proc = await harness.start(OTC_TANK_LOW_BALANCE_POLYGON="0")

    async def lows() -> list[TankLowBalance]:
        return harness.events.of(TankLowBalance, "ETH")

    first = (await wait_for("first low-balance event", lows))[0]
    assert (first.balance, first.threshold, first.address) == (3 * ETHER // 10, ETHER // 2, harness.tank)
    assert await harness.metric(proc, "otc_tank_balance_wei", "ETH") == 3 * ETHER // 10
    await wait_for("the alert", lambda: _has_alert(harness, "tank_low"))

    # Still low at the next polls: no second event.
    await set_balance(url, harness.tank, ETHER // 4)
    await wait_for("balance polled again", lambda: _metric_is(harness, proc, "ETH", ETHER // 4))
    await set_balance(url, harness.tank, ETHER // 5)
    await wait_for("balance polled again", lambda: _metric_is(harness, proc, "ETH", ETHER // 5))
    assert len(harness.events.of(TankLowBalance, "ETH")) == 1

    # Back above, then below again: a new crossing, a new event.
    await set_balance(url, harness.tank, ETHER)
    await wait_for("balance polled again", lambda: _metric_is(harness, proc, "ETH", ETHER))
    await set_balance(url, harness.tank, ETHER // 10)
    await wait_for("second crossing", lambda: _count_is(harness, 2))
    assert harness.events.of(TankLowBalance, "ETH")[1].balance == ETHER // 10
    assert harness.events.of(TankLowBalance, "POLYGON") == []
    assert await harness.metric(proc, "otc_tank_balance_wei", "POLYGON") == 0.0


async def _metric_is(harness: Harness, proc: ServiceProcess, chain: str, wei: int) -> bool:
    return await harness.metric(proc, "otc_tank_balance_wei", chain) == wei


async def _count_is(harness: Harness, count: int) -> bool:
    return len(harness.events.of(TankLowBalance, "ETH")) == count


async def _has_alert(harness: Harness, kind: str) -> bool:
    return any(alert.kind == kind for alert in harness.events.of(AlertRaised))


async def test_killed_after_storing_the_signed_transaction_sends_those_bytes_once(harness: Harness) -> None:
    url = harness.chains.rpc["ETH"]
    await set_balance(url, harness.tank, 10 * ETHER)
    doomed = await harness.start(OTC_TANK_TEST_CRASH_AFTER_SIGN="true")
    escrow = new_escrow()
    request_id = await harness.request("ETH", escrow)

    async def killed() -> bool:
        assert doomed.proc is not None
        return doomed.proc.poll() is not None

    await wait_for("the tank killed right after signing", killed)
    assert doomed.proc is not None and doomed.proc.returncode == -9
    stored = await harness.row(request_id)
    assert stored is not None and stored["status"] == "SIGNED" and stored["broadcasts"] == 0
    assert await nonce(url, harness.tank) == 0
    assert await balance(url, escrow) == 0

    restarted = harness.process()
    await restarted.start()
    await wait_for("funding mined after the restart", lambda: _mined_row(harness, request_id))
    await mine(url)
    funded = await harness.funded(request_id)
    assert funded.txid == stored["tx_hash"]
    assert funded.amount == int(stored["amount"])
    assert await nonce(url, harness.tank) == 1
    assert await balance(url, escrow) == funded.amount
    onchain = await rpc(url, "eth_getTransactionByHash", [stored["tx_hash"]])
    assert onchain["nonce"] == "0x0"


async def test_reorg_that_unmines_the_funding_resends_the_same_bytes(harness: Harness) -> None:
    url = harness.chains.rpc["POLYGON"]
    await set_balance(url, harness.tank, 10 * ETHER)
    await harness.start()
    escrow = new_escrow()
    request_id = await harness.request("POLYGON", escrow)
    first = await wait_for("funding mined", lambda: _mined_row(harness, request_id))

    await rpc(url, "anvil_reorg", [1, []])

    async def mined_again() -> asyncpg.Record | None:
        row = await harness.row(request_id)
        moved = row is not None and row["block_hash"] not in (None, first["block_hash"])
        return row if moved else None

    again = await wait_for("funding mined again after the reorg", mined_again)
    assert again["tx_hash"] == first["tx_hash"]
    assert again["broadcasts"] >= 2
    await mine(url, 2)
    funded = await harness.funded(request_id)
    assert funded.txid == first["tx_hash"]
    assert await nonce(url, harness.tank) == 1
    assert await balance(url, escrow) == funded.amount == int(first["amount"])


async def test_requests_the_tank_cannot_serve_are_refused_with_an_alert(
    service_env: dict[str, str], work_dir: Path
) -> None:
    # No anvil: refusals are decided from the request and the registry alone.
    harness = Harness(service_env, work_dir, None)
    try:
        await harness.start()
        utxo = await harness.request("UNICITY", "alpha1qcr8te4kr609gcawutmrza0j4xv80jy8zn4smkh")
        greedy = await harness.request("ETH", new_escrow(), transfers=10_000)
        lowercase = await harness.request("ETH", new_escrow().lower())
        refusals = await wait_for(
            "three refusals",
            lambda: _alerts(harness, "funding_refused", 3),
        )
        assert {alert.detail.split(":")[0] for alert in refusals} == {utxo, greedy, lowercase}
        for request_id in (utxo, greedy, lowercase):
            row = await harness.row(request_id)
            assert row is not None and row["status"] == "REJECTED" and row["raw_tx"] is None
        assert harness.events.of(GasFunded) == []
    finally:
        await harness.close()


async def _alerts(harness: Harness, kind: str, count: int) -> list[AlertRaised] | None:
    alerts = [alert for alert in harness.events.of(AlertRaised) if alert.kind == kind]
    return alerts if len(alerts) >= count else None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"OTC_TANK_PATH": "m/44'/60'/1'/0/1"}, "config error: chain ETH: tank_address"),
        ({"OTC_SEED": "not a seed at all"}, "config error: OTC_SEED is malformed"),
        ({"OTC_TANK_LOW_BALANCE": "half"}, "config error: OTC_TANK_LOW_BALANCE is malformed"),
    ],
)
def test_wrong_key_or_config_exits_with_one_line(
    service_env: dict[str, str], extra: dict[str, str], expected: str
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTC_")}
    done = subprocess.run(
        [sys.executable, "-m", "otc_tank"],
        env={**base, **service_env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert service_env["OTC_SEED"] not in done.stderr
