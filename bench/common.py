"""What the benchmarks share: their own servers, engine calls over the bus, bulk funding, bus drain, RSS, output.

Every benchmark starts its own NATS, PostgreSQL, anvil chains (and Unicity devnet where it needs one)
and runs each service as its own OS process, like the end-to-end tests; nothing here talks to a
server it did not start.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
from eth_account import Account

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Run as `python bench/x.py` as well as `python -m bench.x`: the test helpers live in tests/.
    sys.path.insert(0, str(ROOT))

from otc_cli import contracts  # noqa: E402
from otc_common import subjects  # noqa: E402
from otc_common.messages import EngineReply, EngineRequest  # noqa: E402
from tests.conftest import EvmChains, create_database, drop_database  # noqa: E402
from tests.e2e import fresh_address_on  # noqa: E402
from tests.support import TEST_SEED_HEX, write_test_registry  # noqa: E402

RESULTS = ROOT / "bench" / "results"

_reply_decoder = msgspec.json.Decoder(EngineReply)
_encoder = msgspec.json.Encoder()


# --------------------------------------------------------------------------- figures and output


def machine() -> dict[str, Any]:
    """The machine a figure came from: cores, CPU model, memory, and how busy it was when the run began."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 1),
        "p99": round(percentile(values, 99), 1),
        "max": round(max(values), 1) if values else None,
        "min": round(min(values), 1) if values else None,
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rss_mib(pid: int) -> float | None:
    """Resident memory of one process (VmRSS), or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used so far, or None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(procs: dict[str, Any]) -> dict[str, float | None]:
    """CPU seconds so far of each ServiceProcess by name."""
    return {name: cpu_seconds(p.proc.pid) if p.proc is not None else None for name, p in procs.items()}


def cpu_used(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float]:
    used = {}
    for name, start in before.items():
        end = after.get(name)
        if start is not None and end is not None:
            used[name] = round(end - start, 2)
    return used


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def interrupt_on_sigterm() -> None:
    """A SIGTERM unwinds like Ctrl-C, so the benchmark stops the servers and services it started."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def wait_for(check: Callable[[], Awaitable[bool]], within: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise TimeoutError(f"{what}: not within {within:.0f}s")


# --------------------------------------------------------------------------- servers


@dataclass
class Infra:
    """NATS, PostgreSQL with a fresh database, two anvil chains, optionally a Unicity devnet, and a registry."""

    work: Path
    nats_url: str
    pg_url: str
    database_url: str
    chains: EvmChains
    registry: Path
    devnet: Any = None
    _servers: list[Any] = field(default_factory=list)

    @classmethod
    async def start(cls, *, block_time: float | None = None, devnet: Callable[[Path], Any] | None = None) -> Infra:
        from otc_cli.servers import free_port, start_nats, start_postgres

        work = Path(tempfile.mkdtemp(prefix="otc-bench-"))
        os.chmod(work, 0o755)  # noqa: S103 - the database server runs as its own user and must reach its data
        nats_server = start_nats(work / "nats", free_port(), work / "nats.log")
        pg = start_postgres(work / "pg", work / "pg.log")
        chains = await asyncio.to_thread(EvmChains, work, block_time)
        unicity = devnet(work) if devnet is not None else None
        database = await create_database(pg.url)
        registry = write_test_registry(
            work / "registry.toml",
            chains.rpc["ETH"],
            chains.rpc["POLYGON"],
            eth_usdt=chains.usdt["ETH"],
            polygon_usdt=chains.usdt["POLYGON"],
            electrum=unicity.url if unicity is not None else "tcp://127.0.0.1:3",
        )
        return cls(work, nats_server.url, pg.url, database, chains, registry, unicity, [nats_server, pg])

    def env(self, log_level: str = "INFO") -> dict[str, str]:
        return {
            "OTC_NATS_URL": self.nats_url,
            "OTC_DATABASE_URL": self.database_url,
            "OTC_REGISTRY_FILE": str(self.registry),
            "OTC_SEED": TEST_SEED_HEX,
            "OTC_LOG_LEVEL": log_level,
        }

    def infra_pids(self) -> dict[str, int]:
        pids = {"nats": self._servers[0].pid, "postgres": self._servers[1].pid}
        for name, server in self.chains.servers.items():
            pids[f"anvil-{name}"] = server.pid
        if self.devnet is not None:
            pids["devnet"] = self.devnet.server.pid
        return {k: v for k, v in pids.items() if v is not None}

    async def stop(self, keep: bool = False) -> None:
        self.chains.stop()
        if self.devnet is not None:
            await self.devnet.close()
            self.devnet.stop()
        if not keep:  # a kept work folder keeps its database too, to be looked at afterwards
            try:
                await drop_database(self.pg_url, self.database_url)
            except Exception as exc:  # the run's figures are already out; a leftover database is harmless
                log(f"could not drop the bench database: {exc}")
        for server in reversed(self._servers):
            server.stop()
        if not keep:
            shutil.rmtree(self.work, ignore_errors=True)


