"""`otc webhooks`: deliveries of deal events to the operator's webhook URLs, and redelivery."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from otc_cli.ops.common import (
    Config,
    EndpointsOption,
    JsonOption,
    LimitOption,
    OpsError,
    console,
    database,
    print_json,
    run,
    when,
)

app = typer.Typer(no_args_is_help=True, help="Webhook deliveries of deal events.")

STATUSES = ("PENDING", "DELIVERED", "FAILED")


def _public(delivery: dict[str, Any]) -> dict[str, Any]:
    from otc_engine.notify.rules import safe_url

    # Receivers often keep their own secret in the path or query: show only where it goes.
    return {**delivery, "url": safe_url(delivery["url"])}


async def _list(config: Config, status: str | None, deal: str | None, limit: int) -> list[dict[str, Any]]:
    from otc_engine import notify

    async with database(config, "engine", "engine") as conn:
        found = await notify.list_deliveries(conn, status=status, deal_id=deal, limit=limit)
    return [_public(notify.as_dict(d)) for d in found]


@app.command("list")
def list_deliveries(
    status: Annotated[
        str | None, typer.Option("--status", help=f"Only deliveries in this status ({', '.join(STATUSES)})")
    ] = None,
    deal: Annotated[str | None, typer.Option("--deal", help="Only deliveries of this deal's events")] = None,
    limit: LimitOption = 50,
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deliveries, newest first, with their attempts."""
    if status is not None and status.upper() not in STATUSES:
        raise typer.BadParameter(
            f"{status!r} is not a status; choose from {', '.join(STATUSES)}", param_hint="--status"
        )
    rows = run(_list(Config(endpoints), status.upper() if status else None, deal, limit))
    if as_json:
        print_json(rows)
        return
    table = Table("ID", "EVENT", "DEAL", "TO", "STATUS", "ATTEMPTS", "LAST", "NEXT ATTEMPT", box=None)
    for d in rows:
        last = "" if d["last_status"] is None else str(d["last_status"])
        if d["last_error"]:
            last = (last + " " + d["last_error"]).strip()
        table.add_row(
            str(d["id"]),
            d["event_type"],
            d["deal_id"] or "",
            d["url"],
            d["status"],
            str(d["attempts"]),
            last,
            when(_parse(d["next_attempt_at"])) if d["status"] == "PENDING" else "",
        )
    out = console()
    out.print(table)
    out.print(f"{len(rows)} deliver(y/ies)")


def _parse(value: Any) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value) if isinstance(value, str) else value


async def _redeliver(config: Config, delivery_id: int) -> dict[str, Any]:
    from otc_engine import notify

    async with database(config, "engine", "engine") as conn:
        found = await notify.redeliver(conn, delivery_id)
    if found is None:
        raise OpsError(f"no webhook delivery with id {delivery_id}")
    return _public(notify.as_dict(found))


@app.command("redeliver")
def redeliver(
    delivery_id: Annotated[int, typer.Argument(help="The delivery's id (as in `otc webhooks list`)")],
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a delivery again, whatever its state, with a fresh round of retries (the same signed bytes)."""
    delivery = run(_redeliver(Config(endpoints), delivery_id))
    if as_json:
        print_json(delivery)
        return
    console().print(
        f"delivery {delivery['id']} ({delivery['event_type']} to {delivery['url']}) is {delivery['status']}: "
        "the engine sends it again shortly"
    )
