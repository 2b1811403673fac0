"""queue-processor: signs and broadcasts payouts. Holds escrow keys (derived from the seed)."""

from __future__ import annotations

import asyncio

from otc_common import subjects
from otc_common.runtime import Service
from otc_common.settings import BaseSettings, settings_or_exit
from otc_common.subjects import ConsumerSpec

COMMANDS = ConsumerSpec(
    durable="queue-processor-commands", stream="QUEUE", filter_subjects=["otc.queue.cmd.>"]
)
CHAIN_EVENTS = ConsumerSpec(
    durable="queue-processor-chain",
    stream="CHAIN",
    filter_subjects=[subjects.chain_event("*", "confirmation")],
)


async def serve() -> None:
    settings = settings_or_exit(BaseSettings)
    service = Service("queue-processor", settings, schema="queue")

    async def setup() -> None:
        # Consumers are provisioned so no command is missed; signing starts with the payout stage.
        for spec in (COMMANDS, CHAIN_EVENTS):
            await service.nats.provision_consumer(spec)

    await service.run(setup=setup)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
