"""The UTXO watcher's metrics: the watchers' shared set (otc_common.metrics) and its own."""

from __future__ import annotations

from prometheus_client import Counter

from otc_common.metrics import WATCHER_BLOCK_SECONDS as BLOCK_SECONDS
from otc_common.metrics import WATCHER_BLOCKS as BLOCKS
from otc_common.metrics import WATCHER_DEPOSITS as DEPOSITS
from otc_common.metrics import WATCHER_FOLLOWED as FOLLOWED
from otc_common.metrics import WATCHER_HEIGHT as HEIGHT
from otc_common.metrics import WATCHER_REORGS as REORGS
from otc_common.metrics import WATCHER_RPC_CALLS as RPC_CALLS
from otc_common.metrics import WATCHER_WATCHED as WATCHED

__all__ = ["BLOCKS", "BLOCK_SECONDS", "DEPOSITS", "FOLLOWED", "HEIGHT", "REORGS", "RPC_CALLS", "SCANS", "WATCHED"]

SCANS = Counter("otc_watcher_history_scans_total", "Scripthash histories read and acted on", ["chain"])
