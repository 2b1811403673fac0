"""queue-processor: signs and broadcasts payouts. Holds escrow keys (derived from the seed)."""

from __future__ import annotations

from otc_common.runtime import Service, run_service
from otc_common.settings import ConfigError, config_exit, settings_or_exit
from otc_queue.processor import Processor
from otc_queue.settings import QueueSettings, load_signing_seed


async def serve() -> None:
    settings = settings_or_exit(QueueSettings)
    try:
        seed = load_signing_seed()
    except ConfigError as exc:
        config_exit(str(exc))
    service = Service("queue-processor", settings, schema="queue", migrations_package="otc_queue")
    processor = Processor(service, settings, seed)
    service.loop("queue-sweep", processor.sweep)
    service.on_stop(processor.stop)

    async def setup() -> None:
        try:
            await processor.start()
        except ConfigError as exc:
            config_exit(str(exc))

    await service.run(setup=setup)


def main() -> None:
    run_service(serve())


if __name__ == "__main__":
    main()
