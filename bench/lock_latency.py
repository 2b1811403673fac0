"""Benchmark 1: locking block → payout broadcast latency, with 1, 1,000 and 10,000 active deals.

The whole EVM system runs as processes (gateway, engine, queue processor, tank, one watcher per
chain) on two anvil chains that mine only when this benchmark asks, so it knows which block locks.
"Active" deals are created through the engine's own API (the NATS request subject the gateway
forwards to), both parties' details filled, so both escrows of each are watched; one in ten has its
ALICE side funded (it stays in COLLECTION, funded but not locked). They stay open while the
measured deals run.

One sample, one measured deal ETH ⇄ MATIC on POLYGON, run one after the other (fewer at 10,000 by
default: every block then costs the watchers seconds, see docs/performance.md):
  1. create and fill it, deposit both sides' required amounts;
  2. mine the deposits, then POLYGON until BOB's side is locked (3 confirmations); wait until the
     engine shows it, and ALICE's deposit with 1 of its 2 confirmations;
  3. mine ETH's next block: the locking block. Its time is when anvil_mine returned;
  4. poll both escrows' pending nonce at the nodes every 10 ms: the payout broadcast time of a side
     is when its escrow's first transaction is at the node.
The figure is the later of the two swap payouts (both must be out); the first one is kept too.
Each level starts with three unmeasured warm-up deals (their figures are kept as `warm_up_ms`).
The queue processor's "broadcast" log line splits each payout's latency into what came before the
queue had the command (watcher poll, tip event, engine) and the queue's own stages.

    uv run python -m bench.lock_latency [--quick] [--levels 1,1000,10000] [--samples 100,100,20]

Prints a table and writes bench/results/lock_latency.json. Every measured deal must end CLOSED
SWAPPED, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ACTIVE_SHAPES,
    BenchDeal,
    EngineCalls,
    EvmFunder,
    Infra,
    alerts_raised,
    cpu_of,
    cpu_used,
    create_active_deals,
    fund_in_blocks,
    histogram_totals,
    interrupt_on_sigterm,
    load_average,
    log,
    machine,
    open_deal,
    read_stream,
    rss_mib,
    start_stack,
    summary,
    table,
    wait_drained,
    wait_for,
    write_result,
)
from otc_common.messages import ChainTip, PayoutCommand
from tests.e2e import Chain, EvmStack

MEASURED = (("ETH", "ETH", "0.05"), ("POLYGON", "MATIC", "20"))
#: Unmeasured deals before each level's samples: the first deals after a start or after thousands of new
#: deals pay one-time costs (connections opened, statements prepared, caches filled); kept as `warm_up_ms`.
WARM_UP = 3
#: Separate senders, so the bulk funding and the samples never share a nonce sequence.
SAMPLE_FUNDERS = (1, 2, 3, 4)
ACTIVE_FUNDERS = (5, 6, 7, 8, 9)
POLL_SECONDS = 0.01


class NodePoller(Chain):
    """Asks one anvil for an address's pending nonce: above zero once the escrow has sent anything."""

    async def sent_anything(self, address: str) -> bool:
        return int(await self.call("eth_getTransactionCount", address, "pending"), 16) > 0

    async def mine(self, blocks: int = 1) -> None:
        await self.call("anvil_mine", hex(blocks))

    async def close(self) -> None:
        await self.client.aclose()


async def first_send(poller: NodePoller, address: str, within: float = 900) -> float:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await poller.sent_anything(address):
            return time.time()
        await asyncio.sleep(POLL_SECONDS)
    raise TimeoutError(f"no payout from {address} within {within}s")


async def one_sample(
    api: EngineCalls, eth: NodePoller, polygon: NodePoller, funders: dict[str, EvmFunder]
) -> tuple[BenchDeal, dict[str, float]]:
    deal = await open_deal(api, *MEASURED, with_status=True)
    await funders["ETH"].pay([(deal.escrow["ALICE"], deal.required["ALICE"], None)])
    await funders["POLYGON"].pay([(deal.escrow["BOB"], deal.required["BOB"], None)])
    await eth.mine(1)
    await polygon.mine(3)

    async def ready() -> bool:
        status = await api.call("otc.status", {"dealId": deal.deal_id})
        alice = status["collection"]["alice"]
        return (
            status["stage"] == "WAITING"
            and status["collection"]["bob"]["locked"]
            and any(d["confirmations"] == 1 for d in alice["deposits"])
            and not alice["locked"]
        )

    await wait_for(ready, 900, f"deal {deal.deal_id} waiting for its locking block", interval=0.05)
    await eth.mine(1)
    locked_at = time.time()
    alice_out, bob_out = await asyncio.gather(
        first_send(eth, deal.escrow["ALICE"]), first_send(polygon, deal.escrow["BOB"])
    )
    return deal, {
        "locked_at": locked_at,
        "locking_height": int(await eth.call("eth_blockNumber"), 16),
        "first_ms": (min(alice_out, bob_out) - locked_at) * 1000,
        "both_ms": (max(alice_out, bob_out) - locked_at) * 1000,
    }


