"""`otc queue`: the queue processor's transfers and their signed transactions.

`retry` re-broadcasts the signed bytes the queue stored, exactly as stored, and nothing else: it
holds no key and never signs, so it cannot pay anything the queue did not already sign once.
"""

from __future__ import annotations

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
    fail,
    print_json,
    run,
    short,
    when,
)

app = typer.Typer(no_args_is_help=True, help="Payout transfers in the queue processor's database.")

STATUSES = ("QUEUED", "SIGNED", "CONFIRMED", "FAILED")


def _status(value: str | None) -> str | None:
    if value is None:
        return None
    if value.upper() not in STATUSES:
        raise typer.BadParameter(f"{value!r} is not a status; choose from {', '.join(STATUSES)}", param_hint="--status")
    return value.upper()


def _transfer_view(row: Any, amounts: Amounts) -> dict[str, Any]:
    return {
        "transferId": row["transfer_id"],
        "dealId": row["deal_id"],
        "chain": row["chain"],
        "purpose": row["purpose"],
        "amount": amounts.value(row["chain"], row["asset"], row["amount"]),
        "escrow": row["escrow_address"],
        "to": row["to_address"],
        "feeFromAmount": row["fee_from_amount"],
        "phase": row["phase"],
        "status": row["status"],
        "reason": row["reason"],
        "nonce": row["nonce"],
        "txid": row["txid"],
        "blockNumber": row["block_number"],
        "confirmations": row["confirmations"],
        "amountSent": None if row["amount_sent"] is None else str(int(row["amount_sent"])),
        "feePaid": None if row["fee_paid"] is None else str(int(row["fee_paid"])),
        "commandedAt": row["commanded_at"],
        "receivedAt": row["received_at"],
        "signedAt": row["signed_at"],
        "finishedAt": row["finished_at"],
    }


async def _list(config: Config, status: str | None, chain: str | None, limit: int) -> list[dict[str, Any]]:
    amounts = Amounts(config.registry_or_none())
    async with database(config, "queue", "queue processor") as conn:
        rows = await conn.fetch(
            """SELECT * FROM transfers WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR chain = $2)
               ORDER BY received_at DESC, transfer_id LIMIT $3""",
            status,
            chain,
            limit,
        )
    return [_transfer_view(row, amounts) for row in rows]