async def start_stack(stack: Any, attempts: int = 3) -> None:
    """Starts an EvmStack, moving any service whose health port another program took to a fresh one.

    Ports are picked free when the stack is built and taken only when the service starts; on a shared
    machine another program can take one in between, and its /readyz may even answer for ours.
    """
    from otc_cli.servers import free_port
    from tests.support import RpcClient

    try:
        await stack.start()
    except (RuntimeError, TimeoutError) as exc:
        log(f"a service did not start, retrying on fresh ports: {str(exc).splitlines()[0]}")
    for _ in range(attempts):
        await asyncio.sleep(1.0)
        dead = [p for p in stack.procs.values() if p.proc is None or p.proc.poll() is not None]
        if not dead:
            stack.rpc = RpcClient(stack.procs["gateway"].url)
            return
        for proc in dead:
            proc.port = free_port()
            proc.env["OTC_HTTP_PORT"] = str(proc.port)
            await proc.start()
    raise RuntimeError("services keep failing to start: " + ", ".join(p.name for p in dead))


# --------------------------------------------------------------------------- the engine's own API


class EngineCalls:
    """The public deal methods sent straight to the engine over NATS (what the gateway forwards)."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        #: Calls the engine left unanswered for a whole wait: each is a stall worth reporting.
        self.stalls = 0

    @classmethod
    async def connect(cls, nats_url: str) -> EngineCalls:
        return cls(await nats.connect(nats_url, connect_timeout=30, max_reconnect_attempts=-1))

    async def call(
        self, method: str, params: dict[str, Any], wait: float = 60, done_if: int | None = None, attempts: int = 3
    ) -> Any:
        """The method's result. An unanswered call is retried (counted in `stalls`); when an earlier attempt
        may have taken effect after all, the error code `done_if` (e.g. details already filled) counts as done."""
        body = _encoder.encode(EngineRequest(method=method, params=msgspec.Raw(_encoder.encode(params))))
        for attempt in range(attempts):
            try:
                msg = await self.nc.request(subjects.ENGINE_RPC, body, timeout=wait)
            except nats.errors.TimeoutError:
                self.stalls += 1
                log(f"the engine did not answer {method} within {wait:.0f}s; retrying")
                continue
            reply = _reply_decoder.decode(msg.data)
            if reply.error is not None:
                if attempt > 0 and reply.error.code == done_if:
                    return None
                raise RuntimeError(f"{method}: {reply.error.code} {reply.error.message}")
            return reply.result
        raise TimeoutError(f"the engine did not answer {method} in {attempts} attempts of {wait:.0f}s")

    async def close(self) -> None:
        await self.nc.close()


@dataclass
class BenchDeal:
    deal_id: str
    sides: dict[str, tuple[str, str, str]]
    tokens: dict[str, str]
    payback: dict[str, str]
    recipient: dict[str, str]
    escrow: dict[str, str] = field(default_factory=dict)
    required: dict[str, int] = field(default_factory=dict)


def _side(chain: str, asset: str, amount: str) -> dict[str, str]:
    return {"chainId": chain, "asset": asset, "amount": amount}


async def open_deal(
    api: EngineCalls,
    alice: tuple[str, str, str],
    bob: tuple[str, str, str],
    timeout_seconds: int = 6 * 24 * 3600,
    with_status: bool = False,
) -> BenchDeal:
    """Creates a deal and fills both parties' details, leaving it in COLLECTION with its escrows watched."""
    created = await api.call(
        "otc.createDeal", {"alice": _side(*alice), "bob": _side(*bob), "timeoutSeconds": timeout_seconds}
    )
    deal = BenchDeal(
        deal_id=created["dealId"],
        sides={"ALICE": alice, "BOB": bob},
        tokens={"ALICE": created["aliceToken"], "BOB": created["bobToken"]},
        payback={"ALICE": fresh_address_on(alice[0]), "BOB": fresh_address_on(bob[0])},
        recipient={"ALICE": fresh_address_on(bob[0]), "BOB": fresh_address_on(alice[0])},
    )
    for party in ("ALICE", "BOB"):
        await api.call(
            "otc.fillPartyDetails",
            {
                "dealId": deal.deal_id,
                "party": party,
                "token": deal.tokens[party],
                "paybackAddress": deal.payback[party],
                "recipientAddress": deal.recipient[party],
            },
            done_if=1008,  # details already filled: the unanswered attempt went through
        )
    if with_status:
        await read_instructions(api, deal)
    return deal


