"""The transactions to follow: every candidate hash the queue processor broadcast on this chain."""

from __future__ import annotations

from otc_common import chainwatch
from otc_common.subjects import ConsumerSpec
from otc_watcher_evm import store


def consumer_spec(chain: str) -> ConsumerSpec:
    return chainwatch.follow_consumer_spec("evm", chain)


def normalise_txid(txid: str) -> str:
    text = txid.strip().lower()
    return text if text.startswith("0x") else "0x" + text


class FollowHandler(chainwatch.FollowHandler):
    def __init__(self, chain: str) -> None:
        super().__init__(chain, normalise_txid, store.add_follow)
