"""Metrics the alert rules and the dashboard rely on, scraped from /metrics of real service processes.

- the tank exports its low-balance threshold per chain next to its balance (OtcTankLowBalance);
- the engine exports how long the oldest deal of each open stage has been in it (OtcDealStuck), and
  `otc_chain_halted` returns to 0 on every replica once a chain is resumed (OtcDeepReorgHalt);
- both watchers time a deposit from its publishing to its block reaching the threshold, once each,
  a reorg that re-processes the threshold block included; the EVM watcher closes its node client
  when it stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import pytest
from eth_account import Account
from prometheus_client.parser import text_string_to_metric_families

from otc_cli import contracts
from otc_common import subjects
from otc_common.bus import Bus
from otc_common.keys import EscrowKeyring
from otc_common.messages import EscrowAssigned, Party
from otc_common.signing_keys import account_xpub, load_seed
from tests.conftest import EvmChains, Stack
from tests.support import ALICE_EVM, BOB_EVM, TEST_SEED_HEX, UTXO_PATH, ServiceProcess, tank_address
from tests.utxo_support import UnicityDevnet

ETHER = 10**18
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(process: ServiceProcess) -> Samples:
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(f"{process.url}/metrics", timeout=5)).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def eventually(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    """Polls `check` until it returns something truthy; the deadline is generous for a busy machine."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"not reached within {timeout}s: {what} (last: {last!r})")


async def metric_is(
    process: ServiceProcess, name: str, expected: float, timeout: float = 60.0, **labels: str
) -> Samples:
    seen: list[float | None] = [None]

    async def check() -> Samples | None:
        samples = await scrape(process)
        seen[0] = value(samples, name, **labels)
        return samples if seen[0] == expected else None

    try:
        result: Samples = await eventually(f"{name}{labels} == {expected}", check, timeout)
    except AssertionError:
        raise AssertionError(
            f"{name}{labels} is {seen[0]}, not {expected}, after {timeout}s\n{process.log_tail()}"
        ) from None
    return result


async def json_rpc(url: str, method: str, *params: Any) -> Any:
    async with httpx.AsyncClient(trust_env=False) as client:
        reply = (
            await client.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        ).json()
    assert "error" not in reply, reply
    return reply["result"]


# --------------------------------------------------------------------------- tank


