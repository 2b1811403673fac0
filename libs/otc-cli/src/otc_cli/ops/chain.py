"""`otc chain`: halting and resuming payouts (through the engine, which keeps the safeguards) and
re-scanning a chain from a height (through the watcher's own state)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from otc_cli.ops.common import Config, EndpointsOption, JsonOption, OpsError, console, database, print_json, run

app = typer.Typer(no_args_is_help=True, help="Payout halts and re-scans, per chain.")

TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the engine's answer", show_default=True)
]


async def admin_call(config: Config, method: str, params: dict[str, Any], wait_seconds: float) -> Any:
    """One call to the engine's admin API over NATS request/reply; its error becomes an OpsError."""
    import msgspec
    import nats
    import nats.errors

    from otc_engine.admin import ADMIN_SUBJECT

    try:
        nc = await nats.connect(
            servers=[s.strip() for s in config.nats_url.split(",") if s.strip()],
            name="otc-cli",
            connect_timeout=3,
            max_reconnect_attempts=0,
            allow_reconnect=False,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise OpsError(f"cannot connect to NATS: {type(exc).__name__}") from None
    try:
        request = msgspec.json.encode({"method": method, "params": params})
        try:
            msg = await nc.request(ADMIN_SUBJECT, request, timeout=wait_seconds)
        except nats.errors.NoRespondersError:
            raise OpsError("no engine is answering on the bus (is the engine running?)") from None
        except TimeoutError:
            raise OpsError(
                f"the engine did not answer within {wait_seconds:g}s; it may still be working: check `otc chain halts`"
            ) from None
        reply = msgspec.json.decode(msg.data)
    finally:
        await nc.close()
    if not isinstance(reply, dict):
        raise OpsError("the engine answered with an unexpected shape")
    error = reply.get("error")
    if error:
        raise OpsError(f"the engine refused: {error.get('message', error)} (code {error.get('code')})")
    return reply.get("result")


@app.command("halt")
def halt_chain(
    chain: Annotated[str, typer.Argument(help="Registry id of the chain, e.g. ETH")],
    reason: Annotated[str, typer.Option("--reason", help="Why; kept with the halt and sent in the alert")],
    endpoints: EndpointsOption = None,
    timeout: TimeoutOption = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Stop commanding payouts on CHAIN. Planned transfers wait; transactions already signed continue."""
    result = run(admin_call(Config(endpoints), "chain.halt", {"chain": chain, "reason": reason}, timeout))
    if as_json:
        print_json(result)
        return
    if result["new"]:
        console().print(f"payouts on {result['chain']} halted: {result['reason']}")
    else:
        console().print(f"{result['chain']} was already halted since {result['haltedAt']}: {result['reason']}")


@app.command("resume")
def resume_chain(
    chain: Annotated[str, typer.Argument(help="Registry id of the chain, e.g. ETH")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    endpoints: EndpointsOption = None,
    timeout: TimeoutOption = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Lift the halt on CHAIN and command every transfer that waited for it. Safe to repeat."""
    config = Config(endpoints)
    if not yes:
        halts = run(admin_call(config, "chain.halts", {}, timeout))["halts"]
        current = next((h for h in halts if h["chain"] == chain), None)
        why = f" (halted since {current['haltedAt']}: {current['reason']})" if current else " (not halted)"
        typer.confirm(f"Resume payouts on {chain}{why}?", abort=True)
    result = run(admin_call(config, "chain.resume", {"chain": chain}, timeout))
    if as_json:
        print_json(result)
        return
    head = f"payouts on {result['chain']} resumed" if result["resumed"] else f"{result['chain']} was not halted"
    console().print(f"{head}; {result['commanded']} planned transfer(s) of {result['deals']} deal(s) commanded")


@app.command("halts")
def list_halts(endpoints: EndpointsOption = None, timeout: TimeoutOption = 30.0, as_json: JsonOption = False) -> None:
    """Chains whose payouts are halted, and why."""
    halts = run(admin_call(Config(endpoints), "chain.halts", {}, timeout))["halts"]
    if as_json:
        print_json(halts)
        return
    table = Table("CHAIN", "SINCE", "REASON", box=None)
    for h in halts:
        table.add_row(h["chain"], h["haltedAt"], h["reason"])
    console().print(table if halts else "no chain is halted")


# --------------------------------------------------------------------------- rescan


async def _rescan(config: Config, chain_id: str, height: int) -> dict[str, Any]:
    """Rewinds the EVM watcher to the block below `height`, the way its own reorg handling does.

    The blocks above, and what was published for them, are forgotten so the watcher processes them
    again; the balances are measured at the new head so internal transfers are judged afresh. The
    head's version changes, so a running watcher drops the step it was taking and starts from here.
    What it publishes again carries the same fact-derived event ids, so consumers ignore repeats.
    """
    from otc_common import watchset
    from otc_common.evm_rpc import RpcFailure
    from otc_common.registry import ChainKind
    from otc_watcher_evm import store
    from otc_watcher_evm.rpc import EvmRpc
    from otc_watcher_evm.rules import Baseline

    chain = config.registry.chains.get(chain_id)
    if chain is None:
        raise OpsError(f"unknown chain {chain_id!r}; known chains: {', '.join(sorted(config.registry.chains))}")
    if chain.kind is not ChainKind.EVM or chain.rpc is None:
        raise OpsError(f"{chain_id} is a {chain.kind.value} chain: only EVM watchers can be re-scanned so far")
    if height < 1:
        raise OpsError("--from must be at least 1")
    schema = watchset.schema_name("evm", chain_id)
    rpc = EvmRpc(chain_id, chain.rpc, 15.0)
    try:
        async with database(config, schema, f"{chain_id} watcher") as conn:
            ancestor = None
            for _ in range(20):
                head = await store.head(conn)
                if head is None:
                    raise OpsError(f"the {chain_id} watcher has not processed any block yet; nothing to re-scan")
                if height > head.number:
                    raise OpsError(f"the {chain_id} watcher is at block {head.number}; --from must be at most that")
                if ancestor is None:
                    ancestor = await rpc.block(height - 1, full=False)
                    if ancestor is None:
                        raise OpsError(f"the {chain_id} node has no block {height - 1}")
                previous = await store.baselines(conn)
                try:
                    rewound: dict[str, int] | None = (
                        await rpc.balances(sorted(previous), ancestor.hash) if previous else {}
                    )
                except RpcFailure:
                    rewound = None  # an old state the node no longer serves: re-measure without judging
                async with conn.transaction():
                    if not await store.claim_head(conn, head):
                        continue  # the watcher moved on meanwhile; take its new head and try again
                    watched = await store.watched(conn)
                    if rewound is None:
                        baselines = {a: Baseline(b.balance, b.direct_since, None) for a, b in previous.items()}
                    else:
                        baselines = {a: Baseline(v) for a, v in rewound.items()}
                    await store.forget_above(conn, ancestor.number)
                    await store.insert_block(conn, ancestor)
                    await store.set_baselines(conn, {watched[a]: b for a, b in baselines.items() if a in watched})
                    await store.set_head(conn, ancestor.number, ancestor.hash)
                    version = await conn.fetchval("SELECT version FROM head")
                return {
                    "chain": chain_id,
                    "from": height,
                    "previousHead": head.number,
                    "head": ancestor.number,
                    "headHash": ancestor.hash,
                    "version": version,
                    "blocks": head.number - ancestor.number,
                    "balancesRewound": rewound is not None,
                }
        raise OpsError(f"the {chain_id} watcher kept moving; try again")
    except RpcFailure as exc:
        raise OpsError(f"{chain_id} node: {exc}") from None
    finally:
        await rpc.close()


@app.command("rescan")
def rescan_chain(
    chain: Annotated[str, typer.Argument(help="Registry id of the chain, e.g. ETH")],
    from_height: Annotated[int, typer.Option("--from", help="First block to scan again")],
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make CHAIN's watcher scan again from block --from (deposits it publishes again are harmless)."""
    result = run(_rescan(Config(endpoints), chain, from_height))
    if as_json:
        print_json(result)
        return
    note = "" if result["balancesRewound"] else " (the node no longer serves that state: balances re-measured)"
    console().print(
        f"{result['chain']} watcher rewound from block {result['previousHead']} to {result['head']}; "
        f"it scans {result['blocks']} block(s) again from {result['from']}{note}"
    )
