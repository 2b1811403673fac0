"""`otc tank`: the tank wallets that front gas to token escrows."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from otc_cli.ops.common import (
    Amounts,
    Config,
    EndpointsOption,
    JsonOption,
    OpsError,
    amount_text,
    console,
    database,
    print_json,
    run,
    when,
)

app = typer.Typer(no_args_is_help=True, help="The tank: gas wallets for token escrows.")


async def _status(config: Config) -> list[dict[str, Any]]:
    import httpx

    from otc_cli.ops.nodes import NodeRefused, evm_native_balance
    from otc_common.registry import ChainKind

    registry = config.registry
    amounts = Amounts(registry)
    async with database(config, "tank", "tank") as conn:
        wallets = {row["chain"]: row for row in await conn.fetch("SELECT * FROM wallets")}
        counts = {
            (row["chain"], row["status"]): int(row["n"])
            for row in await conn.fetch(
                "SELECT chain, status, count(*) AS n FROM fundings WHERE status IN ('WAITING', 'SIGNED') "
                "GROUP BY chain, status"
            )
        }
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        for chain in registry.chains.values():
            if chain.kind is not ChainKind.EVM or chain.tank_address is None:
                continue
            native = chain.native_asset
            wallet = wallets.get(chain.id)
            live: int | None = None
            live_error = None
            try:
                live = await evm_native_balance(client, chain, chain.tank_address)
            except (OpsError, NodeRefused) as exc:
                live_error = exc.message

            stored = None if wallet is None or wallet["balance"] is None else int(wallet["balance"])
            rows.append(
                {
                    "chain": chain.id,
                    "address": chain.tank_address,
                    "storedAddress": None if wallet is None else wallet["address"],
                    "storedBalance": amounts.value(chain.id, native.symbol, stored),
                    "storedAt": None if wallet is None else wallet["balance_at"],
                    "liveBalance": amounts.value(chain.id, native.symbol, live),
                    "liveError": live_error,
                    "low": None if wallet is None else wallet["low"],
                    "nextNonce": None if wallet is None else wallet["next_nonce"],
                    "waiting": counts.get((chain.id, "WAITING"), 0),
                    "signed": counts.get((chain.id, "SIGNED"), 0),
                }
            )
    return rows


@app.command("status")
def tank_status(endpoints: EndpointsOption = None, as_json: JsonOption = False) -> None:
    """Per chain: the tank's address, its balance as the tank last stored it and as the node says now,
    and the funding requests still waiting or in flight."""
    rows = run(_status(Config(endpoints)))
    if as_json:
        print_json(rows)
        return
    table = Table(
        "CHAIN", "TANK", "STORED BALANCE", "STORED AT", "LIVE BALANCE", "LOW", "WAITING", "IN FLIGHT", box=None
    )
    for r in rows:
        live = amount_text(r["liveBalance"]) if r["liveError"] is None else f"[red]{r['liveError']}[/]"
        low = "-" if r["low"] is None else ("[red]yes[/]" if r["low"] else "no")
        address = r["address"]
        if r["storedAddress"] is not None and r["storedAddress"].lower() != address.lower():
            address += f" [red](tank uses {r['storedAddress']})[/]"
        table.add_row(
            r["chain"],
            address,
            amount_text(r["storedBalance"]),
            when(r["storedAt"]),
            live,
            low,
            str(r["waiting"]),
            str(r["signed"]),
        )
    out = console()
    out.print(table if rows else "no chain in the registry has a tank_address")
