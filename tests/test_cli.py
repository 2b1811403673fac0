"""The operator commands of `otc`, each run as a real process against real NATS, PostgreSQL, anvil and
service processes: deals, queue (list, show, retry of the stored bytes), tank, chain halt/resume/rescan,
events tail and webhooks."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import nats
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from otc_cli.__main__ import app
from tests.conftest import EvmChains, Stack
from tests.e2e import Deal, EvmStack, Miner
from tests.support import ALICE_EVM, BOB_EVM, free_port, tank_address

T = TypeVar("T")
ETH = 10**18
SECRET = "cli-test-webhook-secret"
CONFIG_VARIABLES = ("OTC_DATABASE_URL", "OTC_NATS_URL", "OTC_REGISTRY_FILE")


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(env: dict[str, str]) -> dict[str, str]:
    """What an operator's shell has: the services' connection settings, nothing else of ours."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTC_")}
    return {**base, **{k: env[k] for k in CONFIG_VARIABLES if k in env}}


async def otc(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60) -> Ran:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otc_cli",
        *args,
        env=cli_env(env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), timeout)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def ok(env: dict[str, str], *args: str) -> Ran:
    ran = await otc(env, *args)
    assert ran.code == 0, f"otc {' '.join(args)} exited {ran.code}\n{ran.out}\n{ran.err}"
    assert "Traceback" not in ran.err
    return ran


async def refused(env: dict[str, str], *args: str, code: int = 1) -> Ran:
    ran = await otc(env, *args)
    assert ran.code == code, f"otc {' '.join(args)} exited {ran.code}, expected {code}\n{ran.out}\n{ran.err}"
    assert "Traceback" not in ran.err and "error:" in ran.err
    return ran


