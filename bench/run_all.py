"""Runs every benchmark in bench/, one after the other, and prints one table of their headline figures.

    uv run python -m bench.run_all [--quick] [--only lock_latency,memory]

Each benchmark runs as its own process (`python -m bench.<name>`, with --quick when given) and
writes bench/results/<name>.json; its output goes to bench/results/<name>.log. devnet_tps prints
its figures only, so they are read from its output and written to bench/results/devnet_tps.json
here. A benchmark that fails is reported as failed and the others still run; the exit status is
non-zero if any failed. The summary is written to bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, table  # noqa: E402

#: In the order they run: the short ones first, so a failure shows early.
BENCHMARKS = ("devnet_tps", "watcher_cost", "gateway_throughput", "lock_latency", "swap_throughput", "memory")

Row = tuple[str, str, Any, str, str]


def _args(name: str, quick: bool) -> list[str]:
    if name == "devnet_tps":
        return ["--count", "200"] if quick else []
    return ["--quick"] if quick else []


def run_one(name: str, quick: bool) -> dict[str, Any]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS / f"{name}.log"
    if not (ROOT / "bench" / f"{name}.py").exists():
        return {"name": name, "status": "missing", "seconds": 0.0}
    started = time.monotonic()
    with log_path.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-m", f"bench.{name}", *_args(name, quick)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    seconds = time.monotonic() - started
    if name == "devnet_tps" and code == 0:
        _devnet_json(log_path)
    print(f"{name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f}s, output in {log_path}")
    return {"name": name, "status": "ok" if code == 0 else f"failed ({code})", "seconds": round(seconds, 1)}


def _devnet_json(log_path: Path) -> None:
    text = log_path.read_text(errors="replace")
    figures: dict[str, float] = {}
    for label, key in (
        (r"one at a time:\s+([\d.]+) tx/s", "one_at_a_time_tps"),
        (r"pipelined:\s+([\d.]+) tx/s", "pipelined_tps"),
        (r"JSON-RPC batches of \d+:\s+([\d.]+) tx/s", "batched_tps"),
        (r"mining a block of (\d+) transactions: ([\d.]+)s", "mine_block"),
        (r"in process \(parse \+ mempool admission only\):\s+([\d.]+) tx/s", "in_process_tps"),
    ):
        match = re.search(label, text)
        if match is None:
            continue
        if key == "mine_block":
            figures["block_transactions"] = int(match.group(1))
            figures["mine_block_seconds"] = float(match.group(2))
        else:
            figures[key] = float(match.group(1))
    (RESULTS / "devnet_tps.json").write_text(json.dumps({"benchmark": "devnet_tps", **figures}, indent=2) + "\n")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    except (OSError, ValueError):
        return None


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def rows_lock_latency(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for level in data.get("levels", []):
        n = level["active_deals"]
        figure = level["both_payouts_ms"]
        goal = 200 if n <= 1 else (1000 if n >= 10_000 else None)
        rows.append(
            (
                "lock_latency",
                f"lock → payouts p50/p99 ms, {n:,} active (n={figure['count']})",
                f"{figure['p50']} / {figure['p99']}",
                f"p99 ≤ {goal}" if goal else "-",
                _verdict(figure["p99"] <= goal if goal else None),
            )
        )
    return rows


def rows_swap_throughput(data: dict[str, Any]) -> list[Row]:
    return [
        (
            "swap_throughput",
            f"{data['deals']:,} deals created → CLOSED (s); chain minimum {data['chain_minimum_seconds']} s",
            data["wall_seconds"],
            f"≤ {data['goal_seconds']}",
            _verdict(data["wall_seconds"] <= data["goal_seconds"] if data["deals"] >= 1000 else None),
        )
    ]


def rows_memory(data: dict[str, Any]) -> list[Row]:
    columns = data["rss_mib"]
    last = list(columns)[-1]
    rows: list[Row] = []
    for name, idle in columns["idle"].items():
        if name.startswith("["):
            continue
        loaded = columns[last].get(name)
        goal = data["goal"]["engine_mib_at_10000"] if name == "engine" else None
        ok = None if goal is None or "10,000" not in last else (loaded is not None and loaded <= goal)
        rows.append(
            (
                "memory",
                f"{name} RSS MiB idle → {last}",
                f"{idle} → {loaded}",
                f"≤ {goal}" if goal else "-",
                _verdict(ok),
            )
        )
    return rows


def rows_devnet_tps(data: dict[str, Any]) -> list[Row]:
    return [("devnet_tps", key.replace("_", " "), value, "-", "-") for key, value in data.items() if key != "benchmark"]


def rows_generic(name: str, data: dict[str, Any]) -> list[Row]:
    """A benchmark whose JSON this script does not know: the scalar parts of its verdict (or summary)."""
    for key in ("verdict", "summary", "headline"):
        value = data.get(key)
        if isinstance(value, dict):
            return [(name, str(k), _scalars(v), "-", "-") for k, v in value.items()]
        if value is not None:
            return [(name, key, _scalars(value), "-", "-")]
    return [(name, "see its JSON", str(RESULTS / f"{name}.json"), "-", "-")]


def _scalars(value: Any) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k} {v}" for k, v in value.items() if isinstance(v, str | int | float | bool))
    else:
        text = str(value)
    return text if len(text) <= 100 else text[:97] + "..."


READERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "lock_latency": rows_lock_latency,
    "swap_throughput": rows_swap_throughput,
    "memory": rows_memory,
    "devnet_tps": rows_devnet_tps,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every benchmark at its small smoke-test sizes")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    runs = [run_one(name, args.quick) for name in names]
    rows: list[Row] = []
    for run in runs:
        name = run["name"]
        data = _load(name) if run["status"] == "ok" else None
        if data is None:
            rows.append((name, "run", run["status"], "-", "-"))
            continue
        try:
            rows += READERS.get(name, lambda d, n=name: rows_generic(n, d))(data)
        except (KeyError, TypeError, ValueError) as exc:
            rows.append((name, "unreadable result", repr(exc), "-", "-"))
    info = machine()
    print()
    print(
        f"{info['nproc']} cores, {info['cpu']}, {info['memory_gib']} GiB; load at start {info['load_average_at_start']}"
    )
    print(table(("benchmark", "figure", "value", "goal", "verdict"), rows))
    (RESULTS / "summary.json").write_text(
        json.dumps({"machine": info, "quick": args.quick, "runs": runs, "rows": rows}, indent=2, default=str) + "\n"
    )
    if any(run["status"] != "ok" for run in runs if run["status"] != "missing"):
        sys.exit(1)


if __name__ == "__main__":
    main()
