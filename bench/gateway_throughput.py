"""Gateway `otc.status` requests per second and latency on one worker, against a bare FastAPI ceiling.

    uv run python -m bench.gateway_throughput [--quick] [--connections 1,32] [--seconds 15]

Starts NATS, PostgreSQL, the engine and the gateway (one uvicorn worker process, rate limits off)
and creates deals in COLLECTION with both parties filled, as a party page sees them while it
waits for deposits. Each `otc.status` call (with the party's token) is answered by the gateway:
from its memory while it holds the engine's answer (OTC_STATUS_CACHE_SECONDS, default 1 s), else
from the engine over NATS request/reply → PostgreSQL and back. The ceiling is a bare FastAPI app
on one uvicorn worker process that answers POST /rpc with the very same response bytes from
memory (it only decodes the body to find the deal), measured in the same run with the same load
generator.

The load generator is a separate process: HTTP/1.1 keep-alive connections, each with one request
in flight (a closed loop), written on asyncio protocols so that it costs far less CPU per request
than the servers it drives; its own CPU use is reported so that this can be checked. Every
response is checked byte for byte against the expected body; any difference fails the run.
During each measurement the CPU time of every process (from /proc/<pid>/stat) shows which one
limits the rate.

Prints a table and writes bench/results/gateway_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection as PipeEnd
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
from fastapi import FastAPI, Request, Response

from otc_cli.servers import free_port, start_nats, start_postgres
from otc_common.addresses import evm_checksum_address
from tests.conftest import create_database, drop_database
from tests.support import UNLIMITED_RATES, RpcClient, ServiceProcess, write_test_registry

RESULTS = Path(__file__).resolve().parent / "results" / "gateway_throughput.json"
REPO = Path(__file__).resolve().parent.parent
CEILING_FILE_VARIABLE = "OTC_BENCH_CEILING_BODIES"
GOAL_RPS = 2_000
GOAL_SHARE = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the ceiling


class _Call(msgspec.Struct):
    params: dict[str, Any]


def ceiling_app() -> FastAPI:
    """The same JSON bytes the gateway answers, served from memory (uvicorn --factory)."""
    bodies = {
        deal_id: body.encode()
        for deal_id, body in json.loads(Path(os.environ[CEILING_FILE_VARIABLE]).read_text()).items()
    }
    decoder = msgspec.json.Decoder(_Call)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/rpc")
    async def rpc(request: Request) -> Response:
        call = decoder.decode(await request.body())
        return Response(content=bodies[call.params["dealId"]], media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(content=b"{}", media_type="application/json")

    return app


# --------------------------------------------------------------------------- the load generator


@dataclass(frozen=True)
class LoadPlan:
    port: int
    requests: list[bytes]  # whole HTTP requests, sent round-robin
    bodies: list[bytes]  # the expected response body of each
    connections: int
    warm_up: float
    seconds: float


class _Client(asyncio.Protocol):
    """One keep-alive connection with one request in flight; the response is framed by Content-Length."""

    def __init__(self, run: _LoadRun, offset: int) -> None:
        self.run = run
        self.next = offset
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.index = 0
        self.sent_at = 0.0
        self.idle = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.run.stopping:
            if not self.idle.done():
                self.idle.set_result(None)
            return
        self.index = self.next % len(self.run.plan.requests)
        self.next += 1
        self.sent_at = time.perf_counter()
        self.transport.write(self.run.plan.requests[self.index])

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.run.fail(f"response without Content-Length: {head[:200]!r}")
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end > 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        done = time.perf_counter()
        if not head.startswith(b"http/1.1 200 "):
            self.run.fail(f"HTTP status {head[:40]!r}: {body[:300]!r}")
        elif body != self.run.plan.bodies[self.index]:
            self.run.fail(f"unexpected body: {body[:300]!r}")
        self.run.record(self.sent_at, done)
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.run.stopping:
            self.run.fail(f"connection lost: {exc!r}")
        if not self.idle.done():
            self.idle.set_result(None)


class _LoadRun:
    def __init__(self, plan: LoadPlan) -> None:
        self.plan = plan
        self.stopping = False
        self.window = (float("inf"), float("inf"))
        self.latencies: list[float] = []
        self.failures = 0
        self.first_failure = ""
        self.answered = 0

    def fail(self, why: str) -> None:
        self.failures += 1
        if not self.first_failure:
            self.first_failure = why

    def record(self, sent: float, done: float) -> None:
        self.answered += 1
        if self.window[0] <= done < self.window[1]:
            self.latencies.append(done - sent)


async def _drive(plan: LoadPlan, pipe: PipeEnd) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = _LoadRun(plan)
    clients = []
    for offset in range(plan.connections):
        # Connections start at different deals, so that each deal is asked by several at once.
        _transport, client = await loop.create_connection(
            functools.partial(_Client, run, offset * 7), "127.0.0.1", plan.port
        )
        clients.append(client)
    await asyncio.sleep(plan.warm_up)
    start = time.perf_counter()
    run.window = (start, start + plan.seconds)
    cpu = time.process_time()
    pipe.send("measuring")
    await asyncio.sleep(plan.seconds)
    cpu = time.process_time() - cpu
    pipe.send("measured")
    run.stopping = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(client.idle for client in clients)), 30)
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    latencies = sorted(run.latencies)

    def percentile(share: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * share))] if latencies else 0.0

    return {
        "connections": plan.connections,
        "seconds": plan.seconds,
        "requests": len(latencies),
        "requests_with_warm_up": run.answered,
        "requests_per_second": len(latencies) / plan.seconds,
        "p50_ms": percentile(0.50),
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "max_ms": 1000 * latencies[-1] if latencies else 0.0,
        "failures": run.failures,
        "first_failure": run.first_failure,
        "load_generator_cpu_seconds": cpu,
    }


def load_generator(plan: LoadPlan, pipe: PipeEnd) -> None:
    """The child process: sends "measuring", "measured", then the figures."""
    pipe.send(asyncio.run(_drive(plan, pipe)))
    pipe.close()


# --------------------------------------------------------------------------- CPU of the servers


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                    text = handle.read()
            except OSError:
                continue
            children.setdefault(int(text[text.rindex(")") + 2 :].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_of(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process and everything it started (PostgreSQL's backends)."""
    used = {}
    for name, root in groups.items():
        total = 0.0
        for pid in descendants(root):
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        used[name] = total
    return used


