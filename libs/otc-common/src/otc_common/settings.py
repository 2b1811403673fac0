"""Typed settings from environment variables.

A field `foo_bar` of a settings struct is read from `OTC_FOO_BAR`. A missing or
malformed variable stops the service with one line naming it (and never echoing
its value, which may be a secret).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Annotated, Any, NoReturn, TypeVar

import msgspec

PREFIX = "OTC_"


class ConfigError(Exception):
    pass


class BaseSettings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: Annotated[str, msgspec.Meta(description="PostgreSQL URL (postgresql://user:pass@host:port/db)")]
    nats_url: Annotated[str, msgspec.Meta(description="NATS URL(s), comma-separated (nats://host:4222)")]
    registry_file: Annotated[str, msgspec.Meta(description="path of the chain and asset registry TOML file")]
    http_host: Annotated[str, msgspec.Meta(description="address the health/metrics server binds")] = "0.0.0.0"  # noqa: S104
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535, description="port of /healthz, /readyz, /metrics")] = 8081
    log_level: Annotated[str, msgspec.Meta(pattern="^(DEBUG|INFO|WARNING|ERROR)$")] = "INFO"
    db_pool_size: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    drain_seconds: Annotated[int, msgspec.Meta(ge=0, le=600, description="grace period on SIGTERM")] = 20


S = TypeVar("S", bound=BaseSettings)


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def _describe(field_type: Any) -> str:
    description = ""
    for meta in getattr(field_type, "__metadata__", ()):
        if isinstance(meta, msgspec.Meta) and meta.description:
            description = meta.description
    return description


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    hints = msgspec.structs.fields(cls)
    for field in hints:
        name = env_name(field.name)
        raw = environ.get(name)
        if raw is None or raw == "":
            if field.required:
                hint = _describe(field.type)
                raise ConfigError(f"{name} is required" + (f": {hint}" if hint else ""))
            continue
        try:
            values[field.name] = msgspec.convert(raw, field.type, strict=False)
        except msgspec.ValidationError as exc:
            reason = str(exc).split(" - at ")[0]
            raise ConfigError(f"{name} is malformed: {reason}") from None
    return msgspec.convert(values, cls)


def settings_or_exit(cls: type[S]) -> S:
    try:
        return load_settings(cls)
    except ConfigError as exc:
        config_exit(str(exc))


def config_exit(line: str) -> NoReturn:
    print(f"config error: {line}", file=sys.stderr)
    raise SystemExit(2)


def read_secret(value: str | None, file_path: str | None, variable: str) -> str:
    """A secret given inline or, preferably, as a mounted file."""
    if file_path:
        try:
            with open(file_path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"{variable}_FILE cannot be read: {exc.strerror}") from None
    if value:
        return value.strip()
    raise ConfigError(f"{variable} or {variable}_FILE is required")
