"""Operator commands of `otc`: read the services' state, and act only through the paths the services
themselves provide (the engine's admin API, the queue's stored signed bytes, the watcher's state)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from otc_cli.ops import chain, deals, events, queue, tank, webhooks

    app.add_typer(deals.app, name="deals")
    app.add_typer(queue.app, name="queue")
    app.add_typer(tank.app, name="tank")
    app.add_typer(chain.app, name="chain")
    app.add_typer(events.app, name="events")
    app.add_typer(webhooks.app, name="webhooks")