async def bus_breakdown(
    nats_url: str, deals: list[BenchDeal], figures: list[dict[str, float]]
) -> list[dict[str, float]]:
    """Per deal, from the events' own times: lock → the watcher's tip event → the engine's first swap command."""
    tips = {
        (m.chain, m.height): e.occurred_at.timestamp()
        for e, m in await read_stream(nats_url, "CHAIN", "otc.chain.ETH.tip")
        if isinstance(m, ChainTip)
    }
    commands: dict[str, float] = {}
    for envelope, message in await read_stream(nats_url, "QUEUE", "otc.queue.cmd.>"):
        if isinstance(message, PayoutCommand) and message.purpose.value == "SWAP_PAYOUT":
            at = envelope.occurred_at.timestamp()
            commands[message.deal_id] = min(at, commands.get(message.deal_id, at))
    rows = []
    for deal, figure in zip(deals, figures, strict=True):
        tip = tips.get(("ETH", int(figure["locking_height"])))
        command = commands.get(deal.deal_id)
        if tip is None or command is None:
            continue
        rows.append(
            {
                "lock_to_tip_event_ms": (tip - figure["locked_at"]) * 1000,
                "lock_to_command_ms": (command - figure["locked_at"]) * 1000,
                "tip_to_command_ms": (command - tip) * 1000,
            }
        )
    return rows


def queue_breakdown(log_path: Path, deal_ids: set[str], locked_at: dict[str, float]) -> list[dict[str, float]]:
    """Per swap payout: lock → command received by the queue, and the queue's own stages."""
    from datetime import datetime

    rows = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"broadcast"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") != "broadcast" or entry.get("deal_id") not in deal_ids:
            continue
        if ":SWAP_PAYOUT:" not in entry.get("transfer_id", ""):
            continue
        sent = datetime.fromisoformat(entry["ts"]).timestamp()
        total = (sent - locked_at[entry["deal_id"]]) * 1000
        queue_ms = float(entry["command_to_broadcast_ms"])
        stages = entry.get("stages_ms", {})
        rows.append(
            {
                "lock_to_broadcast_ms": total,
                "lock_to_queue_ms": total - queue_ms,
                "queue_ms": queue_ms,
                **{f"queue_{k}_ms": float(v) for k, v in stages.items()},
            }
        )
    return rows


async def fund_active(infra: Infra, deals: list[BenchDeal]) -> int:
    """Funds ALICE's side of the deals whose escrows were read: native ETH or USDT on ETH."""
    payments = []
    for deal in deals:
        if "ALICE" not in deal.escrow:
            continue
        asset = deal.sides["ALICE"][1]
        token = infra.chains.usdt["ETH"] if asset == "USDT" else None
        payments.append((deal.escrow["ALICE"], deal.required["ALICE"], token))
    funder = EvmFunder(infra.chains.rpc["ETH"], 31337, ACTIVE_FUNDERS)
    try:
        await fund_in_blocks(funder, payments, per_block=300)
    finally:
        await funder.close()
    return len(payments)


async def watcher_block_seconds(stack: EvmStack) -> dict[str, tuple[float, float]]:
    return {
        chain: await histogram_totals(stack.procs[f"watcher-{chain}"].url, "otc_watcher_block_seconds")
        for chain in ("ETH", "POLYGON")
    }


