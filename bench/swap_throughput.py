"""Benchmark 4: 1,000 concurrent deals created → CLOSED on the devnets, against the chains' own minimum.

Two anvil chains (ETH 31337, POLYGON 31338) mine a block every --block-seconds on their own timer and
the Unicity devnet (production Alpha rules: one input per transaction) mines on its autominer at the
same interval; every service runs as its own process. The deals, a third of each:
  ETH ⇄ USDT on POLYGON,  ALPHA ⇄ USDT on ETH,  MATIC on POLYGON ⇄ ALPHA
so native and token escrows on both EVM chains (token payouts wait for the tank's gas) and ALPHA
escrows paid out in phases, each confirmed before the next.

Traders act through the gateway's JSON-RPC in batches of 20 calls (createDeal, fillPartyDetails,
status), several batches at once, and deposit the exact required amount as soon as they have their
deal's instructions: EVM deposits signed here from anvil accounts 1-9 and sent in JSON-RPC batches,
ALPHA deposits from the devnet's faucet (one mature coin each). Wall time runs from the first
createDeal to the last StageChanged→CLOSED event on the bus; every deal must close SWAPPED.

Baselines in the same run:
  - chain minimum: a deal needs its deposit mined and confirmed (threshold of the slower side), then
    its payouts confirmed, ALPHA's phase after phase: (lock confirmations + payout confirmations x
    phases) x block interval, for the slowest deal shape;
  - one deal of each shape alone through the same stack, before the burst.

    uv run python -m bench.swap_throughput [--quick] [--deals 1000] [--block-seconds 1]

Prints a table and writes bench/results/swap_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from functools import partial
from pathlib import Path
from typing import Any

import nats

from bench.common import (
    DECIMALS,
    BacklogSampler,
    EvmFunder,
    Infra,
    alerts_raised,
    cpu_of,
    cpu_used,
    handle_times,
    interrupt_on_sigterm,
    load_average,
    log,
    machine,
    percentile,
    rss_mib,
    start_stack,
    summary,
    table,
    wait_for,
    write_result,
)
from otc_cli.servers import free_port
from otc_cli.unicity import start_unicity_devnet
from otc_common.messages import StageChanged, decode_envelope
from otc_common.money import parse_amount
from tests.e2e import EvmStack, fresh_address_on
from tests.support import RpcClient
from tests.utxo_support import UnicityDevnet

SHAPES = {
    "ETH-USDT@POLYGON": (("ETH", "ETH", "0.05"), ("POLYGON", "USDT", "100")),
    "ALPHA-USDT@ETH": (("UNICITY", "ALPHA", "0.5"), ("ETH", "USDT", "100")),
    "MATIC-ALPHA": (("POLYGON", "MATIC", "20"), ("UNICITY", "ALPHA", "0.5")),
}
CONFIRMATIONS = {"ETH": 2, "POLYGON": 3, "UNICITY": 2}
#: Payout phases an escrow goes through, each confirmed before the next (exact deposits: no surplus phase).
PHASES = {"ETH": 1, "POLYGON": 1, "UNICITY": 2}
BATCH = 20
CHAIN_IDS = {"ETH": 31337, "POLYGON": 31338}


class TimedDevnet(UnicityDevnet):
    """The devnet mining on its own timer, with enough mature coinbase coins for one faucet payment each."""

    def __init__(self, work_dir: Path, block_seconds: float, coins: int) -> None:
        self.alpha = True
        name = f"unicity-{free_port()}"
        self.data_dir = work_dir / name
        # Coinbase coins mature after 100 blocks; the faucet pays each request from one coin.
        self.server = start_unicity_devnet(
            free_port(),
            self.data_dir,
            work_dir / f"{name}.log",
            autominer=block_seconds,
            alpha=True,
            premine=100 + coins + 50,
            start_timeout=300,
        )
        self._client = None


def chain_minimum_blocks(alice: tuple[str, str, str], bob: tuple[str, str, str]) -> int:
    """Blocks from the deposits' block to the last payout's confirmation, if nothing else took time."""
    lock = max(CONFIRMATIONS[alice[0]], CONFIRMATIONS[bob[0]])
    payout = max(CONFIRMATIONS[c] * PHASES[c] for c in (alice[0], bob[0]))
    return lock + payout


class Closings:
    """Every deal's CLOSED time and outcome, from the engine's StageChanged events on the bus."""

    def __init__(self) -> None:
        self.closed: dict[str, tuple[float, str | None]] = {}
        self.nc: Any = None

    async def start(self, nats_url: str) -> None:
        self.nc = await nats.connect(nats_url, connect_timeout=30, max_reconnect_attempts=-1)

        async def on_message(msg: Any) -> None:
            try:
                envelope, message = decode_envelope(msg.data)
            except Exception:  # other event types this build does not know: not ours to judge
                return
            if isinstance(message, StageChanged) and message.stage.value == "CLOSED":
                outcome = message.outcome.value if message.outcome is not None else None
                self.closed.setdefault(message.deal_id, (envelope.occurred_at.timestamp(), outcome))

        await self.nc.subscribe("otc.deal.>", cb=on_message)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class Traders:
    """Creates, fills and funds deals through the gateway, a batch of 20 calls at a time."""

    def __init__(self, stack: EvmStack, infra: Infra) -> None:
        self.rpc: RpcClient = stack.rpc
        self.infra = infra
        self.funders = {chain: EvmFunder(infra.chains.rpc[chain], CHAIN_IDS[chain]) for chain in CHAIN_IDS}
        self.funding_lock = {chain: asyncio.Lock() for chain in CHAIN_IDS}
        assert infra.devnet is not None
        self.devnet: UnicityDevnet = infra.devnet
        self.created: dict[str, float] = {}
        self.shape_of: dict[str, str] = {}
        self.funded_at: float = 0.0
        #: Seconds spent in each step of opening deals, summed over the traders working at once.
        self.step_seconds: dict[str, float] = {"create": 0.0, "fill": 0.0, "status": 0.0, "fund": 0.0}

    async def batch(self, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
        for attempt in range(5):
            response = await self.rpc.raw(body)
            if response.status_code == 200:
                break
            log(f"gateway answered {response.status_code}; retrying ({attempt + 1})")
            await asyncio.sleep(1)
        replies = sorted(response.json(), key=lambda r: r["id"])
        failed = [r for r in replies if "error" in r]
        if failed:
            raise RuntimeError(f"gateway refused calls: {failed[:3]}")
        return [r["result"] for r in replies]

    async def open_batch(self, shapes: list[str]) -> list[str]:
        def side(t: tuple[str, str, str]) -> dict[str, str]:
            return {"chainId": t[0], "asset": t[1], "amount": t[2]}

        started = time.monotonic()
        created = await self.batch(
            [
                (
                    "otc.createDeal",
                    {"alice": side(SHAPES[s][0]), "bob": side(SHAPES[s][1]), "timeoutSeconds": 3600},
                )
                for s in shapes
            ]
        )
        now = time.time()
        started = self._took("create", started)
        fills = []
        for shape, deal in zip(shapes, created, strict=True):
            self.created[deal["dealId"]] = now
            self.shape_of[deal["dealId"]] = shape
            alice, bob = SHAPES[shape]
            for party, send, receive in (("ALICE", alice, bob), ("BOB", bob, alice)):
                token = deal["aliceToken" if party == "ALICE" else "bobToken"]
                fills.append(
                    (
                        "otc.fillPartyDetails",
                        {
                            "dealId": deal["dealId"],
                            "party": party,
                            "token": token,
                            "paybackAddress": fresh_address_on(send[0]),
                            "recipientAddress": fresh_address_on(receive[0]),
                        },
                    )
                )
        for start in range(0, len(fills), BATCH):
            await self.batch(fills[start : start + BATCH])
        started = self._took("fill", started)
        statuses = await self.batch([("otc.status", {"dealId": d["dealId"]}) for d in created])
        started = self._took("status", started)
        await self.fund(statuses)
        self._took("fund", started)
        return [d["dealId"] for d in created]

    def _took(self, step: str, started: float) -> float:
        now = time.monotonic()
        self.step_seconds[step] += now - started
        return now

    async def fund(self, statuses: list[dict[str, Any]]) -> None:
        evm: dict[str, list[tuple[str, int, str | None]]] = {"ETH": [], "POLYGON": []}
        alpha: list[tuple[str, int]] = []
        for status in statuses:
            for party in ("alice", "bob"):
                instructions = status["instructions"][party]
                chain, asset = instructions["chainId"], instructions["asset"]
                amount = parse_amount(instructions["amount"], DECIMALS.get(asset, 18))
                if chain == "UNICITY":
                    alpha.append((instructions["to"], amount))
                else:
                    token = self.infra.chains.usdt[chain] if asset == "USDT" else None
                    evm[chain].append((instructions["to"], amount, token))
        for chain, payments in evm.items():
            if payments:
                # One signer per chain at a time: the funders' nonces follow each other.
                async with self.funding_lock[chain]:
                    await self.funders[chain].pay(payments)
        for address, amount in alpha:
            await self.devnet.faucet(address, amount)
        self.funded_at = time.time()

    async def close(self) -> None:
        for funder in self.funders.values():
            await funder.close()


async def run_burst(traders: Traders, closings: Closings, count: int, concurrency: int, within: float) -> list[str]:
    names = list(SHAPES)
    shapes = [names[i % len(names)] for i in range(count)]
    batches = [shapes[i : i + BATCH] for i in range(0, count, BATCH)]
    deal_ids: list[str] = []
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    async def trader() -> None:
        while not queue.empty():
            deal_ids.extend(await traders.open_batch(queue.get_nowait()))

    await asyncio.gather(*(trader() for _ in range(concurrency)))
    log(f"  {len(deal_ids)} deals created, filled and funded")

    async def all_closed() -> bool:
        return all(d in closings.closed for d in deal_ids)

    last_report = [time.monotonic()]

    async def progress() -> bool:
        if time.monotonic() - last_report[0] > 10:
            last_report[0] = time.monotonic()
            log(f"  {sum(d in closings.closed for d in deal_ids)}/{len(deal_ids)} closed")
        return await all_closed()

    await wait_for(progress, within, f"{count} deals reaching CLOSED", interval=0.25)
    return deal_ids


async def heights(stack: EvmStack) -> dict[str, int]:
    assert stack.devnet is not None
    return {
        "ETH": await stack.eth.height(),
        "POLYGON": await stack.polygon.height(),
        "UNICITY": await stack.devnet.height(),
    }


async def run(count: int, block_seconds: float, concurrency: int, within: float, keep: bool) -> dict[str, Any]:
    def make_devnet(work: Path) -> TimedDevnet:
        return TimedDevnet(work, block_seconds, coins=count + 10)

    infra = await Infra.start(block_time=block_seconds, devnet=make_devnet)
    env = {**infra.env(), "OTC_BUMP_AFTER_SECONDS": "30"}
    stack = EvmStack(env, infra.work, infra.chains, devnet=infra.devnet)
    closings = Closings()
    traders: Traders | None = None
    try:
        await start_stack(stack)
        await closings.start(infra.nats_url)
        traders = Traders(stack, infra)
        idle_rss = {name: rss_mib(p.proc.pid) for name, p in stack.procs.items() if p.proc is not None}

        log("one deal of each shape alone")
        lone: dict[str, float] = {}
        for shape in SHAPES:
            [deal_id] = await traders.open_batch([shape])
            await wait_for(partial(_closed, closings, deal_id), 300, f"lone {shape} deal closing", 0.1)
            lone[shape] = closings.closed[deal_id][0] - traders.created[deal_id]
            log(f"  {shape}: {lone[shape]:.1f}s")

        log(f"{count} deals at once")
        traders.step_seconds = dict.fromkeys(traders.step_seconds, 0.0)
        before = await heights(stack)
        baseline_times = {name: await handle_times(stack.procs[name].url) for name in ("engine", "queue")}
        sampler = BacklogSampler(infra.nats_url)
        sampler.start()
        load_before, cpu_before = load_average(), cpu_of(stack.procs)
        started = time.time()
        try:
            deal_ids = await run_burst(traders, closings, count, concurrency, within)
        finally:
            backlog = await sampler.stop()
        cpu = cpu_used(cpu_before, cpu_of(stack.procs))
        load_after = load_average()
        handled = {}
        for name in ("engine", "queue"):
            handled[name] = _minus(await handle_times(stack.procs[name].url), baseline_times[name])
        funded = traders.funded_at - started
        after = await heights(stack)
        last_closed = max(closings.closed[d][0] for d in deal_ids)
        first_closed = min(closings.closed[d][0] for d in deal_ids)
        wall = last_closed - started
        outcomes: dict[str, int] = {}
        for d in deal_ids:
            outcome = closings.closed[d][1] or "NONE"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        loaded_rss = {name: rss_mib(p.proc.pid) for name, p in stack.procs.items() if p.proc is not None}
        alerts = await alerts_raised(infra.nats_url)
        per_deal = [closings.closed[d][0] - traders.created[d] for d in deal_ids]
    finally:
        if traders is not None:
            await traders.close()
        await closings.close()
        await stack.stop()
        await infra.stop(keep=keep)
    if outcomes.get("SWAPPED", 0) != len(deal_ids):
        raise AssertionError(f"every deal must close SWAPPED: {outcomes}")
    elapsed_blocks = {c: after[c] - before[c] for c in after}
    minimum_blocks = {shape: chain_minimum_blocks(*sides) for shape, sides in SHAPES.items()}
    baseline = max(minimum_blocks.values()) * block_seconds
    return {
        "benchmark": "swap_throughput",
        "machine": machine(),
        "deals": count,
        "shapes": {k: {"alice": v[0], "bob": v[1]} for k, v in SHAPES.items()},
        "block_seconds": block_seconds,
        "confirmations": CONFIRMATIONS,
        "gateway_concurrency_batches": concurrency,
        "wall_seconds": round(wall, 1),
        "created_and_funded_seconds": round(funded, 1),
        "trader_step_seconds": {step: round(v, 1) for step, v in traders.step_seconds.items()},
        "first_closed_seconds": round(first_closed - started, 1),
        "deals_per_second": round(count / wall, 2),
        "chain_minimum_blocks": minimum_blocks,
        "chain_minimum_seconds": baseline,
        "lone_deal_seconds": {k: round(v, 1) for k, v in lone.items()},
        "ratio_to_chain_minimum": round(wall / baseline, 1),
        "per_deal_created_to_closed_s": summary(per_deal),
        "per_deal_p90_s": round(percentile(per_deal, 90), 1),
        "blocks_during_burst": elapsed_blocks,
        "outcomes": outcomes,
        "load_average_1m": [load_before, load_after],
        "service_cpu_seconds_during_burst": cpu,
        "consumer_backlog": backlog,
        "handling_during_burst": handled,
        "alerts": alerts,
        "rss_mib_idle": idle_rss,
        "rss_mib_after": loaded_rss,
        "goal_seconds": 60,
    }


def _minus(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """What was handled between two readings of the same counters."""
    out = {}
    for key, now in after.items():
        then = before.get(key, {"count": 0, "total_s": 0.0})
        count = int(now["count"] - then["count"])
        total = round(now["total_s"] - then["total_s"], 1)
        if count:
            out[key] = {"count": count, "total_s": total, "mean_ms": round(1000 * total / count, 1)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total_s"]))


async def _closed(closings: Closings, deal_id: str) -> bool:
    return deal_id in closings.closed


def report(result: dict[str, Any]) -> str:
    lone = result["lone_deal_seconds"]
    per = result["per_deal_created_to_closed_s"]
    rows = [
        ("deals", result["deals"]),
        ("wall time, first createDeal → last CLOSED (s)", result["wall_seconds"]),
        ("  of which creating, filling, funding (s)", result["created_and_funded_seconds"]),
        (
            f"  traders' time in create / fill / status / fund (s, {result['gateway_concurrency_batches']} at once)",
            " / ".join(str(v) for v in result["trader_step_seconds"].values()),
        ),
        ("chain minimum of one deal (s)", result["chain_minimum_seconds"]),
        ("one deal alone, slowest shape (s)", max(lone.values())),
        ("wall time / chain minimum", result["ratio_to_chain_minimum"]),
        ("deals closed per second", result["deals_per_second"]),
        ("per deal created → closed p50 / p99 (s)", f"{per['p50']} / {per['p99']}"),
        ("CPU seconds used by the services during it", round(sum(result["service_cpu_seconds_during_burst"].values()))),
        ("machine load average (1 min) before / after", " / ".join(map(str, result["load_average_1m"]))),
        ("goal (s)", result["goal_seconds"]),
    ]
    title = f"{result['deals']:,} deals created → CLOSED, blocks every {result['block_seconds']}s\n"
    busiest = sorted(result["consumer_backlog"]["consumers"].items(), key=lambda kv: -(kv[1]["last_busy_at_s"] or 0))[
        :5
    ]
    backlog = table(
        ("consumer", "peak backlog", "at s", "last busy at s"),
        [(name, v["peak"], v["peak_at_s"], v["last_busy_at_s"]) for name, v in busiest],
    )
    work = [
        (f"{service}: {key}", v["count"], v["total_s"], v["mean_ms"])
        for service, items in result["handling_during_burst"].items()
        for key, v in list(items.items())[:6]
    ]
    handling = table(("consumer, event type", "events", "total s", "mean ms"), work)
    return (
        title
        + table(("", "value"), rows)
        + "\n\nconsumers that stayed busy longest\n"
        + backlog
        + "\n\nhandling time during the burst (inbox transaction included)\n"
        + handling
        + "\n\nalerts raised during the run: "
        + (", ".join(f"{k} x{v}" for k, v in result["alerts"].items()) or "none")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 deals")
    parser.add_argument("--deals", type=int, default=1000)
    parser.add_argument("--block-seconds", type=float, default=1.0, help="block interval of all three chains")
    parser.add_argument("--concurrency", type=int, default=8, help="gateway batches in flight at once")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the servers' work folder (logs) afterwards")
    args = parser.parse_args()
    count = 30 if args.quick else args.deals
    interrupt_on_sigterm()
    result = asyncio.run(run(count, args.block_seconds, args.concurrency, args.timeout, args.keep))
    result["quick"] = args.quick
    path = write_result("swap_throughput", result)
    print(report(result))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
