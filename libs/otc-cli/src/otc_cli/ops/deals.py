"""`otc deals`: the deals in the engine's database, read-only."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from otc_cli.ops.common import (
    Amounts,
    Config,
    EndpointsOption,
    JsonOption,
    LimitOption,
    OpsError,
    amount_text,
    console,
    database,
    print_json,
    run,
    short,
    when,
)

app = typer.Typer(no_args_is_help=True, help="Deals in the engine's database (read-only).")

STAGES = ("CREATED", "COLLECTION", "WAITING", "SWAP", "REVERTED", "CLOSED")


def _stage(value: str | None) -> str | None:
    if value is None:
        return None
    if value.upper() not in STAGES:
        raise typer.BadParameter(f"{value!r} is not a stage; choose from {', '.join(STAGES)}", param_hint="--stage")
    return value.upper()


LIST_SQL = """
SELECT d.deal_id, d.name, d.stage, d.outcome, d.created_at, d.updated_at, d.expires_at, d.closed_at,
       a.chain AS a_chain, a.asset AS a_asset, a.amount AS a_amount,
       b.chain AS b_chain, b.asset AS b_asset, b.amount AS b_amount
FROM deals d
JOIN deal_sides a ON a.deal_id = d.deal_id AND a.party = 'ALICE'
JOIN deal_sides b ON b.deal_id = d.deal_id AND b.party = 'BOB'
WHERE ($1::text IS NULL OR d.stage = $1)
ORDER BY d.created_at DESC, d.deal_id
LIMIT $2
"""


async def _list(config: Config, stage: str | None, limit: int) -> list[dict[str, Any]]:
    amounts = Amounts(config.registry_or_none())
    async with database(config, "engine", "engine") as conn:
        rows = await conn.fetch(LIST_SQL, stage, limit)
    return [
        {
            "dealId": r["deal_id"],
            "name": r["name"],
            "stage": r["stage"],
            "outcome": r["outcome"],
            "createdAt": r["created_at"],
            "updatedAt": r["updated_at"],
            "expiresAt": r["expires_at"],
            "closedAt": r["closed_at"],
            "alice": {"chain": r["a_chain"], **(amounts.value(r["a_chain"], r["a_asset"], r["a_amount"]) or {})},
            "bob": {"chain": r["b_chain"], **(amounts.value(r["b_chain"], r["b_asset"], r["b_amount"]) or {})},
        }
        for r in rows
    ]


@app.command("list")
def list_deals(
    stage: Annotated[
        str | None, typer.Option("--stage", help=f"Only deals in this stage ({', '.join(STAGES)})")
    ] = None,
    limit: LimitOption = 50,
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deals, newest first: stage, outcome and what each party sends."""
    rows = run(_list(Config(endpoints), _stage(stage), limit))
    if as_json:
        print_json(rows)
        return
    table = Table("DEAL", "STAGE", "OUTCOME", "ALICE SENDS", "BOB SENDS", "CREATED", "NAME", box=None)
    for r in rows:
        table.add_row(
            r["dealId"],
            r["stage"],
            r["outcome"] or "",
            f"{amount_text(r['alice'])} on {r['alice']['chain']}",
            f"{amount_text(r['bob'])} on {r['bob']['chain']}",
            when(r["createdAt"]),
            r["name"],
        )
    out = console()
    out.print(table)
    out.print(f"{len(rows)} deal(s)" + (f" in {stage.upper()}" if stage else ""))