async def wait_for(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def metric(base_url: str, name: str, **labels: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# --------------------------------------------------------------------------- help and configuration


COMMANDS = [
    ["deals", "list"],
    ["deals", "show"],
    ["queue", "list"],
    ["queue", "show"],
    ["queue", "retry"],
    ["tank", "status"],
    ["chain", "halt"],
    ["chain", "resume"],
    ["chain", "halts"],
    ["chain", "rescan"],
    ["events", "tail"],
    ["webhooks", "list"],
    ["webhooks", "redeliver"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--endpoints" in result.output


async def test_missing_configuration_is_one_clear_line_and_the_endpoints_file_fills_it(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    nowhere = tmp_path / "nowhere" / "endpoints.json"
    missing = await otc({}, "deals", "list", "--endpoints", str(nowhere))
    assert missing.code == 2 and "Traceback" not in missing.err
    assert "OTC_DATABASE_URL is not set" in missing.err and "otc dev up" in missing.err

    # A dev stack's endpoints.json, with its registry.toml beside it, stands in for the variables.
    (tmp_path / "endpoints.json").write_text(
        json.dumps({"database": service_env["OTC_DATABASE_URL"], "nats": service_env["OTC_NATS_URL"]})
    )
    (tmp_path / "registry.toml").write_text(Path(service_env["OTC_REGISTRY_FILE"]).read_text())
    no_tables = await refused({}, "deals", "list", "--endpoints", str(tmp_path / "endpoints.json"))
    assert "no engine tables" in no_tables.err, "reached the database named by endpoints.json"
    bad_stage = await otc(service_env, "deals", "list", "--stage", "NOPE")
    assert bad_stage.code == 2 and "not a stage" in bad_stage.err


def test_retry_reads_node_answers_in_plain_words() -> None:
    from otc_cli.ops.queue import classify

    assert classify("transaction already imported") == ("already known to the node", True)
    assert classify("already known")[1] and classify("txn-already-in-mempool")[1]
    assert classify("nonce too low")[1] and "nonce is used" in classify("nonce too low")[0]
    assert classify("bad-txns-inputs-missingorspent")[1]
    assert classify("replacement transaction underpriced") == ("refused: replacement transaction underpriced", False)
    assert classify("insufficient funds for gas * price + value")[1] is False


# --------------------------------------------------------------------------- engine and gateway


class Receiver:
    """A webhook endpoint recording every body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def hook(self, request: web.Request) -> web.Response:
        self.bodies.append((request.headers.get("X-OTC-Event-Id", ""), await request.read()))
        return web.Response(text="ok")

    async def start(self) -> None:
        application = web.Application()
        application.router.add_post("/hook", self.hook)
        self.runner = web.AppRunner(application, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    running = Receiver()
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def hooked_stack(service_env: dict[str, str], work_dir: Path, receiver: Receiver) -> AsyncIterator[Stack]:
    env = {
        **service_env,
        "OTC_WEBHOOK_URLS": receiver.url,
        "OTC_WEBHOOK_SECRET": SECRET,
        "OTC_NOTIFY_RETRY_SECONDS": "0.2",
        "OTC_NOTIFY_RETRY_MAX_SECONDS": "1",
    }
    running = Stack(env, work_dir)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def create_deal(stack: Stack, name: str) -> dict[str, Any]:
    created: dict[str, Any] = await stack.rpc.result(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "1.5"},
            "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "4000.25"},
            "timeoutSeconds": 3600,
            "name": name,
        },
    )
    return created


async def fill_both(stack: Stack, deal: dict[str, Any]) -> None:
    for party, token, payback, recipient in (
        ("ALICE", deal["aliceToken"], ALICE_EVM, BOB_EVM),
        ("BOB", deal["bobToken"], BOB_EVM, ALICE_EVM),
    ):
        await stack.rpc.result(
            "otc.fillPartyDetails",
            {
                "dealId": deal["dealId"],
                "party": party,
                "token": token,
                "paybackAddress": payback,
                "recipientAddress": recipient,
            },
        )


async def consumers_on(nats_url: str, stream: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.consumer_count)
    finally:
        await nc.close()


async def test_deals_events_webhooks_and_the_engine_admin_api(
    hooked_stack: Stack, service_env: dict[str, str], receiver: Receiver
) -> None:
    env = service_env
    stack = hooked_stack

    # events tail follows new events live: start it, wait for its consumer, then make one happen.
    consumers = await consumers_on(env["OTC_NATS_URL"], "DEALS")
    live = asyncio.create_task(otc(env, "events", "tail", "--stream", "DEALS", "--count", "1", "--timeout", "30"))
    await wait_for(
        lambda: _more(consumers_on(env["OTC_NATS_URL"], "DEALS"), consumers), "the tail's consumer", timeout=20
    )
    filled = await create_deal(stack, "Filled desk trade")
    tailed = await live
    assert tailed.code == 0, tailed.err
    [first_line] = tailed.out.splitlines()
    assert "DEALS" in first_line and "deal.created" in first_line and f"deal_id={filled['dealId']}" in first_line
    assert "name=Filled desk trade" in first_line and "alice=1500000000000000000ETH@ETH" in first_line
    await fill_both(stack, filled)
    fresh = await create_deal(stack, "Fresh desk trade")

    # deals list: newest first, filtered by stage, as JSON and as a table.
    listed = (await ok(env, "deals", "list", "--json")).json()
    assert [d["dealId"] for d in listed] == [fresh["dealId"], filled["dealId"]]
    assert [d["stage"] for d in listed] == ["CREATED", "COLLECTION"]
    assert listed[1]["alice"] == {"chain": "ETH", "amount": "1.5", "baseUnits": str(3 * ETH // 2), "asset": "ETH"}
    assert listed[1]["bob"]["amount"] == "4000.25" and listed[1]["bob"]["asset"] == "USDT"
    created_only = (await ok(env, "deals", "list", "--stage", "created", "--json")).json()
    assert [d["dealId"] for d in created_only] == [fresh["dealId"]]
    table = (await ok(env, "deals", "list", "--limit", "1")).out
    assert fresh["dealId"] in table and filled["dealId"] not in table and "1 deal(s)" in table

    # deals show: sides, escrows, the audit trail.
    shown = (await ok(env, "deals", "show", filled["dealId"], "--json")).json()
    assert shown["stage"] == "COLLECTION" and shown["outcome"] is None
    assert [s["party"] for s in shown["sides"]] == ["ALICE", "BOB"]
    alice, bob = shown["sides"]
    assert alice["paybackAddress"] == ALICE_EVM and bob["recipientAddress"] == ALICE_EVM
    assert alice["commission"]["amount"] == "0.0045" and alice["feeReserve"]["amount"] == "0.001"
    assert [e["type"] for e in shown["events"]] == [
        "deal.created",
        "deal.party_filled",
        "deal.party_filled",
        "deal.stage_changed",
    ]
    assert shown["deposits"] == [] and shown["transfers"] == []
    text = (await ok(env, "deals", "show", filled["dealId"])).out
    assert alice["escrowAddress"] in text and "COLLECTION" in text and "deal.stage_changed" in text
    assert "no deal with id 'nope'" in (await refused(env, "deals", "show", "nope")).err

    # events tail replays a deal's history in order with --all, then stops at --count.
    history = await ok(env, "events", "tail", "--deal", filled["dealId"], "--all", "--count", "6", "--timeout", "20")
    types = [line.split()[2] for line in history.out.splitlines()]
    assert types == [
        "deal.created",
        "deal.escrow_assigned",
        "deal.escrow_assigned",
        "deal.party_filled",
        "deal.party_filled",
        "deal.stage_changed",
    ]
    assert "stage=COLLECTION previous=CREATED" in history.out.splitlines()[-1]
    as_json = await ok(env, "events", "tail", "--stream", "DEALS", "--all", "--json", "--count", "2", "--timeout", "20")
    records = [json.loads(line) for line in as_json.out.splitlines()]
    assert [r["type"] for r in records] == ["deal.created", "deal.escrow_assigned"]
    quiet = await ok(env, "events", "tail", "--stream", "TANK", "--timeout", "1")
    assert quiet.out == "", "nothing happened on TANK: the timeout ends it with no lines"

    # webhooks: every deal event delivered; a redelivery sends the same bytes again.
    events_of_filled = 6

    async def delivered() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = (
            await ok(env, "webhooks", "list", "--deal", filled["dealId"], "--status", "DELIVERED", "--json")
        ).json()
        return rows if len(rows) == events_of_filled else None

    rows = await wait_for(delivered, "the filled deal's webhooks", timeout=30)
    assert {r["url"] for r in rows} == {f"http://127.0.0.1:{receiver.port}"}, "the path is not shown"
    assert all(r["attempts"] == 1 and r["last_status"] == 200 for r in rows)
    created_row = next(r for r in rows if r["event_type"] == "deal.created")
    listing = (await ok(env, "webhooks", "list", "--deal", filled["dealId"])).out
    assert str(created_row["id"]) in listing and "DELIVERED" in listing
    again = (await ok(env, "webhooks", "redeliver", str(created_row["id"]), "--json")).json()
    assert again["status"] == "PENDING" and again["id"] == created_row["id"]

    def bodies_of(event_id: str) -> list[bytes]:
        return [body for eid, body in receiver.bodies if eid == event_id]

    async def sent_twice() -> bool:
        return len(bodies_of(created_row["event_id"])) == 2

    await wait_for(sent_twice, "the redelivery")
    first, second = bodies_of(created_row["event_id"])
    assert first == second
    assert "no webhook delivery with id 987654" in (await refused(env, "webhooks", "redeliver", "987654")).err

    # The engine's admin API: halt, list, halt again, refuse an unknown chain, resume.
    halted = await ok(env, "chain", "halt", "ETH", "--reason", "node upgrade")
    assert "payouts on ETH halted: node upgrade" in halted.out
    [halt] = (await ok(env, "chain", "halts", "--json")).json()
    assert (halt["chain"], halt["reason"]) == ("ETH", "node upgrade")
    repeat = await ok(env, "chain", "halt", "ETH", "--reason", "another reason")
    assert "already halted" in repeat.out and "node upgrade" in repeat.out
    assert "unknown chain 'NOPE'" in (await refused(env, "chain", "halt", "NOPE", "--reason", "x")).err
    declined = await otc(env, "chain", "resume", "ETH", stdin="n\n")
    assert declined.code == 1 and "node upgrade" in declined.out, "the prompt shows why it was halted"
    assert len((await ok(env, "chain", "halts", "--json")).json()) == 1
    resumed = (await ok(env, "chain", "resume", "ETH", "--yes", "--json")).json()
    assert resumed["resumed"] is True and resumed["previousReason"] == "node upgrade"
    assert (await ok(env, "chain", "halts")).out.strip() == "no chain is halted"
    alerts = await ok(env, "events", "tail", "--stream", "ALERTS", "--all", "--count", "1", "--timeout", "10")
    assert "alert.raised" in alerts.out and "kind=chain_halted" in alerts.out and "chain=ETH" in alerts.out

    # Malformed admin requests are answered with the public API's error codes.
    nc = await nats.connect(env["OTC_NATS_URL"])
    try:
        for request, code in (
            (b'{"method": "chain.nope", "params": {}}', -32601),
            (b'{"method": "chain.halt", "params": {"chain": "ETH"}}', -32602),
            (b'{"method": "chain.halts", "params": {"extra": 1}}', -32602),
            (b"not json", -32600),
        ):
            answer = json.loads((await nc.request("otc.admin.engine", request, timeout=10)).data)
            assert answer["error"]["code"] == code, (request, answer)
    finally:
        await nc.close()

    # The admin API is on the bus only: the public gateway does not forward it.
    reply = await stack.rpc.call("chain.halt", {"chain": "ETH", "reason": "from outside"})
    assert reply["error"]["code"] == -32601
    assert (await ok(env, "chain", "halts", "--json")).json() == []

    await stack.engines[0].stop()
    gone = await refused(env, "chain", "halts", "--timeout", "3")
    assert "no engine is answering" in gone.err


async def chain_events_handled(env: dict[str, str], chain: str) -> bool:
    """The watcher's outbox is published and the engine's chain consumer has nothing pending."""
    conn = await asyncpg.connect(
        env["OTC_DATABASE_URL"], server_settings={"search_path": f"watcher_evm_{chain.lower()}"}
    )
    try:
        if await conn.fetchval("SELECT count(*) FROM outbox"):
            return False
    finally:
        await conn.close()
    nc = await nats.connect(env["OTC_NATS_URL"])
    try:
        info = await nc.jetstream().consumer_info("CHAIN", f"engine-chain-{chain}")
        return not info.num_pending and not info.num_ack_pending
    finally:
        await nc.close()


async def _more(count: Awaitable[int], than: int) -> bool:
    return await count > than


# --------------------------------------------------------------------------- the whole EVM system


@pytest.fixture
async def evm_stack(evm_env: dict[str, str], evm_chains: EvmChains, work_dir: Path) -> AsyncIterator[EvmStack]:
    running = EvmStack(evm_env, work_dir, evm_chains)
    await running.start()
    running.miner.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_halt_holds_payouts_queue_retry_resends_stored_bytes_resume_completes_then_rescan(
    evm_stack: EvmStack, evm_env: dict[str, str]
) -> None:
    env = evm_env
    stack = evm_stack
    await ok(env, "chain", "halt", "ETH", "--reason", "maintenance")

    deal = await Deal.create(stack, ("ETH", "ETH", "0.5"), ("POLYGON", "USDT", "1000"))
    await deal.fill()
    await asyncio.gather(
        deal.deposit("ALICE", await deal.required("ALICE")), deal.deposit("BOB", await deal.required("BOB"))
    )
    await deal.wait("SWAP")

    async def bob_paid_out() -> bool:
        transfers = (await deal.status())["transfers"]
        return any(
            t["purpose"] == "SWAP_PAYOUT" and t["chainId"] == "POLYGON" and t["status"] == "CONFIRMED"
            for t in transfers
        )

    await wait_for(bob_paid_out, "Bob's side paid out on POLYGON")
    # By now ETH's transfers would long have been commanded, were the chain not halted.
    shown = (await ok(env, "deals", "show", deal.id, "--json")).json()
    eth_transfers = [t for t in shown["transfers"] if t["chain"] == "ETH"]
    assert sorted(t["purpose"] for t in eth_transfers) == ["COMMISSION", "SWAP_PAYOUT"]
    assert {t["status"] for t in eth_transfers} == {"PLANNED"}
    assert (await ok(env, "queue", "list", "--chain", "ETH", "--json")).json() == []
    assert "(halted)" in (await ok(env, "deals", "show", deal.id)).out

    # queue list / show on a real transfer.
    polygon = (await ok(env, "queue", "list", "--chain", "POLYGON", "--json")).json()
    payout = next(t for t in polygon if t["purpose"] == "SWAP_PAYOUT")
    assert (
        payout["dealId"] == deal.id and payout["amount"]["amount"] == "1000" and payout["to"] == deal.recipient["ALICE"]
    )
    detail = (await ok(env, "queue", "show", payout["transferId"], "--json")).json()
    assert detail["status"] == "CONFIRMED" and isinstance(detail["nonce"], int)
    assert detail["candidates"] and detail["candidates"][0]["txid"] == detail["txid"]
    assert payout["transferId"] in (await ok(env, "queue", "list", "--status", "confirmed")).out
    confirmed_retry = await ok(env, "queue", "retry", payout["transferId"])
    assert "already CONFIRMED" in confirmed_retry.out
    assert "no transfer with id 'nope'" in (await refused(env, "queue", "show", "nope")).err

    # Blocks stop on ETH, so the payouts the resume commands wait in the node's pool.
    await stack.miner.stop()
    polygon_miner = Miner([stack.polygon])
    polygon_miner.start()
    await stack.eth.call("evm_setAutomine", False)
    resumed = (await ok(env, "chain", "resume", "ETH", "--yes", "--json")).json()
    assert resumed["commanded"] == 2 and resumed["deals"] == 1
    eth_payout = next(t for t in eth_transfers if t["purpose"] == "SWAP_PAYOUT")["transferId"]

    async def signed() -> dict[str, Any] | None:
        found: dict[str, Any] = (await ok(env, "queue", "show", eth_payout, "--json")).json()
        return found if found["status"] == "SIGNED" and found["candidates"] else None

    pending = await wait_for(signed, "the ETH payout signed and broadcast")
    [candidate] = pending["candidates"]
    assert candidate["minedBlock"] is None
    in_pool = await stack.eth.call("eth_getTransactionByHash", candidate["txid"])
    assert in_pool is not None and in_pool["blockNumber"] is None
    retried = await ok(env, "queue", "retry", eth_payout, "--json")
    [broadcast] = retried.json()["broadcasts"]
    assert broadcast == {
        "leg": 0,
        "seq": 0,
        "txid": candidate["txid"],
        "outcome": "already known to the node",
        "ok": True,
    }
    # The node holds exactly the bytes the queue signed, once.
    pool = await stack.eth.call("txpool_content")
    escrow = shown["sides"][0]["escrowAddress"].lower()
    assert candidate["txid"] in [tx["hash"] for tx in pool["pending"][escrow].values()]

    await polygon_miner.stop()
    await stack.eth.call("evm_setAutomine", True)
    stack.miner.start()
    await deal.wait("CLOSED", outcome="SWAPPED")
    assert (await ok(env, "queue", "show", eth_payout, "--json")).json()["txid"] == candidate["txid"]

    # tank status: the tank's address on each chain, stored and live balances, nothing waiting.
    tanks = {row["chain"]: row for row in (await ok(env, "tank", "status", "--json")).json()}
    assert set(tanks) == {"ETH", "POLYGON"}
    for chain_id, row in tanks.items():
        assert row["address"] == tank_address() and row["waiting"] == 0 and row["liveError"] is None
        live = await stack.chain(chain_id).balance(tank_address())
        assert row["liveBalance"]["baseUnits"] == str(live)
    assert all(row["storedBalance"] is not None for row in tanks.values()), "the tank records what it saw"
    assert int(tanks["POLYGON"]["liveBalance"]["baseUnits"]) < 100 * ETH
    assert tank_address() in (await ok(env, "tank", "status")).out

    # rescan: the watcher publishes Alice's old deposit again; the engine keeps one.
    before = (await ok(env, "deals", "show", deal.id, "--json")).json()
    [alice_deposit] = [d for d in before["deposits"] if d["party"] == "ALICE"]
    watcher = stack.procs["watcher-ETH"].url
    published = await metric(watcher, "otc_watcher_deposits_total", chain="ETH", kind="native")
    height = await stack.eth.height()
    result = (await ok(env, "chain", "rescan", "ETH", "--from", str(alice_deposit["blockNumber"]), "--json")).json()
    assert result["head"] == alice_deposit["blockNumber"] - 1 and result["previousHead"] >= alice_deposit["blockNumber"]
    assert result["balancesRewound"] is True

    async def republished() -> bool:
        return await metric(watcher, "otc_watcher_deposits_total", chain="ETH", kind="native") > published

    await wait_for(republished, "the watcher to publish the old deposit again")

    async def caught_up() -> bool:
        return await metric(watcher, "otc_watcher_height", chain="ETH") >= height

    await wait_for(caught_up, "the watcher back at the tip")
    await stack.mine(3)
    await wait_for(lambda: chain_events_handled(env, "ETH"), "the engine to handle what the re-scan published")
    after = (await ok(env, "deals", "show", deal.id, "--json")).json()
    assert after["deposits"] == before["deposits"], "the duplicate deposit changed nothing"
    assert after["events"] == before["events"] and after["transfers"] == before["transfers"]
    assert after["stage"] == "CLOSED" and after["outcome"] == "SWAPPED"
    assert "only EVM" in (await refused(env, "chain", "rescan", "UNICITY", "--from", "5")).err
    assert "at most" in (await refused(env, "chain", "rescan", "ETH", "--from", str(10**9))).err
