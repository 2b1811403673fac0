"""What the operator commands share: where the system is, how to reach it, how to print and fail.

Configuration comes from the same environment as the services (`OTC_DATABASE_URL`, `OTC_NATS_URL`,
`OTC_REGISTRY_FILE`); where one is unset, the dev stack's `endpoints.json` (and the `registry.toml`
beside it) fills it in. URLs are never printed: they may carry passwords or API keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    import asyncpg

    from otc_common.registry import Registry

T = TypeVar("T")

EndpointsOption = Annotated[
    Path | None,
    typer.Option(
        "--endpoints",
        help="A dev stack's endpoints.json, for whatever OTC_DATABASE_URL, OTC_NATS_URL and OTC_REGISTRY_FILE "
        "leave unset \\[default: .otc/dev/endpoints.json]",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, max=10_000, help="At most this many rows, newest first")]


class OpsError(Exception):
    """An expected failure: printed as one line, exit code 1 (2 for configuration)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def console() -> Console:
    # Piped output keeps whole lines (ids, addresses, hashes) instead of wrapping them at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 250, highlight=False)


def fail(message: str, exit_code: int = 1) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(exit_code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except OpsError as exc:
        fail(exc.message, exc.exit_code)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=_json_default, ensure_ascii=False))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    return str(value)


def when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def short(text: str | None, keep: int = 10) -> str:
    """A long hash or id cut in the middle, for tables; JSON output keeps it whole."""
    if not text:
        return ""
    return text if len(text) <= 2 * keep + 1 else f"{text[:keep]}…{text[-keep:]}"


class Config:
    def __init__(self, endpoints: Path | None, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.endpoints_path = endpoints
        self._endpoints: dict[str, Any] | None = None
        self._registry: Registry | None = None

    def _endpoints_file(self) -> Path:
        if self.endpoints_path is not None:
            return self.endpoints_path
        from otc_cli.devstack import default_data_dir

        return default_data_dir() / "endpoints.json"

    def _from_endpoints(self, variable: str) -> dict[str, Any]:
        if self._endpoints is None:
            path = self._endpoints_file()
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise OpsError(
                    f"{variable} is not set and there is no {path} (set {variable}, or run `otc dev up`)", 2
                ) from None
            except (OSError, ValueError) as exc:
                raise OpsError(f"{path} cannot be read: {exc}", 2) from None
            if not isinstance(loaded, dict):
                raise OpsError(f"{path} is not an endpoints file", 2)
            self._endpoints = loaded
        return self._endpoints

    def _value(self, variable: str, key: str) -> str:
        value = self.environ.get(variable, "").strip()
        if value:
            return value
        found = self._from_endpoints(variable).get(key)
        if not isinstance(found, str) or not found:
            raise OpsError(f"{variable} is not set and {self._endpoints_file()} has no {key!r}", 2)
        return found

    @property
    def database_url(self) -> str:
        return self._value("OTC_DATABASE_URL", "database")

    @property
    def nats_url(self) -> str:
        return self._value("OTC_NATS_URL", "nats")

    @property
    def registry_file(self) -> str:
        value = self.environ.get("OTC_REGISTRY_FILE", "").strip()
        if value:
            return value
        self._from_endpoints("OTC_REGISTRY_FILE")
        return str(self._endpoints_file().parent / "registry.toml")

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from otc_common.registry import load_registry
            from otc_common.settings import ConfigError

            try:
                self._registry = load_registry(self.registry_file, self.environ)
            except ConfigError as exc:
                raise OpsError(str(exc), 2) from None
        return self._registry

    def registry_or_none(self) -> Registry | None:
        try:
            return self.registry
        except OpsError:
            return None


@contextlib.asynccontextmanager
async def database(config: Config, schema: str, owner: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A connection with `schema` on its search path; `owner` names the service in errors."""
    import asyncpg

    url = config.database_url
    try:
        conn = await asyncpg.connect(url, server_settings={"search_path": schema}, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise OpsError(f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from None
    try:
        yield conn
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        raise OpsError(
            f"the database has no {owner} tables (schema {schema!r}): has the {owner} ever run against it?"
        ) from None
    finally:
        await conn.close()


class Amounts:
    """Base units shown in the asset's own units, where the registry knows the asset."""

    def __init__(self, registry: Registry | None) -> None:
        self.registry = registry

    def decimals(self, chain: str, asset: str) -> int | None:
        if self.registry is None or chain not in self.registry.chains:
            return None
        found = self.registry.chains[chain].assets.get(asset)
        return None if found is None else found.decimals

    def value(self, chain: str, asset: str, amount: Any) -> dict[str, str] | None:
        """For JSON: the decimal text and the exact base units, both as strings."""
        if amount is None:
            return None
        from otc_common.money import format_amount

        decimals = self.decimals(chain, asset)
        units = int(amount)
        return {
            "amount": format_amount(units, decimals) if decimals is not None else "",
            "baseUnits": str(units),
            "asset": asset,
        }


def amount_text(value: dict[str, str] | None) -> str:
    """An `Amounts.value` for a table: the asset's own units, or base units where they are unknown."""
    if not value:
        return "-"
    if value["amount"]:
        return f"{value['amount']} {value['asset']}"
    return f"{value['baseUnits']} (base units) {value['asset']}"