async def read_instructions(api: EngineCalls, deal: BenchDeal) -> dict[str, Any]:
    from otc_common.money import parse_amount

    status: dict[str, Any] = await api.call("otc.status", {"dealId": deal.deal_id})
    for party in ("ALICE", "BOB"):
        instructions = status["instructions"][party.lower()]
        deal.escrow[party] = instructions["to"]
        deal.required[party] = parse_amount(instructions["amount"], DECIMALS.get(deal.sides[party][1], 18))
    return status


DECIMALS = {"USDT": 6, "ALPHA": 8}

#: The shapes of the background ("active") deals: native and token escrows on both EVM chains.
ACTIVE_SHAPES = (
    (("ETH", "ETH", "0.05"), ("POLYGON", "USDT", "100")),
    (("ETH", "USDT", "100"), ("POLYGON", "MATIC", "20")),
)


async def create_active_deals(
    api: EngineCalls,
    count: int,
    *,
    funded_every: int = 10,
    concurrency: int = 32,
    progress_every: int = 1000,
) -> list[BenchDeal]:
    """`count` deals in COLLECTION, both escrows watched; every `funded_every`-th is returned with its
    escrows read so the caller can fund one side (it then stays in COLLECTION, funded but not locked)."""
    deals: list[BenchDeal] = []
    next_index = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            alice, bob = ACTIVE_SHAPES[index % len(ACTIVE_SHAPES)]
            deal = await open_deal(api, alice, bob, with_status=funded_every > 0 and index % funded_every == 0)
            deals.append(deal)
            if len(deals) % progress_every == 0:
                log(f"  {len(deals)} active deals ({len(deals) / (time.monotonic() - started):.0f}/s)")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return deals


# --------------------------------------------------------------------------- bus drained


