"""E-mail notifications to parties and signed webhooks to the operator.

Wiring (engine `__main__`): `notifications = notify.register(service, settings)` before `run`,
then `await notifications.setup(api)` in `setup`. Operator tools use `list_deliveries` and
`redeliver` over a connection to the engine schema.
"""

from __future__ import annotations

from otc_common.runtime import Service
from otc_common.settings import ConfigError, config_exit
from otc_engine.notify.notifier import NOTIFY_EVENTS, Notifications, message_body
from otc_engine.notify.settings import NotifyConfig, NotifySettings, resolve
from otc_engine.notify.store import Attempt, Delivery, as_dict, list_deliveries, redeliver

__all__ = [
    "NOTIFY_EVENTS",
    "Attempt",
    "Delivery",
    "Notifications",
    "NotifyConfig",
    "NotifySettings",
    "as_dict",
    "list_deliveries",
    "message_body",
    "redeliver",
    "register",
]


def register(service: Service, settings: NotifySettings) -> Notifications:
    """Checks the settings (a bad one stops the process with one line) and registers the sender loops."""
    try:
        config = resolve(settings)
    except ConfigError as exc:
        config_exit(str(exc))
    return Notifications(service, config)