# --------------------------------------------------------------------------- one measurement


def http_request(port: int, body: bytes) -> bytes:
    return (
        f"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def measure(
    port: int, calls: list[bytes], bodies: list[bytes], connections: int, args: Any, groups: dict[str, int]
) -> dict[str, Any]:
    plan = LoadPlan(
        port=port,
        requests=[http_request(port, call) for call in calls],
        bodies=bodies,
        connections=connections,
        warm_up=args.warm_up,
        seconds=args.seconds,
    )
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=load_generator, args=(plan, theirs), daemon=True)
    child.start()
    try:
        assert child.pid is not None
        groups = {**groups, "load generator": child.pid}

        async def receive() -> Any:
            ready = await asyncio.to_thread(ours.poll, args.warm_up + args.seconds + 120)
            if not ready:
                raise TimeoutError("the load generator stopped answering")
            return ours.recv()

        if await receive() != "measuring":
            raise RuntimeError("unexpected message from the load generator")
        load_average = os.getloadavg()[0]
        before, started = cpu_of(groups), time.monotonic()
        if await receive() != "measured":
            raise RuntimeError("unexpected message from the load generator")
        after, span = cpu_of(groups), time.monotonic() - started
        figures: dict[str, Any] = await receive()
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    if figures["failures"]:
        raise RuntimeError(f"{figures['failures']} bad responses; the first: {figures['first_failure']}")
    figures["cpu_cores_used"] = {name: round((after[name] - before[name]) / span, 3) for name in groups}
    figures["cpu_ms_per_request"] = {
        name: round(1000 * (after[name] - before[name]) / max(figures["requests"], 1), 4) for name in groups
    }
    figures["cpu_bound_requests_per_second"] = round(capacity(figures["cpu_ms_per_request"]))
    figures["machine_load_average"] = load_average
    return figures