async def wait_drained(nats_url: str, database_url: str, within: float = 900, quiet: float = 1.0) -> float:
    """Waits until every outbox is empty and every durable consumer has nothing pending; the seconds it took."""
    started = time.monotonic()
    nc = await nats.connect(nats_url, connect_timeout=30)
    db = await asyncpg.connect(database_url)
    try:
        schemas = [
            r["table_schema"]
            for r in await db.fetch("SELECT table_schema FROM information_schema.tables WHERE table_name = 'outbox'")
        ]
        js = nc.jetstream()
        calm_since: float | None = None
        deadline = started + within
        while time.monotonic() < deadline:
            busy = 0
            for schema in schemas:
                busy += await db.fetchval(f'SELECT count(*) FROM "{schema}".outbox')
            for stream in await js.streams_info():
                for consumer in await js.consumers_info(stream.config.name or ""):
                    busy += (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
            if busy == 0:
                calm_since = calm_since or time.monotonic()
                if time.monotonic() - calm_since >= quiet:
                    return time.monotonic() - started
            else:
                calm_since = None
            await asyncio.sleep(0.25)
        raise TimeoutError(f"the bus did not drain within {within:.0f}s")
    finally:
        await db.close()
        await nc.close()


class BacklogSampler:
    """Every few seconds, each durable consumer's backlog (pending + unacknowledged): where the work queues up."""

    def __init__(self, nats_url: str, every: float = 2.0) -> None:
        self.nats_url = nats_url
        self.every = every
        self.samples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        nc = await nats.connect(self.nats_url, connect_timeout=30, max_reconnect_attempts=-1)
        started = time.monotonic()
        try:
            js = nc.jetstream()
            while True:
                sample: dict[str, Any] = {"t": round(time.monotonic() - started, 1)}
                try:
                    for stream in await js.streams_info():
                        for consumer in await js.consumers_info(stream.config.name or ""):
                            sample[consumer.name] = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
                except (nats.errors.Error, TimeoutError) as exc:  # a busy server: this sample is skipped
                    log(f"backlog sample skipped: {exc!r}")
                else:
                    self.samples.append(sample)
                await asyncio.sleep(self.every)
        finally:
            await nc.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        """Per consumer: its largest backlog, when that was, and when it last had any."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        consumers = sorted({k for s in self.samples for k in s if k != "t"})
        peaks = {}
        for name in consumers:
            values = [(s.get(name, 0), s["t"]) for s in self.samples]
            peak, at = max(values)
            busy = [t for v, t in values if v > 0]
            peaks[name] = {
                "peak": peak,
                "peak_at_s": at,
                "last_busy_at_s": max(busy) if busy else None,
                "samples": [[t, v] for v, t in values],
            }
        return {"every_s": self.every, "consumers": peaks}


async def handle_times(service_url: str) -> dict[str, dict[str, float]]:
    """A service's own per-consumer, per-event-type handling time (inbox transaction included), from /metrics."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        text = (await client.get(f"{service_url}/metrics")).text
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            prefix = f"otc_consumer_handle_seconds{suffix}{{"
            if line.startswith(prefix):
                labels, value = line[len(prefix) :].rsplit("} ", 1)
                parts = dict(part.split("=", 1) for part in labels.split(","))
                key = f"{parts['consumer'].strip(chr(34))} {parts['type'].strip(chr(34))}"
                into[key] = float(value)
    return {
        key: {
            "count": int(counts[key]),
            "total_s": round(sums[key], 1),
            "mean_ms": round(1000 * sums[key] / counts[key], 1) if counts[key] else 0.0,
        }
        for key in sorted(sums, key=lambda k: -sums[k])
        if key in counts
    }


async def histogram_totals(service_url: str, metric: str) -> tuple[float, float]:
    """(count, sum) of one histogram across its labels, from a service's /metrics; zeros if it has none yet."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        text = (await client.get(f"{service_url}/metrics")).text
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{metric}_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{metric}_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


async def read_stream(nats_url: str, stream: str, subject: str) -> list[tuple[Any, Any]]:
    """Every (envelope, message) a stream holds on `subject`, oldest first; types this build lacks are skipped."""
    from otc_common.messages import decode_envelope

    nc = await nats.connect(nats_url, connect_timeout=30)
    found = []
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                break
            try:
                found.append(decode_envelope(msg.data))
            except Exception:  # noqa: S112 - an event type this build does not know is not ours to judge
                continue
    finally:
        await nc.close()
    return found


async def alerts_raised(nats_url: str) -> dict[str, int]:
    """How many alerts of each source and kind the run raised: a benchmark should raise none."""
    from otc_common.messages import AlertRaised

    counts: dict[str, int] = {}
    for _envelope, message in await read_stream(nats_url, "ALERTS", "otc.alert.>"):
        if isinstance(message, AlertRaised):
            key = f"{message.source}: {message.kind}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# --------------------------------------------------------------------------- EVM deposits in bulk

TRANSFER_SELECTOR = "a9059cbb"
FUNDERS = tuple(range(1, 10))


class EvmFunder:
    """Deposits from anvil accounts 1-9, signed here with explicit nonces and sent as JSON-RPC batches."""

    def __init__(self, rpc: str, chain_id: int, accounts: Iterable[int] = FUNDERS) -> None:
        self.rpc = rpc
        self.chain_id = chain_id
        self.accounts = [contracts.anvil_account(i) for i in accounts]
        self.nonces: dict[str, int] = {}
        self.client = httpx.AsyncClient(timeout=120, trust_env=False)
        self._turn = 0

    async def rpc_call(self, method: str, *params: Any) -> Any:
        reply = (
            await self.client.post(self.rpc, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        ).json()
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def _nonce(self, address: str) -> int:
        if address not in self.nonces:
            self.nonces[address] = int(await self.rpc_call("eth_getTransactionCount", address, "pending"), 16)
        nonce = self.nonces[address]
        self.nonces[address] = nonce + 1
        return nonce

    async def sign(self, payments: Sequence[tuple[str, int, str | None]]) -> list[tuple[str, str]]:
        """(raw tx hex, txid) for each payment (to, amount, token or None for the native coin)."""
        unsigned = []
        for to, amount, token in payments:
            account = self.accounts[self._turn % len(self.accounts)]
            self._turn += 1
            nonce = await self._nonce(account.address)
            tx: dict[str, Any] = {
                "chainId": self.chain_id,
                "nonce": nonce,
                "maxFeePerGas": 200 * 10**9,
                "maxPriorityFeePerGas": 10**9,
                "type": 2,
            }
            if token is None:
                tx.update(to=to, value=amount, gas=21_000)
            else:
                data = TRANSFER_SELECTOR + to[2:].lower().rjust(64, "0") + hex(amount)[2:].rjust(64, "0")
                tx.update(to=token, value=0, gas=90_000, data="0x" + data)
            unsigned.append((account, tx))

        def sign_all() -> list[tuple[str, str]]:
            out = []
            for account, tx in unsigned:
                signed = Account.sign_transaction(tx, account.key)
                out.append(("0x" + signed.raw_transaction.hex(), "0x" + signed.hash.hex()))
            return out

        return await asyncio.to_thread(sign_all)

    async def send(self, signed: Sequence[tuple[str, str]], batch: int = 200) -> list[str]:
        for start in range(0, len(signed), batch):
            calls = [
                {"jsonrpc": "2.0", "id": start + i, "method": "eth_sendRawTransaction", "params": [raw]}
                for i, (raw, _txid) in enumerate(signed[start : start + batch])
            ]
            replies = (await self.client.post(self.rpc, json=calls)).json()
            failed = [r for r in replies if "error" in r]
            if failed:
                raise RuntimeError(f"deposits refused by the node: {failed[:3]}")
        return [txid for _raw, txid in signed]

    async def pay(self, payments: Sequence[tuple[str, int, str | None]]) -> list[str]:
        return await self.send(await self.sign(payments))

    async def close(self) -> None:
        await self.client.aclose()


async def fund_in_blocks(funder: EvmFunder, payments: Sequence[tuple[str, int, str | None]], per_block: int) -> None:
    """Deposits packed `per_block` to a block, on an anvil that mines only when asked."""
    for start in range(0, len(payments), per_block):
        await funder.pay(payments[start : start + per_block])
        await funder.rpc_call("anvil_mine", "0x1")