@app.command("list")
def list_transfers(
    status: Annotated[
        str | None, typer.Option("--status", help=f"Only transfers in this status ({', '.join(STATUSES)})")
    ] = None,
    chain: Annotated[str | None, typer.Option("--chain", help="Only transfers on this chain (registry id)")] = None,
    limit: LimitOption = 100,
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Transfers the queue received, newest first."""
    rows = run(_list(Config(endpoints), _status(status), chain, limit))
    if as_json:
        print_json(rows)
        return
    table = Table("TRANSFER", "CHAIN", "PURPOSE", "AMOUNT", "STATUS", "NONCE", "TX", "CONF", "RECEIVED", box=None)
    for r in rows:
        table.add_row(
            r["transferId"],
            r["chain"],
            r["purpose"],
            amount_text(r["amount"]),
            r["status"] + (f" ({r['reason']})" if r["reason"] else ""),
            "" if r["nonce"] is None else str(r["nonce"]),
            short(r["txid"]),
            str(r["confirmations"]),
            when(r["receivedAt"]),
        )
    out = console()
    out.print(table)
    out.print(f"{len(rows)} transfer(s)")


async def _load(config: Config, transfer_id: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[bytes]]:
    """The transfer, its candidates (EVM: one nonce; UTXO: one leg per escrow output) and their raw bytes."""
    from otc_common.registry import ChainKind

    registry = config.registry_or_none()
    amounts = Amounts(registry)
    async with database(config, "queue", "queue processor") as conn:
        row = await conn.fetchrow("SELECT * FROM transfers WHERE transfer_id = $1", transfer_id)
        if row is None:
            raise OpsError(f"no transfer with id {transfer_id!r} in the queue")
        chain = registry.chains.get(row["chain"]) if registry is not None else None
        utxo = chain is not None and chain.kind is ChainKind.UTXO
        if utxo:
            found = await conn.fetch(
                "SELECT * FROM utxo_candidates WHERE transfer_id = $1 ORDER BY leg, seq", transfer_id
            )
        else:
            found = await conn.fetch("SELECT * FROM candidates WHERE transfer_id = $1 ORDER BY seq", transfer_id)
    views = []
    for c in found:
        view: dict[str, Any] = {
            "leg": c["leg"] if utxo else 0,
            "seq": c["seq"],
            "txid": c["txid"],
            "signedAt": c["signed_at"],
            "minedBlock": c["mined_block"],
            "minedHash": c["mined_hash"],
            "rawBytes": len(bytes(c["raw"])),
        }
        if utxo:
            view.update(fee=str(int(c["fee"])), vsize=c["vsize"], change=str(int(c["change"])))
        else:
            view.update(
                value=str(int(c["value"])),
                gasLimit=c["gas_limit"],
                maxFee=str(int(c["max_fee"])),
                priorityFee=str(int(c["priority_fee"])),
            )
        views.append(view)
    return _transfer_view(row, amounts), views, [bytes(c["raw"]) for c in found]


def _fees(candidate: dict[str, Any]) -> str:
    if "maxFee" in candidate:
        return f"max {candidate['maxFee']} / tip {candidate['priorityFee']} per gas, gas {candidate['gasLimit']}"
    return f"{candidate['fee']} ({candidate['vsize']} vB)"


@app.command("show")
def show_transfer(
    transfer_id: Annotated[str, typer.Argument(help="The transfer's id (as in `otc queue list`)")],
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """One transfer: its status and nonce, and every signed candidate (the first and each fee bump;
    for UTXO, per leg: each escrow output the transfer spends)."""
    transfer, candidates, _ = run(_load(Config(endpoints), transfer_id))
    if as_json:
        print_json({**transfer, "candidates": candidates})
        return
    out = console()
    out.print(f"[bold]{transfer['transferId']}[/]  deal {transfer['dealId']}")
    for label, key in (
        ("status", "status"),
        ("chain", "chain"),
        ("purpose", "purpose"),
        ("from escrow", "escrow"),
        ("to", "to"),
        ("nonce", "nonce"),
        ("mined tx", "txid"),
        ("block", "blockNumber"),
        ("confirmations", "confirmations"),
        ("reason", "reason"),
    ):
        if transfer[key] is not None:
            out.print(f"  {label:<14}{transfer[key]}")
    out.print(
        f"  {'amount':<14}{amount_text(transfer['amount'])}"
        + (" (fee from amount)" if transfer["feeFromAmount"] else "")
    )
    out.print(f"  {'received':<14}{when(transfer['receivedAt'])}   signed {when(transfer['signedAt']) or '-'}")
    table = Table("LEG", "SEQ", "TXID", "FEE", "SIGNED", "MINED IN", box=None)
    for c in candidates:
        table.add_row(
            str(c["leg"]),
            str(c["seq"]),
            c["txid"],
            _fees(c),
            when(c["signedAt"]),
            str(c["minedBlock"]) if c["minedBlock"] is not None else "not mined",
        )
    out.print("\n[bold]candidates[/]")
    out.print(table if candidates else "  none (not signed yet)")


# --------------------------------------------------------------------------- retry


def classify(message: str) -> tuple[str, bool]:
    """A node's refusal in plain words, and whether it still means the bytes are where they should be."""
    text = message.lower()
    if any(s in text for s in ("already known", "already imported", "known transaction", "already in", "txn-already")):
        return "already known to the node", True
    if "nonce too low" in text or "nonce is too low" in text or "oldnonce" in text:
        return "its nonce is used: a candidate (or another transaction) was mined", True
    if "missing inputs" in text or "missingorspent" in text or "inputs-missingorspent" in text:
        return "its inputs are spent: a candidate (or another transaction) was mined", True
    return f"refused: {message}", False


async def _broadcast(config: Config, chain_id: str, raw: bytes) -> tuple[str | None, str | None]:
    """(the txid the node answered, None) or (None, the node's refusal)."""
    import httpx

    from otc_cli.ops.nodes import NodeRefused, electrum_call, evm_call
    from otc_common.registry import ChainKind

    chain = config.registry.chains.get(chain_id)
    if chain is None:
        raise OpsError(f"chain {chain_id} is not in the registry")
    try:
        if chain.kind is ChainKind.EVM:
            async with httpx.AsyncClient(timeout=15) as client:
                answer = await evm_call(client, chain, "eth_sendRawTransaction", ["0x" + raw.hex()])
        else:
            answer = await electrum_call(chain, "blockchain.transaction.broadcast", raw.hex())
    except NodeRefused as exc:
        return None, exc.message
    return str(answer), None


async def _retry(config: Config, transfer_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per nonce (EVM) or leg (UTXO): the newest unmined candidate first; once the node has it, the
    older ones it replaced are not sent (the node would refuse them as underpriced)."""
    transfer, candidates, raws = await _load(config, transfer_id)
    status = transfer["status"]
    if status == "QUEUED":
        raise OpsError(f"{transfer_id} is not signed yet: there are no stored bytes to broadcast")
    if status == "FAILED":
        raise OpsError(f"{transfer_id} FAILED ({transfer['reason']}): nothing is re-broadcast for it")
    results: list[dict[str, Any]] = []
    if status != "SIGNED":
        return transfer, results
    legs: dict[int, list[tuple[dict[str, Any], bytes]]] = {}
    for candidate, raw in zip(candidates, raws, strict=True):
        legs.setdefault(candidate["leg"], []).append((candidate, raw))
    for leg in sorted(legs):
        newest_first = sorted(legs[leg], key=lambda item: -int(item[0]["seq"]))
        mined = next((c for c, _ in newest_first if c["minedBlock"] is not None), None)
        if mined is not None:
            results.append({**_brief(mined), "outcome": f"mined in block {mined['minedBlock']}", "ok": True})
            continue
        sent: dict[str, Any] | None = None
        for candidate, raw in newest_first:
            if sent is not None:
                outcome = f"replaced by candidate {sent['seq']}; not sent"
                results.append({**_brief(candidate), "outcome": outcome, "ok": True})
                continue
            answered, refused = await _broadcast(config, transfer["chain"], raw)
            if refused is None:
                same = answered is not None and answered.lower() == candidate["txid"].lower()
                outcome, ok = ("accepted", True) if same else (f"accepted, but the node named it {answered}", False)
            else:
                outcome, ok = classify(refused)
            results.append({**_brief(candidate), "outcome": outcome, "ok": ok})
            if ok:
                sent = candidate
    return transfer, results


def _brief(candidate: dict[str, Any]) -> dict[str, Any]:
    return {"leg": candidate["leg"], "seq": candidate["seq"], "txid": candidate["txid"]}


@app.command("retry")
def retry_transfer(
    transfer_id: Annotated[str, typer.Argument(help="The transfer's id (as in `otc queue list`)")],
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-broadcast the stored signed bytes of a transfer's unmined candidates, newest first. Never signs."""
    transfer, results = run(_retry(Config(endpoints), transfer_id))
    if as_json:
        print_json({"transferId": transfer_id, "status": transfer["status"], "broadcasts": results})
    else:
        out = console()
        if transfer["status"] == "CONFIRMED":
            out.print(f"{transfer_id} is already CONFIRMED (tx {transfer['txid']}); nothing to re-broadcast")
        for r in results:
            out.print(f"leg {r['leg']} candidate {r['seq']}  {r['txid']}  {r['outcome']}")
    if any(not r["ok"] for r in results):
        fail("the node refused a stored candidate; see above")
