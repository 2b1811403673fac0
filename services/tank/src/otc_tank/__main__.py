"""tank: funds EVM escrows with the gas their token payouts need. Holds the tank wallet keys."""

from __future__ import annotations

from otc_common.registry import load_registry
from otc_common.runtime import Service, run_service
from otc_common.settings import ConfigError, config_exit, settings_or_exit
from otc_common.subjects import ConsumerSpec
from otc_tank.funding import Tank
from otc_tank.settings import TankSettings, low_balance_thresholds
from otc_tank.wallet import check_tank_addresses, load_wallet

COMMANDS = ConsumerSpec(durable="tank-commands", stream="TANK", filter_subjects=["otc.tank.cmd.>"])


async def serve() -> None:
    settings = settings_or_exit(TankSettings)
    try:
        # Checked before anything starts: a wrong key must not get as far as the bus.
        registry = load_registry(settings.registry_file)
        wallet = load_wallet(settings.tank_path)
        chains = check_tank_addresses(wallet, registry)
        thresholds = low_balance_thresholds(settings, registry, chains)
    except ConfigError as exc:
        config_exit(str(exc))
    service = Service("tank", settings, schema="tank", migrations_package="otc_tank")
    tank = Tank(service, settings, registry, wallet, thresholds)
    service.consume(COMMANDS, tank.on_request)
    for chain_id, worker in tank.chains.items():
        service.loop(f"tank-{chain_id}", worker.run)
    service.loop("tank-requests", tank.listen)
    await service.run(setup=tank.start)


def main() -> None:
    run_service(serve())


if __name__ == "__main__":
    main()
