"""The tank's shell: record requests, sign and send fundings, follow them to confirmation, watch balances.

One `ChainTank` per EVM chain runs one loop, so a process signs for a chain one funding at a time; the
wallet row lock in the database keeps replicas from sharing a nonce. Every state change and the events
it causes commit together; a signed transaction is committed before it is first sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

import asyncpg

from otc_common import subjects
from otc_common.addresses import AddressError
from otc_common.bus import Bus, emit
from otc_common.db import DATABASE_TRANSIENT, Connection, Pool
from otc_common.evm_rpc import RpcFailure
from otc_common.messages import (
    AlertRaised,
    Envelope,
    GasFunded,
    GasFundingRequest,
    Message,
    TankLowBalance,
    stable_event_id,
)
from otc_common.money import format_amount
from otc_common.registry import Chain, ChainKind, Registry
from otc_common.runtime import Loop, Service
from otc_tank import metrics, rules, store
from otc_tank.rpc import ChainRpc
from otc_tank.settings import TankSettings
from otc_tank.wallet import TankWallet

log = logging.getLogger("otc.tank")

#: Node answers to a re-sent transaction that mean it (or its nonce) is already known: not a failure.
_ALREADY_KNOWN = ("already known", "known transaction", "nonce too low", "already imported", "alreadyknown")
#: Expected trouble talking to the chain or the database; anything else is a bug and logged with its trace.
_TRANSIENT: tuple[type[Exception], ...] = (RpcFailure, *DATABASE_TRANSIENT)
_RPC_WARNING_INTERVAL = 30.0


class ChainMismatch(RpcFailure):
    """The node answers for a different chain than the registry names."""

    def __init__(self, detail: str) -> None:
        super().__init__("eth_chainId", detail)


def funded_event_id(request_id: str) -> str:
    return stable_event_id("tank.funded", request_id)


class ChainTank:
    """Funding work for one chain: waiting requests, transactions in flight, the wallet's balance."""

    def __init__(
        self, service: Service, settings: TankSettings, chain: Chain, wallet: TankWallet, threshold: int
    ) -> None:
        assert chain.rpc is not None and chain.chain_id is not None
        self.service = service
        self.settings = settings
        self.chain = chain
        self.chain_id: int = chain.chain_id
        self.wallet = wallet
        self.threshold = threshold
        metrics.LOW_BALANCE_THRESHOLD.labels(chain.id).set(threshold)
        self.rpc = ChainRpc(chain.id, chain.rpc, settings.tank_rpc_timeout_seconds)
        self.wake = asyncio.Event()
        self._announced_waits: set[str] = set()
        self._last_warning: dict[str, float] = {}
        self._chain_id_checked = False
        self._nonce_conflicts: set[str] = set()

    @property
    def pool(self) -> Pool:
        return self.service.db

    @property
    def bus(self) -> Bus:
        return self.service.nats

    # ----------------------------------------------------------------- the loop

    async def run(self, loop: Loop) -> None:
        try:
            await self._run(loop)
        finally:
            with contextlib.suppress(Exception):
                await self.rpc.close()

    async def _run(self, loop: Loop) -> None:
        next_funding = next_balance = 0.0
        while True:
            loop.beat()
            if self.wake.is_set() or time.monotonic() >= next_funding:
                self.wake.clear()
                next_funding = time.monotonic() + self.settings.tank_retry_seconds
                await self._guard("funding", self.fund_waiting)
            await self._guard("following", self.follow_in_flight)
            if time.monotonic() >= next_balance:
                next_balance = time.monotonic() + self.settings.tank_poll_seconds
                await self._guard("balance", self.check_balance)
            until = min(next_funding, next_balance, time.monotonic() + self.settings.tank_confirm_poll_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=max(0.0, until - time.monotonic()))

    async def _guard(self, step: str, work: Callable[[], Awaitable[None]]) -> None:
        """Runs one step; trouble is logged (at most every 30 s per step while it lasts) and retried later."""
        try:
            await work()
        except _TRANSIENT as exc:
            now = time.monotonic()
            if now - self._last_warning.get(step, -_RPC_WARNING_INTERVAL) >= _RPC_WARNING_INTERVAL:
                self._last_warning[step] = now
                log.warning("%s on %s paused: %s; retrying", step, self.chain.id, exc, extra={"chain": self.chain.id})
            return
        except Exception:
            log.exception("%s on %s failed; retrying", step, self.chain.id, extra={"chain": self.chain.id})
            return
        self._last_warning.pop(step, None)

    # ----------------------------------------------------------------- waiting requests

    async def fund_waiting(self) -> None:
        async with self.pool.acquire() as conn:
            rows = await store.waiting(conn, self.chain.id)
            reserved = await store.reserved(conn, self.chain.id) if rows else 0
        metrics.WAITING.labels(self.chain.id).set(len(rows))
        if not rows:
            return
        await self._check_chain_id()
        base_fee = await self.rpc.base_fee()
        priority_fee = await self.rpc.priority_fee(base_fee)
        available = await self.rpc.balance(self.wallet.address) - reserved
        chain_count = await self.rpc.transaction_count(self.wallet.address)
        still_waiting = 0
        for row in rows:
            request_id: str = row["request_id"]
            escrow_balance = await self.rpc.balance(row["escrow_address"])
            plan = rules.plan_funding(
                transfers=row["transfers"],
                gas_per_transfer=int(row["gas_per_transfer"]),
                base_fee=base_fee,
                priority_fee=priority_fee,
                escrow_balance=escrow_balance,
                tank_available=available,
            )
            if plan.kind is rules.PlanKind.WAIT:
                still_waiting += 1
                await self._announce_wait(row, plan, available)
                continue
            if plan.kind is rules.PlanKind.NOT_NEEDED:
                await self._settle_not_needed(row, plan, base_fee, escrow_balance)
                continue
            signed = await self._sign(row, plan, base_fee, escrow_balance, chain_count)
            if signed is None:
                continue
            available -= plan.cost
            if self.settings.tank_test_crash_after_sign:
                os.kill(os.getpid(), signal.SIGKILL)
            await self.broadcast(request_id, signed)
        metrics.WAITING.labels(self.chain.id).set(still_waiting)

    async def _check_chain_id(self) -> None:
        """A transaction signed for another chain id would never be accepted: refuse to sign at all."""
        if self._chain_id_checked:
            return
        found = await self.rpc.chain_id()
        if found != self.chain_id:
            raise ChainMismatch(
                f"the node at {self.chain.id}'s rpc reports chain id {found}, the registry {self.chain_id}"
            )
        self._chain_id_checked = True

    async def _announce_wait(self, row: asyncpg.Record, plan: rules.Plan, available: int) -> None:
        request_id: str = row["request_id"]
        if request_id in self._announced_waits:
            return
        self._announced_waits.add(request_id)
        native = self.chain.native_asset
        reason = (
            f"tank too low: needs {format_amount(plan.cost, native.decimals)} {native.symbol}, "
            f"has {format_amount(max(0, available), native.decimals)} available"
        )
        async with self.pool.acquire() as conn:
            await store.note_waiting(conn, request_id, reason)
        log.warning(
            "funding waits for the tank to be refilled",
            extra={"chain": self.chain.id, "request_id": request_id, "deal_id": row["deal_id"], "reason": reason},
        )

    async def _settle_not_needed(
        self, row: asyncpg.Record, plan: rules.Plan, base_fee: int, escrow_balance: int
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.lock_waiting(conn, row["request_id"]):
                return
            settled = await store.mark_not_needed(
                conn,
                row["request_id"],
                base_fee=base_fee,
                priority_fee=plan.priority_fee,
                escrow_balance=escrow_balance,
                needed=plan.needed,
            )
            if settled is None:
                return
            await self._emit_funded(conn, settled, amount=0, txid="")
        metrics.FUNDINGS.labels(self.chain.id, "not_needed").inc()
        log.info(
            "escrow already holds enough gas",
            extra={"chain": self.chain.id, "request_id": row["request_id"], "deal_id": row["deal_id"]},
        )

    async def _sign(
        self, row: asyncpg.Record, plan: rules.Plan, base_fee: int, escrow_balance: int, chain_count: int
    ) -> bytes | None:
        """Signs and commits the funding; None if another worker took the request first."""
        request_id: str = row["request_id"]
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.lock_waiting(conn, request_id):
                return None
            nonce = await store.take_nonce(conn, self.chain.id, chain_count)
            signed = self.wallet.sign_funding(
                chain_id=self.chain_id,
                nonce=nonce,
                to=row["escrow_address"],
                amount=plan.amount,
                max_fee_per_gas=plan.max_fee_per_gas,
                priority_fee=plan.priority_fee,
            )
            await store.mark_signed(
                conn,
                request_id,
                base_fee=base_fee,
                priority_fee=plan.priority_fee,
                escrow_balance=escrow_balance,
                needed=plan.needed,
                amount=plan.amount,
                max_fee_per_gas=plan.max_fee_per_gas,
                nonce=nonce,
                raw_tx=signed.raw,
                tx_hash=signed.tx_hash,
            )
        self._announced_waits.discard(request_id)
        metrics.SIGNED.labels(self.chain.id).inc()
        log.info(
            "funding signed",
            extra={
                "chain": self.chain.id,
                "request_id": request_id,
                "deal_id": row["deal_id"],
                "txid": signed.tx_hash,
                "nonce": nonce,
                "amount": plan.amount,
                "base_fee": base_fee,
                "priority_fee": plan.priority_fee,
                "escrow_balance": escrow_balance,
            },
        )
        return signed.raw

    async def broadcast(self, request_id: str, raw: bytes, previous_error: str | None = None) -> str | None:
        """Sends the stored bytes; a refusal is recorded (and returned) and the follower sends them again later."""
        error: str | None = None
        try:
            await self.rpc.send_raw(raw)
        except RpcFailure as exc:
            error = exc.detail[:500]
        metrics.BROADCASTS.labels(self.chain.id).inc()
        async with self.pool.acquire() as conn:
            await store.record_broadcast(conn, request_id, error)
        already_known = error is not None and any(known in error.lower() for known in _ALREADY_KNOWN)
        if error is not None and not already_known and error != previous_error:
            log.warning(
                "funding broadcast refused; it will be sent again",
                extra={"chain": self.chain.id, "request_id": request_id, "error": error},
            )
        return error

    # ----------------------------------------------------------------- in flight

    async def follow_in_flight(self) -> None:
        async with self.pool.acquire() as conn:
            rows = await store.in_flight(conn, self.chain.id)
        if not rows:
            return
        tip = await self.rpc.block_number()
        for row in rows:
            receipt = await self.rpc.receipt(row["tx_hash"])
            standing = rules.standing(
                tip=tip,
                block_number=receipt.block_number if receipt else None,
                success=receipt.success if receipt else True,
                threshold=self.chain.confirmations,
            )
            if standing is rules.Standing.UNMINED:
                await self._unmined(row)
            elif standing is rules.Standing.MINED:
                assert receipt is not None
                confirmations = rules.confirmations(tip, receipt.block_number)
                if (row["block_number"], row["block_hash"], row["confirmations"]) != (
                    receipt.block_number,
                    receipt.block_hash,
                    confirmations,
                ):
                    async with self.pool.acquire() as conn:
                        await store.record_block(
                            conn, row["request_id"], receipt.block_number, receipt.block_hash, confirmations
                        )
            elif standing is rules.Standing.CONFIRMED:
                assert receipt is not None
                await self._confirmed(row, receipt.block_number, receipt.block_hash, tip)
            else:
                assert receipt is not None
                await self._reverted(row, receipt.block_number, receipt.block_hash)

    async def _unmined(self, row: asyncpg.Record) -> None:
        was_mined = row["block_number"] is not None
        if was_mined:
            log.warning(
                "funding transaction left the chain (reorg); sending the same bytes again",
                extra={"chain": self.chain.id, "request_id": row["request_id"], "txid": row["tx_hash"]},
            )
            async with self.pool.acquire() as conn:
                await store.record_block(conn, row["request_id"], None, None, 0)
        if not rules.should_broadcast(
            never_sent=row["broadcasts"] == 0,
            was_mined=was_mined,
            seconds_since_last=row["since_last"],
            retry_seconds=self.settings.tank_retry_seconds,
        ):
            return
        error = await self.broadcast(row["request_id"], bytes(row["raw_tx"]), row["last_error"])
        if error is not None and "nonce too low" in error.lower():
            await self._check_nonce_conflict(row)

    async def _check_nonce_conflict(self, row: asyncpg.Record) -> None:
        """Our nonce is used but our transaction is not mined: the key signed something else with it."""
        if row["request_id"] in self._nonce_conflicts or await self.rpc.receipt(row["tx_hash"]) is not None:
            return
        if await self.rpc.transaction_count(self.wallet.address) <= row["nonce"]:
            return
        self._nonce_conflicts.add(row["request_id"])
        # Signing a second funding could pay twice if this one still surfaced; an operator decides.
        await self.bus.raise_alert(
            "tank_nonce_conflict",
            f"funding {row['request_id']} ({row['tx_hash']}) on {self.chain.id}: nonce {row['nonce']} was used "
            "by another transaction of the tank key; not re-signed",
            chain=self.chain.id,
            deal_id=row["deal_id"],
        )

    async def _confirmed(self, row: asyncpg.Record, block_number: int, block_hash: str, tip: int) -> None:
        confirmations = rules.confirmations(tip, block_number)
        async with self.pool.acquire() as conn, conn.transaction():
            funded = await store.mark_funded(conn, row["request_id"], block_number, block_hash, confirmations)
            if funded is None:
                return
            await self._emit_funded(conn, funded, amount=int(funded["amount"]), txid=funded["tx_hash"])
        metrics.FUNDINGS.labels(self.chain.id, "funded").inc()
        metrics.FUNDED_WEI.labels(self.chain.id).inc(int(row["amount"]))
        log.info(
            "escrow funded",
            extra={
                "chain": self.chain.id,
                "request_id": row["request_id"],
                "deal_id": row["deal_id"],
                "txid": row["tx_hash"],
                "amount": int(row["amount"]),
                "confirmations": confirmations,
            },
        )

    async def _reverted(self, row: asyncpg.Record, block_number: int, block_hash: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.mark_reverted(conn, row["request_id"], block_number, block_hash):
                return
        await self.bus.raise_alert(
            "tank_funding_reverted",
            f"funding {row['request_id']} ({row['tx_hash']}) reverted on {self.chain.id}; not retried",
            chain=self.chain.id,
            deal_id=row["deal_id"],
        )

    async def _emit_funded(self, conn: Connection, row: asyncpg.Record, *, amount: int, txid: str) -> None:
        await emit(
            conn,
            subjects.tank_result(self.chain.id),
            GasFunded(
                request_id=row["request_id"],
                deal_id=row["deal_id"],
                chain=self.chain.id,
                escrow_address=row["escrow_address"],
                amount=amount,
                txid=txid,
            ),
            event_id=funded_event_id(row["request_id"]),
        )

    # ----------------------------------------------------------------- balance

    async def check_balance(self) -> None:
        balance = await self.rpc.balance(self.wallet.address)
        metrics.BALANCE.labels(self.chain.id).set(balance)
        async with self.pool.acquire() as conn, conn.transaction():
            wallet = await store.lock_wallet(conn, self.chain.id)
            if wallet is None:
                return
            step = rules.low_balance_step(was_low=wallet["low"], balance=balance, threshold=self.threshold)
            crossings = int(wallet["low_crossings"]) + (1 if step.crossed else 0)
            await store.record_balance(conn, self.chain.id, balance, step.low, crossings)
            if step.crossed:
                await emit(
                    conn,
                    subjects.tank_result(self.chain.id),
                    TankLowBalance(
                        chain=self.chain.id, address=self.wallet.address, balance=balance, threshold=self.threshold
                    ),
                    event_id=stable_event_id("tank.low_balance", self.chain.id, self.wallet.address, crossings),
                )
        if step.crossed:
            native = self.chain.native_asset
            await self.bus.raise_alert(
                "tank_low",
                f"tank {self.wallet.address} on {self.chain.id} holds {format_amount(balance, native.decimals)} "
                f"{native.symbol}, below {format_amount(self.threshold, native.decimals)} {native.symbol}; refill it",
                chain=self.chain.id,
            )


class Tank:
    """The process: one `ChainTank` per served chain, the request handler, and their wake-up channel."""

    def __init__(
        self,
        service: Service,
        settings: TankSettings,
        registry: Registry,
        wallet: TankWallet,
        thresholds: dict[str, int],
    ) -> None:
        self.service = service
        self.settings = settings
        self.registry = registry
        self.wallet = wallet
        self.chains = {
            chain_id: ChainTank(service, settings, registry.chain(chain_id), wallet, threshold)
            for chain_id, threshold in thresholds.items()
        }

    async def start(self) -> None:
        async with self.service.db.acquire() as conn:
            for chain_id in self.chains:
                await store.upsert_wallet(conn, chain_id, self.wallet.address)

    def _refusal(self, request: GasFundingRequest) -> tuple[str, str | None]:
        """The escrow address in canonical form, and why the request cannot be served (or None)."""
        chain = self.registry.chains.get(request.chain)
        if chain is None or chain.kind is not ChainKind.EVM:
            return request.escrow_address, f"chain {request.chain} is not an EVM chain of this registry"
        if request.chain not in self.chains:
            return request.escrow_address, f"chain {request.chain} has no tank_address"
        try:
            escrow = chain.validate_address(request.escrow_address)
        except AddressError as exc:
            return request.escrow_address, f"escrow address: {exc}"
        return escrow, rules.refusal(request.transfers, request.gas_per_transfer)

    async def on_request(self, conn: Connection, envelope: Envelope, message: Message) -> None:
        if not isinstance(message, GasFundingRequest):
            return
        escrow, reason = self._refusal(message)
        fresh = await store.insert_request(conn, message, escrow, "REJECTED" if reason else "WAITING", reason)
        context = {"chain": message.chain, "request_id": message.request_id, "deal_id": message.deal_id}
        if not fresh:
            log.info("funding request already recorded", extra=context)
            return
        if reason is not None:
            log.error("funding request refused: %s", reason, extra=context)
            await emit(
                conn,
                subjects.alert("tank"),
                AlertRaised(
                    source="tank",
                    kind="funding_refused",
                    detail=f"{message.request_id}: {reason}",
                    chain=message.chain,
                    deal_id=message.deal_id,
                ),
            )
            return
        await store.notify_request(conn, message.chain)
        log.info("funding request recorded", extra={**context, "transfers": message.transfers})

    async def listen(self, loop: Loop) -> None:
        """Wakes a chain's worker when a request commits (NOTIFY is delivered on commit)."""

        def on_notify(_conn: Connection, _pid: int, _channel: str, payload: object) -> None:
            worker = self.chains.get(str(payload))
            if worker is not None:
                worker.wake.set()

        while True:
            listener: asyncpg.Connection | None = None
            try:
                listener = await asyncpg.connect(self.settings.database_url)
                await listener.add_listener(store.REQUESTS_CHANNEL, on_notify)
                # Requests that committed while nobody listened are picked up now.
                for worker in self.chains.values():
                    worker.wake.set()
                while not listener.is_closed():
                    loop.beat()
                    await asyncio.sleep(1.0)
            except DATABASE_TRANSIENT as exc:
                log.warning("request listener interrupted (%s); resuming", type(exc).__name__)
                await asyncio.sleep(1.0)
            finally:
                if listener is not None and not listener.is_closed():
                    await listener.close()