async def test_tank_exports_each_chains_low_balance_threshold_beside_its_balance(
    evm_env: dict[str, str], evm_chains: EvmChains, work_dir: Path
) -> None:
    await json_rpc(evm_chains.rpc["ETH"], "anvil_setBalance", tank_address(), hex(ETHER // 10))
    await json_rpc(evm_chains.rpc["POLYGON"], "anvil_setBalance", tank_address(), hex(5 * ETHER))
    env = {
        **evm_env,
        "OTC_TANK_POLL_SECONDS": "0.3",
        "OTC_TANK_LOW_BALANCE": "0.25",
        "OTC_TANK_LOW_BALANCE_POLYGON": "3",
    }
    tank = ServiceProcess("tank", ["-m", "otc_tank"], env, work_dir)
    await tank.start()
    try:
        await metric_is(tank, "otc_tank_balance_wei", ETHER // 10, chain="ETH")
        samples = await metric_is(tank, "otc_tank_balance_wei", 5 * ETHER, chain="POLYGON")
    finally:
        await tank.stop()
    thresholds = {
        chain: value(samples, "otc_tank_low_balance_threshold_wei", chain=chain) for chain in ("ETH", "POLYGON")
    }
    assert thresholds == {"ETH": ETHER // 4, "POLYGON": 3 * ETHER}, "the default, and a chain's own setting"
    # What OtcTankLowBalance computes: balance < on (chain) threshold.
    low = {
        chain
        for chain, threshold in thresholds.items()
        if (balance := value(samples, "otc_tank_balance_wei", chain=chain)) is not None
        and threshold is not None
        and balance < threshold
    }
    assert low == {"ETH"}


# --------------------------------------------------------------------------- engine


async def admin(nats_url: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    from otc_engine.admin import ADMIN_SUBJECT

    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(ADMIN_SUBJECT, msgspec.json.encode({"method": method, "params": params}), timeout=20)
    finally:
        await nc.close()
    reply = msgspec.json.decode(msg.data)
    assert reply.get("error") is None, reply
    result: dict[str, Any] = reply["result"]
    return result


@pytest.fixture
async def two_engines(service_env: dict[str, str], work_dir: Path) -> AsyncIterator[Stack]:
    running = Stack(service_env, work_dir, engines=2)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_halted_gauge_returns_to_zero_on_every_replica_after_a_resume(two_engines: Stack) -> None:
    engines = two_engines.engines
    nats_url = two_engines.env["OTC_NATS_URL"]
    for engine in engines:
        await metric_is(engine, "otc_chain_halted", 0, chain="POLYGON")

    await admin(nats_url, "chain.halt", {"chain": "POLYGON", "reason": "deep reorg under review"})
    # One replica served the call; the other learns of the halt from the database.
    for engine in engines:
        await metric_is(engine, "otc_chain_halted", 1, chain="POLYGON")

    resumed = await admin(nats_url, "chain.resume", {"chain": "POLYGON"})
    assert resumed["resumed"] is True
    for engine in engines:
        samples = await metric_is(engine, "otc_chain_halted", 0, chain="POLYGON")
        assert value(samples, "otc_chain_halted", chain="ETH") == 0, "every registry chain is shown, halted or not"


async def test_oldest_deal_per_stage_counts_from_entering_the_stage(stack: Stack) -> None:
    (engine,) = stack.engines
    created = await stack.rpc.result(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "1"},
            "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "2000"},
            "timeoutSeconds": 3600,
        },
    )
    deal_id = created["dealId"]
    # A deal left in CREATED for two hours, as an operator would find it.
    db = await asyncpg.connect(stack.database_url)
    try:
        await db.execute(
            "UPDATE engine.deals SET created_at = now() - interval '2 hours', updated_at = now() - interval '2 hours'"
            " WHERE deal_id = $1",
            deal_id,
        )
    finally:
        await db.close()

    async def created_is_old() -> Samples | None:
        samples = await scrape(engine)
        age = value(samples, "otc_deals_oldest_seconds", stage="CREATED")
        return samples if age is not None and 7200 <= age < 7200 + 600 else None

    samples = await eventually("the CREATED deal two hours old", created_is_old)
    assert value(samples, "otc_deals_oldest_seconds", stage="COLLECTION") == 0
    assert value(samples, "otc_deals_oldest_seconds", stage="CLOSED") is None, "closed deals have no age to watch"

    for party, payback, recipient in (("ALICE", ALICE_EVM, BOB_EVM), ("BOB", BOB_EVM, ALICE_EVM)):
        await stack.rpc.result(
            "otc.fillPartyDetails",
            {
                "dealId": deal_id,
                "party": party,
                "token": created[f"{party.lower()}Token"],
                "paybackAddress": payback,
                "recipientAddress": recipient,
            },
        )

    async def in_collection() -> Samples | None:
        samples = await scrape(engine)
        if value(samples, "otc_deals", stage="COLLECTION") != 1:
            return None
        return samples

    samples = await eventually("the deal counted in COLLECTION", in_collection)
    assert value(samples, "otc_deals_oldest_seconds", stage="CREATED") == 0
    # Its age restarted when it entered COLLECTION: the two hours in CREATED do not count.
    collection_age = value(samples, "otc_deals_oldest_seconds", stage="COLLECTION")
    assert collection_age is not None and 0 <= collection_age < 600


# --------------------------------------------------------------------------- watchers


async def assign(bus: Bus, chain: str, asset: str, address: str, index: int) -> None:
    await bus.publish(
        subjects.deal(f"deal-{index}"),
        EscrowAssigned(
            deal_id=f"deal-{index}", party=Party.ALICE, chain=chain, asset=asset, address=address, escrow_index=index
        ),
    )


async def published_row(db: asyncpg.Connection, schema: str, txid: str) -> asyncpg.Record | None:
    try:
        return await db.fetchrow(f"SELECT seen_at, confirmed_at FROM {schema}.published WHERE txid = $1", txid)
    except asyncpg.UndefinedTableError:
        return None


async def confirmation_histogram(process: ServiceProcess, chain: str) -> tuple[float | None, float | None]:
    samples = await scrape(process)
    return (
        value(samples, "otc_watcher_deposit_confirmation_seconds_count", chain=chain),
        value(samples, "otc_watcher_deposit_confirmation_seconds_sum", chain=chain),
    )


async def check_deposit_timing(
    watcher: ServiceProcess,
    db: asyncpg.Connection,
    schema: str,
    chain: str,
    txid: str,
    mine: Callable[[], Awaitable[None]],
    replace_last_block: Callable[[], Awaitable[None]],
    tip: Callable[[], Awaitable[int]],
) -> None:
    """The deposit `txid` is in the chain's last block; the threshold (2) is one block away."""
    await eventually("the deposit published", lambda: published_row(db, schema, txid))
    count, _ = await confirmation_histogram(watcher, chain)
    assert not count, "nothing is reported before the threshold"
    # Parties wait this long at least, so the histogram must show it.
    gap = 1.5
    await asyncio.sleep(gap)
    await mine()
    await metric_is(watcher, "otc_watcher_deposit_confirmation_seconds_count", 1, chain=chain)
    row = await published_row(db, schema, txid)
    assert row is not None and row["confirmed_at"] is not None
    waited = (row["confirmed_at"] - row["seen_at"]).total_seconds()
    _, total = await confirmation_histogram(watcher, chain)
    assert total is not None and total == pytest.approx(waited, abs=1e-3)
    assert gap <= waited < gap + 60

    # The threshold block is replaced, so the watcher rewinds to the deposit's block and processes a
    # new threshold block: the deposit was already reported.
    await replace_last_block()
    await mine()
    await metric_is(watcher, "otc_watcher_reorgs_total", 1, chain=chain)
    await metric_is(watcher, "otc_watcher_height", await tip(), chain=chain)
    count, _ = await confirmation_histogram(watcher, chain)
    assert count == 1, "a re-processed threshold block must not count the deposit again"


async def test_evm_watcher_times_a_deposit_from_publishing_to_the_threshold_once(
    evm_env: dict[str, str], evm_chains: EvmChains, work_dir: Path
) -> None:
    url = evm_chains.rpc["ETH"]
    bus = await Bus.connect(evm_env["OTC_NATS_URL"], "test")
    await bus.provision_streams()
    db = await asyncpg.connect(evm_env["OTC_DATABASE_URL"])
    watcher = ServiceProcess(
        "watcher-evm-eth",
        ["-m", "otc_watcher_evm", "--chain", "ETH"],
        {**evm_env, "OTC_POLL_INTERVAL_MS": "50"},
        work_dir,
    )
    try:
        await watcher.start()
        await metric_is(watcher, "otc_watcher_height", int(await json_rpc(url, "eth_blockNumber"), 16), chain="ETH")
        escrow = str(Account.create().address)
        await assign(bus, "ETH", "ETH", escrow, 1)
        await eventually(
            "the escrow watched",
            lambda: db.fetchval("SELECT count(*) FROM watcher_evm_eth.balances WHERE address = $1", escrow),
        )
        # anvil mines each transaction at once: the deposit's block is its first confirmation.
        txid = await asyncio.to_thread(contracts.send_native, url, escrow, ETHER, contracts.ANVIL_PRIVATE_KEYS[1])

        async def mine() -> None:
            await json_rpc(url, "anvil_mine", "0x1")

        async def reorg() -> None:
            await json_rpc(url, "anvil_reorg", 1, [])

        async def tip() -> int:
            return int(await json_rpc(url, "eth_blockNumber"), 16)

        await check_deposit_timing(watcher, db, "watcher_evm_eth", "ETH", txid, mine, reorg, tip)
        assert await watcher.stop() == 0
        # Its node client is closed on the way out, not reported unclosed by the collector.
        assert "Unclosed" not in watcher.log_path.read_text(), watcher.log_tail()
    finally:
        await watcher.stop()
        await db.close()
        await bus.close()


async def test_utxo_watcher_times_a_deposit_from_publishing_to_the_threshold_once(
    utxo_env: dict[str, str], unicity_devnet: UnicityDevnet, work_dir: Path
) -> None:
    bus = await Bus.connect(utxo_env["OTC_NATS_URL"], "test")
    await bus.provision_streams()
    db = await asyncpg.connect(utxo_env["OTC_DATABASE_URL"])
    watcher = ServiceProcess("watcher-utxo", ["-m", "otc_watcher_utxo", "--chain", "UNICITY"], utxo_env, work_dir)
    keyring = EscrowKeyring(account_xpub(load_seed(TEST_SEED_HEX), UTXO_PATH), UTXO_PATH)
    try:
        await watcher.start()
        await metric_is(watcher, "otc_watcher_height", await unicity_devnet.height(), chain="UNICITY")
        escrow = keyring.utxo_address(1, "alpha")
        await assign(bus, "UNICITY", "ALPHA", escrow, 1)
        await eventually(
            "the escrow watched",
            lambda: db.fetchval("SELECT count(*) FROM watcher_utxo_unicity.watch_set WHERE address = $1", escrow),
        )
        txid = await unicity_devnet.faucet(escrow, 3 * 10**8)
        await unicity_devnet.mine(1)

        async def mine() -> None:
            await unicity_devnet.mine(1)

        async def reorg() -> None:
            await unicity_devnet.reorg(1)

        await check_deposit_timing(
            watcher, db, "watcher_utxo_unicity", "UNICITY", txid, mine, reorg, unicity_devnet.height
        )
    finally:
        await watcher.stop()
        await db.close()
        await bus.close()
