"""Settings of e-mail notifications and operator webhooks, and their checked, resolved form.

`EngineSettings` derives from `NotifySettings`, so these are read from the same environment
(`OTC_SMTP_HOST`, `OTC_WEBHOOK_URLS`, ...). Both features are off until configured.
"""

from __future__ import annotations

from email.headerregistry import Address
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from otc_common.settings import BaseSettings, ConfigError, read_secret


class NotifySettings(BaseSettings, frozen=True, kw_only=True):
    public_base_url: Annotated[
        str, msgspec.Meta(description="URL of the web pages; invitation links start with it")
    ] = "http://127.0.0.1:8080"
    smtp_host: Annotated[str, msgspec.Meta(description="SMTP server; empty turns e-mail off")] = ""
    smtp_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 587
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_password_file: str = ""
    smtp_from: Annotated[str, msgspec.Meta(description="sender address of every e-mail")] = ""
    smtp_starttls: Annotated[bool, msgspec.Meta(description="require STARTTLS before sending")] = True
    smtp_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=120)] = 20.0
    webhook_urls: Annotated[str, msgspec.Meta(description="operator webhook URLs, comma-separated; empty: none")] = ""
    webhook_secret: str = ""
    webhook_secret_file: str = ""
    webhook_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    notify_retry_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=3600, description="first retry delay of e-mails and webhooks; doubles each time")
    ] = 10.0
    notify_retry_max_seconds: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 3600.0
    notify_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 12


class SmtpConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int
    username: str
    password: str
    sender: str
    starttls: bool
    timeout_seconds: float

    def __repr__(self) -> str:
        # Keeps the password out of any log line or traceback that prints the config.
        return f"SmtpConfig(host={self.host!r}, port={self.port}, sender={self.sender!r})"


class WebhookConfig(msgspec.Struct, frozen=True, kw_only=True):
    urls: list[str]
    secret: bytes
    timeout_seconds: float

    def __repr__(self) -> str:
        return f"WebhookConfig(urls={len(self.urls)})"


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    first_seconds: float
    max_seconds: float
    max_attempts: int


class NotifyConfig(msgspec.Struct, frozen=True, kw_only=True):
    public_base_url: str
    smtp: SmtpConfig | None
    webhooks: WebhookConfig | None
    retry: RetryPolicy


def is_mailbox(value: str) -> bool:
    """A bare address the mail headers carry as it is (no display name, no quoting, no line breaks)."""
    if not value or any(ch.isspace() or ord(ch) < 32 for ch in value):
        return False
    try:
        address = Address(addr_spec=value)
    except (ValueError, IndexError):
        return False
    return address.addr_spec == value and "@" in value


def resolve(settings: NotifySettings) -> NotifyConfig:
    """Checks the settings together; raises ConfigError naming the variable, never echoing a secret."""
    base = settings.public_base_url.strip().rstrip("/")
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).netloc:
        raise ConfigError("OTC_PUBLIC_BASE_URL must be an http(s) URL")
    smtp = None
    if settings.smtp_host.strip():
        if not is_mailbox(settings.smtp_from.strip()):
            raise ConfigError("OTC_SMTP_FROM is required with OTC_SMTP_HOST: a plain address like otc@example.com")
        password = ""
        if settings.smtp_password or settings.smtp_password_file:
            password = read_secret(settings.smtp_password, settings.smtp_password_file, "OTC_SMTP_PASSWORD")
        if password and not settings.smtp_username:
            raise ConfigError("OTC_SMTP_USERNAME is required with OTC_SMTP_PASSWORD")
        smtp = SmtpConfig(
            host=settings.smtp_host.strip(),
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=password,
            sender=settings.smtp_from.strip(),
            starttls=settings.smtp_starttls,
            timeout_seconds=settings.smtp_timeout_seconds,
        )
    webhooks = None
    urls = [url.strip() for url in settings.webhook_urls.split(",") if url.strip()]
    if urls:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("OTC_WEBHOOK_URLS: every entry must be an http(s) URL")
        if len(set(urls)) != len(urls):
            raise ConfigError("OTC_WEBHOOK_URLS lists the same URL twice")
        # Unsigned deliveries would let anyone who can reach a receiver forge deal events.
        secret = read_secret(settings.webhook_secret, settings.webhook_secret_file, "OTC_WEBHOOK_SECRET")
        if len(secret) < 16:
            raise ConfigError("OTC_WEBHOOK_SECRET must be at least 16 characters")
        webhooks = WebhookConfig(urls=urls, secret=secret.encode(), timeout_seconds=settings.webhook_timeout_seconds)
    if settings.notify_retry_max_seconds < settings.notify_retry_seconds:
        raise ConfigError("OTC_NOTIFY_RETRY_MAX_SECONDS must not be below OTC_NOTIFY_RETRY_SECONDS")
    return NotifyConfig(
        public_base_url=base,
        smtp=smtp,
        webhooks=webhooks,
        retry=RetryPolicy(
            first_seconds=settings.notify_retry_seconds,
            max_seconds=settings.notify_retry_max_seconds,
            max_attempts=settings.notify_max_attempts,
        ),
    )
