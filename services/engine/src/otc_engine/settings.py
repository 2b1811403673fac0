from __future__ import annotations

from otc_common.settings import BaseSettings


class EngineSettings(BaseSettings, frozen=True, kw_only=True):
    pass
