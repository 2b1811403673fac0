"""chain-watcher-utxo: follows one UTXO chain for the escrows the engine assigns.

One process per chain (`--chain ETH`); replicas of it may run side by side.
"""

from __future__ import annotations

import argparse
import asyncio

from otc_common import watchset
from otc_common.runtime import Service
from otc_common.settings import BaseSettings, config_exit, settings_or_exit

KIND = "utxo"


async def serve(chain: str) -> None:
    settings = settings_or_exit(BaseSettings)
    service = Service(
        f"chain-watcher-utxo-{chain}",
        settings,
        schema=watchset.schema_name(KIND, chain),
        extra_migrations=[watchset.MIGRATION],
    )
    service.consume(watchset.consumer_spec(KIND, chain), watchset.WatchSetHandler(chain))

    async def setup() -> None:
        assert service.registry is not None
        known = service.registry.chains.get(chain)
        if known is None or known.kind.value != KIND:
            config_exit(f"--chain {chain}: not a {KIND} chain in the registry")

    await service.run(setup=setup)


def main() -> None:
    parser = argparse.ArgumentParser(prog="chain-watcher-utxo")
    parser.add_argument("--chain", required=True, help="registry id of the chain to follow, e.g. ETH")
    args = parser.parse_args()
    asyncio.run(serve(args.chain))


if __name__ == "__main__":
    main()
