from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

import msgspec

from otc_common.settings import BaseSettings, ConfigError, read_secret
from otc_common.signing_keys import Seed, load_seed


class QueueSettings(BaseSettings, frozen=True, kw_only=True):
    bump_after_seconds: Annotated[
        float, msgspec.Meta(gt=0, le=86_400, description="raise the fees of a transaction not mined after this long")
    ] = 30.0
    concurrent_senders: Annotated[
        int,
        msgspec.Meta(ge=1, le=10_000, description="how many sending addresses are worked on at once"),
    ] = 50
    sender_db_pool_size: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=200,
            description="database connections of the sending workers, apart from OTC_DB_POOL_SIZE's for the consumers",
        ),
    ] = 25
    poll_seconds: Annotated[
        float,
        # At most 60: the sweep's heartbeat is what the liveness probe watches.
        msgspec.Meta(
            gt=0,
            le=60,
            description="how often waiting transfers are tried again (in flight: every 5th without news)",
        ),
    ] = 2.0
    rpc_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    stuck_alert_seconds: Annotated[
        float, msgspec.Meta(gt=0, description="alert when a transfer has waited this long to be signed")
    ] = 600.0
    utxo_fee_target_blocks: Annotated[
        int, msgspec.Meta(ge=1, le=1008, description="UTXO chains: blockchain.estimatefee's confirmation target")
    ] = 2
    utxo_min_fee_per_kvb: Annotated[
        int, msgspec.Meta(ge=0, description="UTXO chains: the least fee rate paid, in satoshis per 1000 vbytes")
    ] = 1000
    utxo_max_fee_per_kvb: Annotated[
        int,
        msgspec.Meta(gt=0, description="UTXO chains: no fee rate (estimate or bump) above this, sat per 1000 vbytes"),
    ] = 200_000
    #: Test-only: die by SIGKILL right after a signed transaction is committed and before it is broadcast.
    test_crash_after_sign: bool = False


def load_signing_seed(environ: Mapping[str, str] | None = None) -> Seed:
    """The seed from OTC_SEED_FILE or OTC_SEED; ConfigError with a message that never quotes it."""
    environ = os.environ if environ is None else environ
    secret = read_secret(environ.get("OTC_SEED"), environ.get("OTC_SEED_FILE"), "OTC_SEED")
    try:
        return load_seed(secret)
    except ValueError as exc:
        raise ConfigError(f"OTC_SEED is malformed: {exc}") from None
