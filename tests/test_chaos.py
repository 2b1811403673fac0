"""Chaos: many concurrent deals of every kind on ETH, POLYGON and UNICITY while services are SIGKILLed every
2-5 s, NATS and PostgreSQL restart once each, a watcher is stopped for a while and chains reorganise under
WAITING and SWAP deals; then the chains themselves are read and every invariant checked (tests/chaos.py).

The CI form (30 deals over 30 s of faults) runs by default; OTC_CHAOS_LONG=1 runs the long form (200 deals
over 2 minutes). OTC_CHAOS_SEED=<n> replays the deal mix and the fault schedule of an earlier run (timings
still differ from run to run).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos import ChaosRun, chaos_seed, chaos_size

SIZE = chaos_size()
#: Where a failed run's details and service logs are kept, outside the temporary directories pytest prunes.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
async def chaos(work_dir: Path) -> AsyncIterator[ChaosRun]:
    run = ChaosRun(work_dir, SIZE, chaos_seed())
    try:
        await run.start()
        yield run
    finally:
        await run.close()


@pytest.mark.slow
@pytest.mark.timeout(SIZE.test_timeout)
async def test_chaos_every_deal_ends_right_and_every_escrow_balances(chaos: ChaosRun) -> None:
    result = await chaos.run()
    details = chaos.work_dir / f"chaos-{result.seed}.txt"
    report = result.report
    details.write_text("\n".join([result.summary(), result.details(), *report.violations, *report.records]))
    print(f"\n{result.summary()}\n  details: {details}")
    if report.violations and chaos.stack is not None:
        kept = ARTIFACTS / f"chaos-{result.seed}"
        kept.mkdir(parents=True, exist_ok=True)
        for path in [details, *(proc.log_path for proc in chaos.stack.procs.values())]:
            if path.exists():
                shutil.copy(path, kept)
        print(f"  kept: {kept}")
    assert len(result.deals) == SIZE.deals, result.report.violations
    assert not result.report.violations, "\n".join(result.report.violations[:40])
    # The faults did happen: a test that injected none would prove nothing.
    assert sum(result.faults.kills.values()) >= SIZE.fault_seconds / 5 - 1
    assert set(result.faults.restarts) == {"nats", "postgres"} and result.faults.outage is not None
    # And the reorgs hit what they aimed at at least once each: a deal in WAITING, a payout with one confirmation.
    notes = [note for deal in result.deals for note in deal.notes]
    assert "waiting seen" in notes and "payout reorged" in notes, notes