async def _show(config: Config, deal_id: str) -> dict[str, Any]:
    amounts = Amounts(config.registry_or_none())
    async with database(config, "engine", "engine") as conn:
        deal = await conn.fetchrow("SELECT * FROM deals WHERE deal_id = $1", deal_id)
        if deal is None:
            raise OpsError(f"no deal with id {deal_id!r}")
        sides = await conn.fetch("SELECT * FROM deal_sides WHERE deal_id = $1 ORDER BY party", deal_id)
        deposits = await conn.fetch(
            "SELECT * FROM deposits WHERE deal_id = $1 ORDER BY block_number NULLS LAST, first_seen", deal_id
        )
        transfers = await conn.fetch(
            "SELECT * FROM transfers WHERE deal_id = $1 ORDER BY created_at, phase, transfer_id", deal_id
        )
        events = await conn.fetch("SELECT type, detail, at FROM deal_events WHERE deal_id = $1 ORDER BY id", deal_id)
        halted = {r["chain"] for r in await conn.fetch("SELECT chain FROM chain_halts")}
    side_assets = {s["party"]: s["asset"] for s in sides}
    return {
        "dealId": deal["deal_id"],
        "name": deal["name"],
        "stage": deal["stage"],
        "outcome": deal["outcome"],
        "timeoutSeconds": deal["timeout_seconds"],
        "expiresAt": deal["expires_at"],
        "remainingMs": deal["remaining_ms"],
        "cancelled": deal["cancelled"],
        "createdAt": deal["created_at"],
        "updatedAt": deal["updated_at"],
        "closedAt": deal["closed_at"],
        "unwatched": deal["unwatched"],
        "sides": [
            {
                "party": s["party"],
                "chain": s["chain"],
                "asset": s["asset"],
                "amount": amounts.value(s["chain"], s["asset"], s["amount"]),
                "commission": amounts.value(s["chain"], s["asset"], s["commission"]),
                "feeReserve": amounts.value(s["chain"], s["asset"], s["fee_reserve"]),
                "escrowAddress": s["escrow_address"],
                "escrowIndex": s["escrow_index"],
                "paybackAddress": s["payback_address"],
                "recipientAddress": s["recipient_address"],
                "filledAt": s["filled_at"],
                "fundedAt": s["funded_at"],
                "chainHalted": s["chain"] in halted,
            }
            for s in sides
        ],
        "deposits": [
            {
                "party": d["party"],
                "chain": d["chain"],
                "asset": d["asset"],
                "amount": amounts.value(d["chain"], d["asset"], d["amount"]),
                "txid": d["txid"],
                "index": d["idx"],
                "blockNumber": d["block_number"],
                "blockHash": d["block_hash"],
                "firstSeen": d["first_seen"],
                # Only the side's own asset counts; native coin in a token escrow is the tank's gas.
                "counted": d["asset"] == side_assets.get(d["party"]),
            }
            for d in deposits
        ],
        "transfers": [
            {
                "transferId": t["transfer_id"],
                "party": t["party"],
                "purpose": t["purpose"],
                "chain": t["chain"],
                "asset": t["asset"],
                "amount": amounts.value(t["chain"], t["asset"], t["amount"]),
                "to": t["to_address"],
                "feeFromAmount": t["fee_from_amount"],
                "phase": t["phase"],
                "status": t["status"],
                "txid": t["txid"],
                "confirmations": t["confirmations"],
                "amountSent": None if t["amount_sent"] is None else str(int(t["amount_sent"])),
                "feePaid": None if t["fee_paid"] is None else str(int(t["fee_paid"])),
                "reason": t["reason"],
            }
            for t in transfers
        ],
        "events": [{"at": e["at"], "type": e["type"], "detail": json.loads(e["detail"])} for e in events],
    }


@app.command("show")
def show_deal(
    deal_id: Annotated[str, typer.Argument(help="The deal's id")],
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """One deal: its stage, both sides, the deposits seen, the transfer plan and the audit trail."""
    deal = run(_show(Config(endpoints), deal_id))
    if as_json:
        print_json(deal)
        return
    out = console()
    out.print(f"[bold]{deal['dealId']}[/]  {deal['name']}")
    outcome = f" ({deal['outcome']})" if deal["outcome"] else ""
    out.print(f"stage {deal['stage']}{outcome}   created {when(deal['createdAt'])}", end="")
    if deal["expiresAt"] and deal["stage"] == "COLLECTION":
        out.print(f"   deadline {when(deal['expiresAt'])}", end="")
    if deal["closedAt"]:
        out.print(f"   closed {when(deal['closedAt'])}", end="")
    out.print()

    sides = Table("PARTY", "SENDS", "COMMISSION", "FEE RESERVE", "ESCROW", "PAYBACK", "RECIPIENT", "FUNDED", box=None)
    for s in deal["sides"]:
        chain = s["chain"] + (" [red](halted)[/]" if s["chainHalted"] else "")
        sides.add_row(
            s["party"],
            f"{amount_text(s['amount'])} on {chain}",
            amount_text(s["commission"]),
            amount_text(s["feeReserve"]),
            s["escrowAddress"],
            s["paybackAddress"] or "-",
            s["recipientAddress"] or "-",
            when(s["fundedAt"]) or "no",
        )
    out.print(sides)

    out.print("\n[bold]deposits[/]")
    deposits = Table("PARTY", "AMOUNT", "CHAIN", "TX", "BLOCK", "", box=None)
    for d in deal["deposits"]:
        block = str(d["blockNumber"]) if d["blockNumber"] is not None else "unmined"
        note = "" if d["counted"] else "not counted (gas or another asset)"
        deposits.add_row(d["party"], amount_text(d["amount"]), d["chain"], f"{d['txid']}:{d['index']}", block, note)
    out.print(deposits if deal["deposits"] else "  none")

    out.print("\n[bold]transfers[/]")
    transfers = Table("TRANSFER", "PURPOSE", "AMOUNT", "CHAIN", "TO", "STATUS", "TX", "CONF", box=None)
    for t in deal["transfers"]:
        transfers.add_row(
            t["transferId"],
            t["purpose"],
            amount_text(t["amount"]),
            t["chain"],
            t["to"],
            t["status"] + (f" ({t['reason']})" if t["reason"] else ""),
            short(t["txid"]),
            str(t["confirmations"]),
        )
    out.print(transfers if deal["transfers"] else "  none")

    out.print("\n[bold]events[/]")
    events = Table("AT", "EVENT", "DETAIL", box=None)
    for e in deal["events"]:
        detail = " ".join(f"{k}={v}" for k, v in e["detail"].items()) if isinstance(e["detail"], dict) else ""
        events.add_row(when(e["at"]), e["type"], detail)
    out.print(events)
