"""chain-watcher-evm: follows one EVM chain for the escrows the engine assigns.

One process per chain (`--chain ETH`); replicas of it may run side by side and publish
identical events, which JetStream deduplicates by their fact-derived ids.
"""

from __future__ import annotations

import argparse

from otc_common import watchset
from otc_common.db import package_migrations
from otc_common.registry import ChainKind
from otc_common.runtime import Loop, Service, run_service
from otc_common.settings import config_exit, settings_or_exit
from otc_watcher_evm import follow, heads
from otc_watcher_evm.rpc import EvmRpc
from otc_watcher_evm.settings import WatcherSettings
from otc_watcher_evm.watcher import Watcher

KIND = "evm"


async def serve(chain_id: str) -> None:
    settings = settings_or_exit(WatcherSettings)
    service = Service(
        f"chain-watcher-evm-{chain_id}",
        settings,
        schema=watchset.schema_name(KIND, chain_id),
        # The watch set's table first: the watcher's own migrations put triggers on it.
        extra_migrations=[*watchset.MIGRATIONS, *package_migrations("otc_watcher_evm")],
    )
    service.consume(watchset.consumer_spec(KIND, chain_id), watchset.WatchSetHandler(chain_id))
    service.consume(follow.consumer_spec(chain_id), follow.FollowHandler(chain_id))
    watcher: list[Watcher] = []

    async def follow_chain(loop: Loop) -> None:
        try:
            await watcher[0].run(loop)
        finally:
            # Closed here, not left to the collector, which would log an unclosed session at every stop.
            await watcher[0].rpc.close()

    service.loop("chain-follow", follow_chain)

    async def setup() -> None:
        assert service.registry is not None
        chain = service.registry.chains.get(chain_id)
        if chain is None or chain.kind is not ChainKind.EVM or chain.rpc is None:
            config_exit(f"--chain {chain_id}: not an {KIND} chain in the registry")
        rpc = EvmRpc(chain_id, chain.rpc, settings.rpc_timeout_seconds, settings.balance_call_addresses)
        heads_url = heads.websocket_url(settings.ws_url, chain.rpc)
        watcher.append(Watcher(chain, service.db, service.nats, rpc, settings.poll_interval_ms / 1000, heads_url))

    await service.run(setup=setup)


def main() -> None:
    parser = argparse.ArgumentParser(prog="chain-watcher-evm")
    parser.add_argument("--chain", required=True, help="registry id of the chain to follow, e.g. ETH")
    args = parser.parse_args()
    run_service(serve(args.chain))


if __name__ == "__main__":
    main()
