"""The transactions to follow: every candidate hash the queue processor broadcast on this chain."""

from __future__ import annotations

from otc_common import subjects
from otc_common.db import Connection
from otc_common.messages import Envelope, Message, TransferSubmitted
from otc_common.subjects import ConsumerSpec
from otc_watcher_evm import store


def consumer_spec(chain: str) -> ConsumerSpec:
    return ConsumerSpec(
        durable=f"watcher-evm-{chain}-queue", stream="QUEUE", filter_subjects=[subjects.queue_result(chain)]
    )


def normalise_txid(txid: str) -> str:
    text = txid.strip().lower()
    return text if text.startswith("0x") else "0x" + text


class FollowHandler:
    def __init__(self, chain: str) -> None:
        self.chain = chain

    async def __call__(self, conn: Connection, envelope: Envelope, message: Message) -> None:
        if not isinstance(message, TransferSubmitted) or message.chain != self.chain:
            return
        for txid in sorted({normalise_txid(t) for t in [message.txid, *message.candidates] if t}):
            await store.add_follow(conn, txid, message.transfer_id)
