"""Benchmark 5: resident memory of each service, idle and with 1,000 and 10,000 active deals.

The EVM system runs as processes (gateway, engine, queue processor, tank, one watcher per chain) on
two anvil chains. Each service's resident set (VmRSS of /proc/<pid>/status; every service is one
Python process) is read idle (started, no deal yet, the bus quiet), then after each level of active
deals exists: created through the engine's own API, both parties' details filled, one in ten with
ALICE's side funded, and every outbox and durable consumer drained, so each service has taken in
every event those deals caused. A few blocks are mined; the figure is the peak of readings taken
every second over a window (75 s by default) that spans one of the engine's solvency rounds (every
60 s), which reads every open deal at once.

    uv run python -m bench.memory [--quick] [--levels 1000,10000]

Prints a table and writes bench/results/memory.json. The engine's goal: at most 300 MB at 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.common import (
    EngineCalls,
    EvmFunder,
    Infra,
    alerts_raised,
    create_active_deals,
    fund_in_blocks,
    interrupt_on_sigterm,
    load_average,
    log,
    machine,
    rss_mib,
    start_stack,
    table,
    wait_drained,
    write_result,
)
from tests.e2e import EvmStack

ENGINE_GOAL_MIB = 300 * 1000**2 / 1024**2  # 300 MB


async def readings(stack: EvmStack, infra: Infra, window: float) -> dict[str, float | None]:
    """The peak over `window` seconds, read every second, per process (services, then the servers they use)."""
    peak: dict[str, float | None] = {}
    pids = {name: p.proc.pid for name, p in stack.procs.items() if p.proc is not None}
    # The servers' main processes only: PostgreSQL's backends are processes of their own.
    pids.update({f"[{name}]": pid for name, pid in infra.infra_pids().items()})
    deadline = time.monotonic() + window
    while True:
        for name, pid in pids.items():
            value = rss_mib(pid)
            current = peak.get(name)
            peak[name] = value if current is None or (value is not None and value > current) else current
        if time.monotonic() >= deadline:
            return peak
        await asyncio.sleep(1)


async def run(levels: list[int], window: float, keep: bool) -> dict[str, Any]:
    infra = await Infra.start()
    stack = EvmStack(infra.env(), infra.work, infra.chains)
    api = await EngineCalls.connect(infra.nats_url)
    funder = EvmFunder(infra.chains.rpc["ETH"], 31337)
    columns: dict[str, dict[str, float | None]] = {}
    timings: dict[str, dict[str, float | None]] = {}
    created = 0
    try:
        await start_stack(stack)
        await wait_drained(infra.nats_url, infra.database_url)
        await asyncio.sleep(3)
        columns["idle"] = await readings(stack, infra, window)
        log(f"idle: {columns['idle']}")
        await funder.rpc_call("evm_setAutomine", False)
        for level in levels:
            started = time.monotonic()
            log(f"creating {level - created} active deals through the engine API")
            deals = await create_active_deals(api, level - created)
            created_s = time.monotonic() - started
            payments = []
            for deal in deals:
                if "ALICE" in deal.escrow:
                    token = infra.chains.usdt["ETH"] if deal.sides["ALICE"][1] == "USDT" else None
                    payments.append((deal.escrow["ALICE"], deal.required["ALICE"], token))
            await fund_in_blocks(funder, payments, per_block=300)
            for chain in (stack.eth, stack.polygon):
                await chain.call("anvil_mine", "0x5")
            try:
                drained_s: float | None = await wait_drained(infra.nats_url, infra.database_url, within=2400)
            except TimeoutError:
                # Read anyway: what is still queued is noted, and the figure is then a lower bound.
                log("the bus did not drain within 2400s; reading memory anyway")
                drained_s = None
            created = level
            await asyncio.sleep(3)
            columns[f"{level:,} deals"] = await readings(stack, infra, window)
            timings[str(level)] = {
                "create_s": round(created_s, 1),
                "drain_s": round(drained_s, 1) if drained_s is not None else None,
                "load_average_1m": load_average(),
            }
            log(f"{level} deals: {columns[f'{level:,} deals']}")
        alerts = await alerts_raised(infra.nats_url)
        stalls = api.stalls
    finally:
        await api.close()
        await funder.close()
        await stack.stop()
        await infra.stop(keep=keep)
    last = columns[f"{levels[-1]:,} deals"]
    per_deal = {}
    for name, idle in columns["idle"].items():
        loaded = last.get(name)
        if idle is not None and loaded is not None:
            per_deal[name] = round((loaded - idle) * 1024 / levels[-1], 1)
    return {
        "benchmark": "memory",
        "machine": machine(),
        "levels": levels,
        "window_seconds": window,
        "rss_mib": columns,
        "kib_per_active_deal": per_deal,
        "timings": timings,
        "alerts": alerts,
        "engine_calls_unanswered_60s": stalls,
        "goal": {"engine_mib_at_10000": round(ENGINE_GOAL_MIB, 1)},
    }


def report(result: dict[str, Any]) -> str:
    columns = result["rss_mib"]
    names = list(columns["idle"])
    headers = ["process (MiB RSS)", *columns, "KiB/deal"]
    rows = [[name, *(columns[c].get(name) for c in columns), result["kib_per_active_deal"].get(name)] for name in names]
    return (
        "resident memory, idle and with active deals ([x] = servers the services use)\n"
        + table(headers, rows)
        + f"\nengine goal: at most {result['goal']['engine_mib_at_10000']} MiB (300 MB) at 10,000 active deals"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 active deals only")
    parser.add_argument("--levels", default="1000,10000", help="active deal counts, comma-separated, ascending")
    parser.add_argument(
        "--window", type=float, default=75, help="seconds of readings per level (one engine solvency round is 60 s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' work folder (logs) afterwards")
    args = parser.parse_args()
    levels = [100] if args.quick else [int(x) for x in args.levels.split(",")]
    window = 5 if args.quick else args.window
    interrupt_on_sigterm()
    result = asyncio.run(run(levels, window, args.keep))
    result["quick"] = args.quick
    path = write_result("memory", result)
    print(report(result))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
