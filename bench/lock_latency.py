"""Locking block → payout broadcast latency, on the whole EVM system running as processes.

For each deal: the locking block is the block at which the later of the two sides reached its
confirmation threshold; its time is when the watcher published that block's tip event. The
payout broadcast time is when the queue processor committed the first swap payout's signed
transaction (its TransferSubmitted event, written just before the broadcast). Both clocks are
this machine's.

    uv run python -m bench.lock_latency --deals 20

Prints a table and writes bench/results/lock_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import nats

from otc_common.messages import ChainTip, TransferSubmitted, decode_envelope

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import EvmChains, create_database, drop_database
from tests.e2e import Deal, EvmStack
from tests.support import TEST_SEED_HEX, write_test_registry

CONFIRMATIONS = {"ETH": 2, "POLYGON": 3}


async def read_stream(nats_url: str, stream: str, subject: str) -> list[tuple[Any, Any]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    found = []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            break
        envelope, message = decode_envelope(msg.data)
        found.append((envelope, message))
    await nc.close()
    return found


async def run(deal_count: int, block_seconds: float) -> dict[str, Any]:
    from otc_cli.servers import free_port, start_nats, start_postgres

    work = Path(tempfile.mkdtemp(prefix="otc-bench-"))
    os.chmod(work, 0o755)  # noqa: S103 - the database server runs as its own user and must reach its data
    nats_server = start_nats(work / "nats", free_port(), work / "nats.log")
    pg = start_postgres(work / "pg", work / "pg.log")
    chains = await asyncio.to_thread(EvmChains, work, block_seconds)
    database = await create_database(pg.url)
    registry = write_test_registry(
        work / "registry.toml",
        chains.rpc["ETH"],
        chains.rpc["POLYGON"],
        eth_usdt=chains.usdt["ETH"],
        polygon_usdt=chains.usdt["POLYGON"],
    )
    env = {
        "OTC_NATS_URL": nats_server.url,
        "OTC_DATABASE_URL": database,
        "OTC_REGISTRY_FILE": str(registry),
        "OTC_SEED": TEST_SEED_HEX,
        "OTC_LOG_LEVEL": "WARNING",
    }
    stack = EvmStack(env, work, chains)
    await stack.start()
    try:
        deals = []
        for _ in range(deal_count):
            deal = await Deal.create(stack, ("ETH", "ETH", "0.05"), ("POLYGON", "MATIC", "20"))
            await deal.fill()
            deals.append(deal)
        for deal in deals:
            await asyncio.gather(
                deal.deposit("ALICE", await deal.required("ALICE")), deal.deposit("BOB", await deal.required("BOB"))
            )
        for deal in deals:
            await deal.wait("CLOSED", timeout=180, outcome="SWAPPED")
        tips = await read_stream(nats_server.url, "CHAIN", "otc.chain.*.tip")
        submitted = await read_stream(nats_server.url, "QUEUE", "otc.queue.result.>")
        tip_time = {(m.chain, m.height): e.occurred_at for e, m in tips if isinstance(m, ChainTip)}
        first_submit: dict[str, Any] = {}
        for envelope, message in submitted:
            if isinstance(message, TransferSubmitted) and ":SWAP_PAYOUT:" in message.transfer_id:
                first_submit.setdefault(message.deal_id, envelope.occurred_at)
                first_submit[message.deal_id] = min(first_submit[message.deal_id], envelope.occurred_at)
        latencies = []
        for deal in deals:
            status = await deal.status()
            lock_at = []
            for party, side in (("alice", "ALICE"), ("bob", "BOB")):
                chain = deal.sides[side]["chainId"]
                heights = [d["blockHeight"] for d in status["collection"][party]["deposits"]]
                locking_height = max(heights) + CONFIRMATIONS[chain] - 1
                lock_at.append(tip_time[(chain, locking_height)])
            latencies.append((first_submit[deal.id] - max(lock_at)).total_seconds() * 1000)
    finally:
        await stack.stop()
        chains.stop()
        await drop_database(pg.url, database)
        pg.stop()
        nats_server.stop()
    latencies.sort()
    return {
        "deals": deal_count,
        "block_seconds": block_seconds,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": latencies[-1],
        "min_ms": latencies[0],
        "samples_ms": [round(x, 1) for x in latencies],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deals", type=int, default=20)
    parser.add_argument("--block-seconds", type=float, default=0.5)
    args = parser.parse_args()
    result = asyncio.run(run(args.deals, args.block_seconds))
    print(f"{'deals':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'min ms':>8}")
    print(
        f"{result['deals']:>6} {result['p50_ms']:>8.1f} {result['p99_ms']:>8.1f} "
        f"{result['max_ms']:>8.1f} {result['min_ms']:>8.1f}"
    )
    out = Path(__file__).resolve().parent / "results" / "lock_latency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