async def run(levels: list[int], samples_per_level: list[int], poll_ms: int, keep: bool) -> dict[str, Any]:
    infra = await Infra.start()
    stack = EvmStack(infra.env(), infra.work, infra.chains)
    for name in ("watcher-ETH", "watcher-POLYGON"):
        stack.procs[name].env["OTC_POLL_INTERVAL_MS"] = str(poll_ms)
    api = await EngineCalls.connect(infra.nats_url)
    eth, polygon = NodePoller(infra.chains.rpc["ETH"]), NodePoller(infra.chains.rpc["POLYGON"])
    funders = {
        "ETH": EvmFunder(infra.chains.rpc["ETH"], 31337, SAMPLE_FUNDERS),
        "POLYGON": EvmFunder(infra.chains.rpc["POLYGON"], 31338, SAMPLE_FUNDERS),
    }
    results: list[dict[str, Any]] = []
    active: list[BenchDeal] = []
    measured: list[BenchDeal] = []
    try:
        # Only this benchmark mines from here on, so it knows which block is the locking one.
        for poller in (eth, polygon):
            await poller.call("evm_setAutomine", False)
        await start_stack(stack)
        for level, samples in zip(levels, samples_per_level, strict=True):
            wanted = level - 1  # the measured deal is the level's last active deal
            if wanted > len(active):
                started = time.monotonic()
                log(f"creating {wanted - len(active)} active deals through the engine API")
                fresh = await create_active_deals(api, wanted - len(active))
                created_s = time.monotonic() - started
                funded = await fund_active(infra, fresh)
                active += fresh
                try:
                    drained_s = await wait_drained(infra.nats_url, infra.database_url, within=2400)
                    log(f"  created in {created_s:.0f}s, {funded} funded, bus drained {drained_s:.0f}s later")
                except TimeoutError:
                    log(f"  created in {created_s:.0f}s, {funded} funded; the bus is still busy after 2400s")
            log(f"level {level}: {WARM_UP} warm-up deals, then {samples} samples")
            warm_up: list[tuple[BenchDeal, dict[str, float]]] = [
                await one_sample(api, eth, polygon, funders) for _ in range(WARM_UP)
            ]
            level_deals: list[BenchDeal] = []
            figures: list[dict[str, float]] = []
            load_before, cpu_before, sampling_started = load_average(), cpu_of(stack.procs), time.monotonic()
            blocks_before = await watcher_block_seconds(stack)
            for i in range(samples):
                deal, figure = await one_sample(api, eth, polygon, funders)
                level_deals.append(deal)
                figures.append(figure)
                if (i + 1) % 20 == 0:
                    log(f"  {i + 1} samples, last {figure['both_ms']:.0f} ms")
            sampling_s = time.monotonic() - sampling_started
            blocks_after = await watcher_block_seconds(stack)
            block_ms = {
                chain: round(1000 * (blocks_after[chain][1] - before[1]) / (blocks_after[chain][0] - before[0]), 1)
                for chain, before in blocks_before.items()
                if blocks_after[chain][0] > before[0]
            }
            cpu = cpu_used(cpu_before, cpu_of(stack.procs))
            load_after = load_average()
            # The last deals' payouts still need blocks and confirmations; every one must end SWAPPED.
            await wait_all_swapped(api, [*(deal for deal, _ in warm_up), *level_deals], [eth, polygon])
            measured += level_deals
            locked_at = {d.deal_id: f["locked_at"] for d, f in zip(level_deals, figures, strict=True)}
            breakdown = queue_breakdown(stack.procs["queue"].log_path, set(locked_at), locked_at)
            on_bus = await bus_breakdown(infra.nats_url, level_deals, figures)
            rss = {name: rss_mib(p.proc.pid) for name, p in stack.procs.items() if p.proc is not None}
            results.append(
                {
                    "active_deals": level,
                    "both_payouts_ms": summary([f["both_ms"] for f in figures]),
                    "first_payout_ms": summary([f["first_ms"] for f in figures]),
                    "lock_to_tip_event_ms": summary([b["lock_to_tip_event_ms"] for b in on_bus]),
                    "lock_to_command_ms": summary([b["lock_to_command_ms"] for b in on_bus]),
                    "tip_to_command_ms": summary([b["tip_to_command_ms"] for b in on_bus]),
                    "lock_to_queue_ms": summary([b["lock_to_queue_ms"] for b in breakdown]),
                    "queue_ms": summary([b["queue_ms"] for b in breakdown]),
                    "queue_stages_p50_ms": {
                        k.removeprefix("queue_").removesuffix("_ms"): summary([b[k] for b in breakdown])["p50"]
                        for k in sorted(breakdown[0])
                        if k.startswith("queue_") and k != "queue_ms"
                    }
                    if breakdown
                    else {},
                    "rss_mib": rss,
                    "alerts_so_far": await alerts_raised(infra.nats_url),
                    "engine_calls_unanswered_60s_so_far": api.stalls,
                    "load_average_1m": [load_before, load_after],
                    "watcher_ms_per_block": block_ms,
                    "sampling_seconds": round(sampling_s, 1),
                    "service_cpu_ms_per_sample": {k: round(1000 * v / samples, 1) for k, v in cpu.items()},
                    "samples_ms": [round(f["both_ms"], 1) for f in figures],
                    "warm_up_ms": [round(f["both_ms"], 1) for _, f in warm_up],
                }
            )
            log(f"  p50 {results[-1]['both_payouts_ms']['p50']} ms, p99 {results[-1]['both_payouts_ms']['p99']} ms")
    finally:
        await api.close()
        await eth.close()
        await polygon.close()
        for funder in funders.values():
            await funder.close()
        await stack.stop()
        await infra.stop(keep=keep)
    return {
        "benchmark": "lock_latency",
        "machine": machine(),
        "watcher_poll_ms": poll_ms,
        "measured_deal": {"alice": MEASURED[0], "bob": MEASURED[1]},
        "active_shapes": ACTIVE_SHAPES,
        "goal": {"p99_ms_at_1": 200, "p99_ms_at_10000": 1000},
        "levels": results,
    }


