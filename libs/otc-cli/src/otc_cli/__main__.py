"""The `otc` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from otc_cli.ops import register as register_ops

app = typer.Typer(no_args_is_help=True, add_completion=False, help="otc-broker operator and developer tools.")
dev_app = typer.Typer(no_args_is_help=True, help="The local dev stack (NATS, PostgreSQL, two anvils, services).")
app.add_typer(dev_app, name="dev")
register_ops(app)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the stack keeps its data [default: .otc/dev in the repository root]",
        show_default=False,
    ),
]


def _data_dir(given: Path | None) -> Path:
    from otc_cli.devstack import default_data_dir

    return given if given is not None else default_data_dir()


@dev_app.command("up")
def dev_up(
    data_dir: DataDir = None,
    services: Annotated[bool, typer.Option("--services/--no-services", help="Also run the six broker services")] = True,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Once ready, run a demo deal ETH ⇄ USDT on POLYGON and print its stages"),
    ] = False,
) -> None:
    """Start the stack in the foreground; Ctrl-C stops it and keeps its data."""
    from otc_cli.devstack import up

    if demo and not services:
        raise typer.BadParameter("--demo needs the services", param_hint="--demo")
    up(_data_dir(data_dir), with_services=services, demo=demo)


@dev_app.command("env")
def dev_env(data_dir: DataDir = None) -> None:
    """Print `export OTC_...` lines for running a service by hand against the stack."""
    from otc_cli.devstack import env_lines

    for line in env_lines(_data_dir(data_dir)):
        typer.echo(line)


@dev_app.command("reset")
def dev_reset(
    data_dir: DataDir = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
) -> None:
    """Delete the stack's data (chains, database, seed, logs)."""
    from otc_cli.devstack import reset

    target = _data_dir(data_dir).resolve()
    if not target.exists():
        typer.echo(f"nothing to delete: {target} does not exist")
        return
    if not yes:
        typer.confirm(f"Delete {target} (chains, database, dev seed, logs)?", abort=True)
    reset(target)
    typer.echo(f"deleted {target}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
