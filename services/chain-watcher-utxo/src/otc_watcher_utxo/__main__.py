"""chain-watcher-utxo: follows one UTXO chain over the Electrum protocol for the escrows the engine assigns.

One process per chain (`--chain UNICITY`); replicas of it may run side by side and publish
identical events, which JetStream deduplicates by their fact-derived ids.
"""

from __future__ import annotations

import argparse
import logging

from otc_common import chainwatch, watchset
from otc_common.db import Connection
from otc_common.electrum import ElectrumClient
from otc_common.messages import Envelope, Message
from otc_common.registry import ChainKind
from otc_common.runtime import Loop, Service, run_service
from otc_common.settings import config_exit, settings_or_exit
from otc_watcher_utxo import metrics, rules, store
from otc_watcher_utxo.settings import WatcherSettings
from otc_watcher_utxo.watcher import Watcher

KIND = "utxo"

log = logging.getLogger("otc.watcher.utxo")


class WatchSetHandler(watchset.WatchSetHandler):
    """The shared watch set, plus a wake-up for every replica's chain loop once the change commits."""

    async def __call__(self, conn: Connection, envelope: Envelope, message: Message) -> None:
        await super().__call__(conn, envelope, message)
        await store.notify_changed(conn)


def normalise_txid(txid: str) -> str | None:
    value = rules.normalise_txid(txid)
    if value is None:
        log.warning("not following a txid that is not 64 hex digits", extra={"txid": txid[:100]})
    return value


async def serve(chain_id: str) -> None:
    settings = settings_or_exit(WatcherSettings)
    schema = watchset.schema_name(KIND, chain_id)
    service = Service(
        f"chain-watcher-utxo-{chain_id}",
        settings,
        schema=schema,
        migrations_package="otc_watcher_utxo",
        extra_migrations=watchset.MIGRATIONS,
    )
    service.consume(watchset.consumer_spec(KIND, chain_id), WatchSetHandler(chain_id))
    service.consume(
        chainwatch.follow_consumer_spec(KIND, chain_id),
        chainwatch.FollowHandler(chain_id, normalise_txid, store.add_follow),
    )
    watcher: list[Watcher] = []

    async def follow_chain(loop: Loop) -> None:
        await watcher[0].run(loop)

    service.loop("chain-follow", follow_chain)

    async def setup() -> None:
        assert service.registry is not None
        chain = service.registry.chains.get(chain_id)
        if chain is None or chain.kind is not ChainKind.UTXO or chain.electrum is None:
            config_exit(f"--chain {chain_id}: not a {KIND} chain in the registry")
        try:
            client = ElectrumClient(
                chain.electrum,
                client_name=f"otc-watcher-{chain_id}",
                request_timeout=settings.request_timeout_seconds,
                on_request=lambda method: metrics.RPC_CALLS.labels(chain_id, method).inc(),
            )
        except ValueError as exc:
            config_exit(f"chain {chain_id}: electrum: {exc}")
        watcher.append(
            Watcher(
                chain,
                service.db,
                service.nats,
                client,
                database_url=settings.database_url,
                schema=schema,
                scan_concurrency=settings.scan_concurrency,
            )
        )

    await service.run(setup=setup)


def main() -> None:
    parser = argparse.ArgumentParser(prog="chain-watcher-utxo")
    parser.add_argument("--chain", required=True, help="registry id of the chain to follow, e.g. UNICITY")
    args = parser.parse_args()
    run_service(serve(args.chain))


if __name__ == "__main__":
    main()
