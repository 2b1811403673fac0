"""Prometheus metrics of e-mails and webhooks."""

from __future__ import annotations

from prometheus_client import Counter

EMAILS = Counter("otc_notify_emails_total", "E-mail sending attempts", ["kind", "result"])
WEBHOOKS = Counter("otc_webhook_attempts_total", "Webhook delivery attempts", ["result"])