def capacity(cpu_ms: dict[str, float]) -> float:
    """The rate at which the servers' CPU would run out on this machine, whatever else runs on it.

    Each Python service is one process on one event loop, so it can use one core at most; all the
    servers together can use every core. The load generator is left out: it is not part of the system.
    """
    servers = {name: ms for name, ms in cpu_ms.items() if name != "load generator" and ms > 0}
    single = [1000 / ms for name, ms in servers.items() if name in ("ceiling", "gateway", "engine")]
    return min([*single, 1000 * (os.cpu_count() or 1) / sum(servers.values())])


# --------------------------------------------------------------------------- the run


async def wait_http(url: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(trust_env=False) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/readyz", timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {within:g}s")


async def transactions(server: str, database: str) -> int:
    """Transactions the database has run: each statement outside a transaction is one."""
    name = urlsplit(database).path.lstrip("/")
    conn = await asyncpg.connect(server)
    try:
        count = await conn.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", name)
        return int(count)
    finally:
        await conn.close()


async def make_deals(rpc: RpcClient, count: int) -> list[tuple[str, str]]:
    """(dealId, Alice's token) of deals in COLLECTION, both parties filled."""
    deals = []
    for _ in range(count):
        created = await rpc.result(
            "otc.createDeal",
            {
                "alice": {"chainId": "ETH", "asset": "ETH", "amount": "1.5"},
                "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "4000"},
                "timeoutSeconds": 86_400,
            },
        )
        for party, token in (("ALICE", created["aliceToken"]), ("BOB", created["bobToken"])):
            await rpc.result(
                "otc.fillPartyDetails",
                {
                    "dealId": created["dealId"],
                    "party": party,
                    "token": token,
                    "paybackAddress": evm_checksum_address(secrets.token_hex(20)),
                    "recipientAddress": evm_checksum_address(secrets.token_hex(20)),
                },
            )
        deals.append((created["dealId"], created["aliceToken"]))
    return deals


async def expected_bodies(url: str, calls: list[bytes]) -> list[bytes]:
    """The gateway's answer to each call, checked to be the same when asked twice (nothing in it moves)."""
    bodies = []
    async with httpx.AsyncClient(trust_env=False) as client:
        for call in calls:
            answers = [
                (await client.post(f"{url}/rpc", content=call, headers={"content-type": "application/json"})).content
                for _ in range(2)
            ]
            if answers[0] != answers[1]:
                raise RuntimeError("otc.status answered differently twice in a row; bytes cannot be compared")
            reply = json.loads(answers[0])
            if "result" not in reply or reply["result"]["stage"] != "COLLECTION":
                raise RuntimeError(f"unexpected otc.status answer: {answers[0][:300]!r}")
            bodies.append(answers[0])
    return bodies


@contextlib.contextmanager
def servers(work: Path) -> Any:
    nats_server = start_nats(work / "nats", free_port(), work / "nats.log")
    try:
        pg = start_postgres(work / "pg", work / "pg.log")
    except BaseException:
        nats_server.stop()
        raise
    try:
        yield nats_server, pg
    finally:
        pg.stop()
        nats_server.stop()


