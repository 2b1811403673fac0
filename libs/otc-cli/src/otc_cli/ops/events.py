"""`otc events tail`: bus events as they happen, one line each, from ephemeral ordered consumers.

Nothing durable is created: the consumers vanish when the command stops, and reading never
acknowledges or takes anything away from the services' own consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from datetime import UTC
from typing import Annotated, Any

import typer

from otc_cli.ops.common import Config, EndpointsOption, JsonOption, OpsError, run

app = typer.Typer(no_args_is_help=True, help="Events on the bus.")

STREAMS = ("DEALS", "CHAIN", "QUEUE", "TANK", "ALERTS")
#: Chain events name escrows and transactions, not deals, so a deal filter leaves them out.
DEAL_STREAMS = ("DEALS", "QUEUE", "TANK", "ALERTS")


def _streams(values: list[str], deal: str | None) -> list[str]:
    chosen = [v.upper() for v in values] or list(DEAL_STREAMS if deal else STREAMS)
    for name in chosen:
        if name not in STREAMS:
            raise typer.BadParameter(
                f"{name!r} is not a stream; choose from {', '.join(STREAMS)}", param_hint="--stream"
            )
    return list(dict.fromkeys(chosen))


def _value(value: Any) -> str | None:
    if value is None or value == "" or isinstance(value, list):
        return None
    if isinstance(value, dict):
        if {"chain", "asset", "amount"} <= value.keys():
            return f"{value['amount']}{value['asset']}@{value['chain']}"
        return None
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def key_fields(payload: dict[str, Any]) -> str:
    """The payload's scalar fields in their own order (lists and nested objects left out)."""
    parts = []
    for key, value in payload.items():
        shown = _value(value)
        if shown is not None:
            parts.append(f"{key}={shown}")
    return " ".join(parts)


def line(stream: str, envelope: Any, payload: dict[str, Any]) -> str:
    at = envelope.occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return f"{at}  {stream:<6} {envelope.type:<22} {key_fields(payload)}"


async def _tail(
    config: Config,
    streams: list[str],
    deal: str | None,
    count: int | None,
    seconds: float | None,
    from_start: bool,
    as_json: bool,
) -> int:
    import msgspec
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.msg import Msg
    from nats.js.api import DeliverPolicy

    from otc_common import subjects
    from otc_common.messages import Envelope

    try:
        nc = await nats.connect(
            servers=[s.strip() for s in config.nats_url.split(",") if s.strip()],
            name="otc-cli-tail",
            connect_timeout=3,
            max_reconnect_attempts=-1,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise OpsError(f"cannot connect to NATS: {type(exc).__name__}") from None
    js = nc.jetstream(timeout=5)
    inbox: asyncio.Queue[tuple[str, Msg]] = asyncio.Queue()
    specs = {spec.name: spec for spec in subjects.STREAMS}
    policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
    subscriptions = []
    shown = 0
    try:
        for name in streams:
            subject = subjects.deal(deal) if deal and name == "DEALS" else specs[name].subjects[0]

            async def deliver(msg: Msg, stream: str = name) -> None:
                inbox.put_nowait((stream, msg))

            try:
                subscriptions.append(
                    await js.subscribe(subject, stream=name, cb=deliver, ordered_consumer=True, deliver_policy=policy)
                )
            except nats.js.errors.NotFoundError:
                raise OpsError(f"there is no {name} stream on this NATS (has any service started?)") from None
            except (nats.errors.Error, TimeoutError) as exc:
                raise OpsError(f"cannot follow the {name} stream: {type(exc).__name__}: {exc}") from None
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while count is None or shown < count:
            wait = None if deadline is None else deadline - loop.time()
            if wait is not None and wait <= 0:
                break
            try:
                stream, msg = await asyncio.wait_for(inbox.get(), wait)
            except TimeoutError:
                break
            try:
                envelope = msgspec.json.decode(msg.data, type=Envelope)
                payload = msgspec.json.decode(envelope.payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                print(f"{stream:<6} undecodable message on {msg.subject}", flush=True)
                continue
            if not isinstance(payload, dict):
                payload = {}
            if deal and payload.get("deal_id") != deal:
                continue
            if as_json:
                record = {
                    "stream": stream,
                    "subject": msg.subject,
                    "eventId": envelope.event_id,
                    "type": envelope.type,
                    "occurredAt": envelope.occurred_at.isoformat(),
                    "payload": payload,
                }
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                print(line(stream, envelope, payload), flush=True)
            shown += 1
    finally:
        for sub in subscriptions:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await sub.unsubscribe()
        await nc.close()
    return shown


@app.command("tail")
def tail(
    stream: Annotated[
        list[str] | None,
        typer.Option("--stream", help=f"{' | '.join(STREAMS)}; repeat for several [default: all]", show_default=False),
    ] = None,
    deal: Annotated[str | None, typer.Option("--deal", help="Only events of this deal")] = None,
    from_start: Annotated[
        bool, typer.Option("--all", help="Start from the oldest event the stream keeps, not from now")
    ] = False,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Stop after this many events")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.1, help="Stop after this many seconds")] = None,
    endpoints: EndpointsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print events as they arrive: time, stream, type and the key fields. Ctrl-C stops.

    Each stream is read in order; with several, their lines interleave as they arrive.
    """
    chosen = _streams(stream or [], deal)
    try:
        run(_tail(Config(endpoints), chosen, deal, count, timeout, from_start, as_json))
    except KeyboardInterrupt:
        sys.stdout.flush()