async def wait_all_swapped(
    api: EngineCalls, deals: list[BenchDeal], nodes: list[NodePoller], within: float = 300
) -> None:
    pending = {d.deal_id for d in deals}

    async def done() -> bool:
        for node in nodes:
            await node.mine(1)
        for deal_id in list(pending):
            status = await api.call("otc.status", {"dealId": deal_id})
            if status["stage"] == "CLOSED":
                if status["outcome"] != "SWAPPED":
                    raise AssertionError(f"deal {deal_id} closed {status['outcome']}, not SWAPPED")
                pending.discard(deal_id)
        return not pending

    await wait_for(done, within, f"{len(pending)} measured deals reaching CLOSED", interval=0.5)


def report(result: dict[str, Any]) -> str:
    rows = []
    for level in result["levels"]:
        both, first = level["both_payouts_ms"], level["first_payout_ms"]
        rows.append(
            (
                level["active_deals"],
                both["count"],
                both["p50"],
                both["p99"],
                both["max"],
                first["p50"],
                level["lock_to_tip_event_ms"]["p50"],
                level["lock_to_command_ms"]["p50"],
                level["lock_to_queue_ms"]["p50"],
                level["queue_ms"]["p50"],
                max(level["watcher_ms_per_block"].values(), default=None),
                round(sum(level["service_cpu_ms_per_sample"].values())),
                level["load_average_1m"][1],
            )
        )
    headers = (
        "active deals",
        "n",
        "p50 ms",
        "p99 ms",
        "max ms",
        "first p50",
        "→tip event",
        "→command",
        "→queue",
        "in queue",
        "watcher ms/block",
        "CPU ms/sample",
        "load",
    )
    legend = (
        "\n(p50 times from the locking block to: the watcher's tip event, the engine's swap command, the queue "
        "receiving it; then the queue's own work until the node answered; the slower watcher's mean time to "
        "process a block; CPU used by all services per sample; "
        "1-minute load average of the machine at the level's end)"
    )
    alerts = result["levels"][-1]["alerts_so_far"] if result["levels"] else {}
    raised = "\nalerts raised during the run: " + (", ".join(f"{k} x{v}" for k, v in alerts.items()) or "none")
    return "locking block → both swap payouts at the node\n" + table(headers, rows) + legend + raised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="levels 1 and 50, 5 samples each")
    parser.add_argument("--levels", default="1,1000,10000", help="active deal counts, comma-separated")
    parser.add_argument(
        "--samples",
        help="measured deals per level: one number, or one per level, comma-separated "
        "(default 100, and 20 from 10,000 active deals on)",
    )
    parser.add_argument("--poll-ms", type=int, default=100, help="the watchers' OTC_POLL_INTERVAL_MS")
    parser.add_argument("--keep", action="store_true", help="keep the servers' work folder (logs) afterwards")
    args = parser.parse_args()
    interrupt_on_sigterm()
    levels = [1, 50] if args.quick else [int(x) for x in args.levels.split(",")]
    if args.quick:
        counts = [5]
    elif args.samples is None:
        counts = [20 if level >= 10_000 else 100 for level in levels]
    else:
        counts = [int(x) for x in args.samples.split(",")]
    if len(counts) == 1:
        counts *= len(levels)
    if len(counts) != len(levels):
        parser.error("--samples needs one number, or one per level")
    result = asyncio.run(run(levels, counts, args.poll_ms, args.keep))
    result["quick"] = args.quick
    path = write_result("lock_latency", result)
    print(report(result))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