def start_ceiling(work: Path, deals: list[tuple[str, str]], bodies: list[bytes]) -> tuple[subprocess.Popen[bytes], int]:
    bodies_file = work / "ceiling-bodies.json"
    bodies_file.write_text(json.dumps({deal: body.decode() for (deal, _), body in zip(deals, bodies, strict=True)}))
    port = free_port()
    env = {**os.environ, CEILING_FILE_VARIABLE: str(bodies_file)}
    argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.gateway_throughput:ceiling_app"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--lifespan", "off"]
    argv += ["--no-access-log", "--log-level", "warning"]
    with (work / "ceiling.log").open("ab") as log:
        process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return process, port


async def run(args: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="otc-bench-gateway-"))
    os.chmod(work, 0o755)  # noqa: S103 - the database server runs as its own user and must reach its data
    registry = write_test_registry(work / "registry.toml")
    results: dict[str, list[dict[str, Any]]] = {"ceiling": [], "gateway": []}
    with servers(work) as (nats_server, pg):
        database = await create_database(pg.url)
        env = {
            "OTC_NATS_URL": nats_server.url,
            "OTC_DATABASE_URL": database,
            "OTC_REGISTRY_FILE": str(registry),
            "OTC_LOG_LEVEL": "INFO",
            # The registry's chains are not running: no balance checks against them during the run.
            "OTC_SOLVENCY_INTERVAL_SECONDS": "86400",
        }
        engine = ServiceProcess("engine", ["-m", "otc_engine"], env, work)
        gateway = ServiceProcess(
            "gateway",
            ["-m", "otc_gateway"],
            {**env, **UNLIMITED_RATES, "OTC_PUBLIC_BASE_URL": "https://otc.example"},
            work,
        )
        ceiling: subprocess.Popen[bytes] | None = None
        try:
            await engine.start(timeout=120)
            await gateway.start(timeout=120)
            deals = await make_deals(RpcClient(gateway.url), args.deals)
            calls = [
                msgspec.json.encode(
                    {"jsonrpc": "2.0", "id": 1, "method": "otc.status", "params": {"dealId": deal, "token": token}}
                )
                for deal, token in deals
            ]
            bodies = await expected_bodies(gateway.url, calls)
            ceiling, ceiling_port = start_ceiling(work, deals, bodies)
            await wait_http(f"http://127.0.0.1:{ceiling_port}")
            assert engine.proc is not None and gateway.proc is not None
            assert pg.pid is not None and nats_server.pid is not None
            stack = {"gateway": gateway.proc.pid, "engine": engine.proc.pid, "postgres": pg.pid}
            stack["nats"] = nats_server.pid
            for connections in args.connections:
                figures = await measure(ceiling_port, calls, bodies, connections, args, {"ceiling": ceiling.pid})
                results["ceiling"].append(figures)
                report_line("ceiling", figures)
                before = await transactions(pg.url, database)
                figures = await measure(gateway.port, calls, bodies, connections, args, stack)
                # PostgreSQL publishes its counters about once a second.
                await asyncio.sleep(2)
                used = await transactions(pg.url, database) - before
                figures["database_transactions_per_request"] = round(used / figures["requests_with_warm_up"], 2)
                results["gateway"].append(figures)
                report_line("gateway", figures)
            response_bytes = sorted(len(body) for body in bodies)
        except BaseException:
            print(f"--- engine\n{engine.log_tail()}\n--- gateway\n{gateway.log_tail()}", file=sys.stderr)
            raise
        finally:
            if ceiling is not None:
                ceiling.terminate()
                try:
                    ceiling.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    ceiling.kill()
            await gateway.stop()
            await engine.stop()
            await drop_database(pg.url, database)
    return summarise(args, results, response_bytes)


def report_line(target: str, figures: dict[str, Any]) -> None:
    print(
        f"  {target:<8} {figures['connections']:>3} connections: {figures['requests_per_second']:8.0f} req/s, "
        f"p99 {figures['p99_ms']:.1f} ms",
        file=sys.stderr,
    )


