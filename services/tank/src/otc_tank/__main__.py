"""tank: funds EVM escrows with the gas their token payouts need. Holds the tank wallet keys."""

from __future__ import annotations

import asyncio

from otc_common.runtime import Service
from otc_common.settings import BaseSettings, settings_or_exit
from otc_common.subjects import ConsumerSpec

COMMANDS = ConsumerSpec(durable="tank-commands", stream="TANK", filter_subjects=["otc.tank.cmd.>"])


async def serve() -> None:
    settings = settings_or_exit(BaseSettings)
    service = Service("tank", settings, schema="tank")

    async def setup() -> None:
        # Provisioned now so no funding request is missed; funding starts with the payout stage.
        await service.nats.provision_consumer(COMMANDS)

    await service.run(setup=setup)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
