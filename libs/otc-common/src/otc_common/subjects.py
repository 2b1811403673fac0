"""Subjects, JetStream streams and durable consumers: the whole bus layout in one place."""

from __future__ import annotations

import msgspec

ENGINE_RPC = "otc.rpc.engine"
ENGINE_RPC_QUEUE_GROUP = "engine"


def deal(deal_id: str) -> str:
    return f"otc.deal.{deal_id}"


ALL_DEALS = "otc.deal.>"


def chain_event(chain: str, kind: str) -> str:
    """kind: deposit | confirmation | tip | reorg | token_ignored."""
    return f"otc.chain.{chain}.{kind}"


def chain_events(chain: str) -> str:
    return f"otc.chain.{chain}.>"


def queue_command(chain: str) -> str:
    return f"otc.queue.cmd.{chain}"


def queue_result(chain: str) -> str:
    return f"otc.queue.result.{chain}"


def tank_command(chain: str) -> str:
    return f"otc.tank.cmd.{chain}"


def tank_result(chain: str) -> str:
    return f"otc.tank.result.{chain}"


def alert(source: str) -> str:
    return f"otc.alert.{source}"


class StreamSpec(msgspec.Struct, frozen=True):
    name: str
    subjects: list[str]
    max_age_seconds: int = 30 * 24 * 3600
    #: Longer than any outage a relay recovers from, so a re-published event is dropped.
    duplicate_window_seconds: int = 15 * 60


STREAMS = (
    StreamSpec("DEALS", ["otc.deal.>"]),
    StreamSpec("CHAIN", ["otc.chain.>"], max_age_seconds=7 * 24 * 3600),
    StreamSpec("QUEUE", ["otc.queue.>"]),
    StreamSpec("TANK", ["otc.tank.>"]),
    StreamSpec("ALERTS", ["otc.alert.>"]),
)


class ConsumerSpec(msgspec.Struct, frozen=True):
    durable: str
    stream: str
    filter_subjects: list[str]
    ack_wait_seconds: int = 30
    max_ack_pending: int = 1000
    #: The name its handled events are recorded under in the inbox (the durable's by default). Consumers
    #: that split one consumer's subjects between them keep its name, so nothing it handled is handled again.
    inbox: str | None = None
    #: The event types its handler acts on (None: every type). Others are acknowledged without touching the
    #: database: a subject names a deal, not an event type, so a consumer of deal events receives them all.
    types: frozenset[str] | None = None

    @property
    def inbox_name(self) -> str:
        return self.inbox or self.durable