def summarise(args: Any, results: dict[str, list[dict[str, Any]]], response_bytes: list[int]) -> dict[str, Any]:
    headline = max(range(len(args.connections)), key=lambda i: args.connections[i])
    gateway, ceiling = results["gateway"][headline], results["ceiling"][headline]
    share = gateway["requests_per_second"] / ceiling["requests_per_second"]
    return {
        "benchmark": "gateway_throughput",
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "method": (
            "one uvicorn worker each for the gateway and the bare FastAPI ceiling (same response bytes from "
            "memory); closed-loop HTTP/1.1 keep-alive load from a separate process; every response compared "
            f"byte for byte; {args.deals} deals in COLLECTION, otc.status with the party token, round-robin"
        ),
        "response_bytes": {"min": response_bytes[0], "max": response_bytes[-1]},
        "results": results,
        "verdict": {
            "connections": args.connections[headline],
            "gateway_requests_per_second": round(gateway["requests_per_second"]),
            "gateway_p99_ms": round(gateway["p99_ms"], 2),
            "ceiling_requests_per_second": round(ceiling["requests_per_second"]),
            "ceiling_p99_ms": round(ceiling["p99_ms"], 2),
            "gateway_cpu_bound_requests_per_second": gateway["cpu_bound_requests_per_second"],
            "ceiling_cpu_bound_requests_per_second": ceiling["cpu_bound_requests_per_second"],
            "gateway_cpu_ms_per_request": gateway["cpu_ms_per_request"],
            "share_of_ceiling": round(share, 3),
            "goal_requests_per_second": GOAL_RPS,
            "goal_share": GOAL_SHARE,
            "rate_goal_met": gateway["requests_per_second"] >= GOAL_RPS,
            "share_goal_met": share >= GOAL_SHARE,
        },
    }


def table(report: dict[str, Any]) -> str:
    head = (
        f"{'target':<8} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'x ceil':>6} "
        f"{'CPU cap':>7} {'load':>5}  CPU cores used (ms CPU per request)"
    )
    lines = [head, "-" * len(head)]
    ceilings = report["results"]["ceiling"]
    for target in ("ceiling", "gateway"):
        for index, row in enumerate(report["results"][target]):
            share = row["requests_per_second"] / ceilings[index]["requests_per_second"]
            cpu = ", ".join(
                f"{name} {cores:.2f} ({row['cpu_ms_per_request'][name]:.3f})"
                for name, cores in row["cpu_cores_used"].items()
            )
            lines.append(
                f"{target:<8} {row['connections']:>5} {row['requests_per_second']:>8.0f} {row['p50_ms']:>7.2f} "
                f"{row['p99_ms']:>7.2f} {row['max_ms']:>7.1f} {share:>6.2f} {row['cpu_bound_requests_per_second']:>7} "
                f"{row['machine_load_average']:>5.1f}  {cpu}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short windows: a smoke run")
    parser.add_argument(
        "--connections",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 32],
        help="concurrent keep-alive connections, comma-separated; the largest is the headline (default 1,32)",
    )
    parser.add_argument("--seconds", type=float, default=0, help="measured seconds per run (default 15, quick 3)")
    parser.add_argument("--warm-up", type=float, default=0, help="seconds before measuring (default 3, quick 1)")
    parser.add_argument("--deals", type=int, default=20, help="deals whose status is asked round-robin")
    args = parser.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 15.0)
    args.warm_up = args.warm_up or (1.0 if args.quick else 3.0)
    if args.quick:
        args.deals = min(args.deals, 5)
    report = asyncio.run(run(args))
    report["table"] = table(report)
    print(report["table"])
    judged = report["verdict"]
    print(
        f"gateway at {judged['connections']} connections: {judged['gateway_requests_per_second']} req/s "
        f"(goal ≥ {GOAL_RPS}: {'yes' if judged['rate_goal_met'] else 'NO'}), "
        f"{100 * judged['share_of_ceiling']:.0f}% of the ceiling "
        f"(goal ≥ {100 * GOAL_SHARE:.0f}%: {'yes' if judged['share_goal_met'] else 'NO'})"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
