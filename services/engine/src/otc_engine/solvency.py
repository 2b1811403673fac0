"""The solvency check: every open escrow must hold on chain at least what the ledger says is still in it.

A balance below that minimum means money left an escrow by a way the broker did not plan (a leaked
key, a bug, a chain that changed under us): payouts on that chain are halted, as for a deep reorg
(DESIGN §3, safeguard 8), an alert is raised, and an operator decides. A balance above the minimum is
normal (deposits not yet confirmed, tank gas, dust) and never judged. A mismatch is measured twice
before anything is halted, and each distinct finding halts once per process: an operator who resumes
the chain after looking into it is not overruled by the same finding, while any new one halts again.

The comparison is a pure function of two ledger snapshots and one balance. The ledger is read once
before the balances and once after: deposits count from the first snapshot (each was on chain before
the balance was read), money out from the second (anything that could have left by the time of the
read was planned before it), so a deposit or payout racing the read never looks like a loss.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import msgspec
from prometheus_client import Counter, Gauge

from otc_common import metrics as common_metrics
from otc_common import subjects
from otc_common.addresses import electrum_scripthash, utxo_script_pubkey
from otc_common.bus import emit
from otc_common.messages import AlertRaised, Party, stable_event_id
from otc_common.money import format_amount
from otc_common.registry import Chain, ChainKind, Registry
from otc_common.runtime import Loop
from otc_engine import admin, store
from otc_engine.flow import DealFacts
from otc_engine.ledger import Escrow
from otc_engine.metrics import HALTED
from otc_engine.service import Engine, now_utc

log = logging.getLogger("otc.engine.solvency")

SHORTFALL = Gauge(
    "otc_solvency_shortfall_base_units",
    "What open escrows hold below the ledger's minimum, summed per chain and asset (0 when solvent)",
    ["chain", "asset"],
)
ROUNDS = Counter("otc_solvency_rounds_total", "Solvency check rounds", ["result"])
LAST_CHECK = Gauge("otc_solvency_last_check_timestamp_seconds", "When a chain's escrows were last checked", ["chain"])
SKIPPED = Counter("otc_solvency_skipped_total", "Chains left unchecked in a round, by cause", ["chain", "cause"])
RPC_CALLS = Counter("otc_solvency_rpc_calls_total", "Node calls made by the solvency check", ["chain", "method"])

DEFAULT_INTERVAL_SECONDS = 60.0
#: The runtime restarts a loop that has not beaten for 90 s; long pauses beat in slices.
BEAT_SLICE_SECONDS = 10.0
RPC_BATCH = 100
RPC_TIMEOUT_SECONDS = 10.0
LOCK_KEY = "otc-engine-solvency"

# --------------------------------------------------------------------------- the comparison (pure)

#: Statuses of a fee-on-top transfer whose network fee may have left the escrow before the ledger
#: learns its exact amount (PLANNED included: it may be commanded and mined between two reads;
#: FAILED included: a mined transaction that reverted still paid its fee).
FEE_UNSETTLED = ("PLANNED", "COMMANDED", "SUBMITTED", "FAILED")


def fee_tolerance(escrow: Escrow) -> int:
    """Fees a native escrow may have paid that the ledger cannot know yet: at most its fee reserve."""
    if not escrow.native:
        return 0  # a token escrow's fees are paid in native gas from the tank, not in the token
    unsettled = any(not t.fee_from_amount and t.status in FEE_UNSETTLED for t in escrow.transfers)
    return escrow.fee_reserve if unsettled else 0


def gone(escrow: Escrow) -> int:
    """The escrow's asset that left or is leaving: live transfers at their amount, settled ones at what
    they took, and for native escrows the fees already paid on top."""
    return escrow.asset_out + (escrow.fees_paid_on_top if escrow.native else 0)


def estimate(escrow: Escrow) -> int:
    """The minimum from one snapshot; an escrow whose estimate is 0 is not worth a node call."""
    return max(0, escrow.confirmed_total - gone(escrow) - fee_tolerance(escrow))


def minimum_holding(before: Escrow, after: Escrow) -> int:
    """What the escrow must hold at least, given the ledger read before and after its balance."""
    tolerance = max(fee_tolerance(before), fee_tolerance(after))
    return max(0, before.confirmed_total - gone(after) - tolerance)


def shortfall(before: Escrow, after: Escrow, balance: int) -> int:
    """How much the on-chain balance is below the minimum; 0 when the escrow is solvent."""
    return max(0, minimum_holding(before, after) - balance)


# --------------------------------------------------------------------------- balances on chain


class SourceError(Exception):
    """A node could not tell a balance; the chain is left unchecked this round. Never names the URL."""


class Holding(msgspec.Struct, frozen=True, kw_only=True):
    """One escrow to measure: `contract` is None for the chain's native coin."""

    address: str
    contract: str | None


class BalanceSource(Protocol):
    async def height(self) -> int: ...

    async def balances(self, holdings: Sequence[Holding], height: int) -> dict[Holding, int]: ...

    async def close(self) -> None: ...


BALANCE_OF = "0x70a08231"


class EvmSource:
    """Plain JSON-RPC, batched; balances at an explicit block so one round reads one chain state."""

    def __init__(self, chain: Chain, client: httpx.AsyncClient) -> None:
        assert chain.rpc is not None
        self.chain = chain.id
        self.url = chain.rpc
        self.client = client
        self._ids = itertools.count(1)

    async def _batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        ids = [next(self._ids) for _ in calls]
        body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in zip(ids, calls, strict=True)]
        for method, _ in calls:
            RPC_CALLS.labels(self.chain, method).inc()
        try:
            response = await self.client.post(
                self.url, content=msgspec.json.encode(body), headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise SourceError(f"node unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise SourceError(f"node answered HTTP {response.status_code}")
        try:
            replies = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            replies = None
        if not isinstance(replies, list):
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise SourceError("node answered a batch with something other than a list")
        by_id = {r.get("id"): r for r in replies if isinstance(r, dict)}
        results = []
        for i, (method, _) in zip(ids, calls, strict=True):
            reply = by_id.get(i)
            if reply is None or reply.get("error") is not None or "result" not in reply:
                common_metrics.RPC_ERRORS.labels(self.chain).inc()
                error = reply.get("error") if reply else None
                detail = error.get("message", "error") if isinstance(error, dict) else "no answer"
                raise SourceError(f"{method}: {str(detail)[:200]}")
            results.append(reply["result"])
        return results

    async def height(self) -> int:
        [raw] = await self._batch([("eth_blockNumber", [])])
        return _quantity(raw, "eth_blockNumber")

    async def balances(self, holdings: Sequence[Holding], height: int) -> dict[Holding, int]:
        block = hex(height)
        found: dict[Holding, int] = {}
        for start in range(0, len(holdings), RPC_BATCH):
            chunk = holdings[start : start + RPC_BATCH]
            calls: list[tuple[str, list[Any]]] = []
            for h in chunk:
                if h.contract is None:
                    calls.append(("eth_getBalance", [h.address, block]))
                else:
                    data = BALANCE_OF + h.address[2:].lower().rjust(64, "0")
                    calls.append(("eth_call", [{"to": h.contract, "data": data}, block]))
            for h, raw in zip(chunk, await self._batch(calls), strict=True):
                found[h] = _quantity(raw, "balance")
        return found

    async def close(self) -> None:
        return None


def _quantity(raw: Any, what: str) -> int:
    if not isinstance(raw, str) or not raw.startswith("0x") or len(raw) < 3:
        raise SourceError(f"{what}: the node answered {str(raw)[:80]!r}, not a number")
    try:
        return int(raw, 16)
    except ValueError:
        raise SourceError(f"{what}: the node answered {raw[:80]!r}, not a number") from None


class ElectrumSource:
    """Confirmed plus unconfirmed balance of each escrow's script, from the chain's Electrum server."""

    def __init__(self, chain: Chain, electrum: Any) -> None:
        assert chain.electrum is not None and chain.hrp is not None
        self.chain = chain.id
        self.hrp = chain.hrp
        self.module = electrum
        self.client = electrum.ElectrumClient(
            chain.electrum, request_timeout=RPC_TIMEOUT_SECONDS, on_request=self._count
        )
        self.started = False

    def _count(self, method: str) -> None:
        RPC_CALLS.labels(self.chain, method).inc()

    async def _request(self, method: str, *params: Any) -> Any:
        if not self.started:
            await self.client.start()
            self.started = True
        errors = (self.module.ElectrumError, self.module.ElectrumUnavailable, self.module.ElectrumTimeout)
        try:
            return await self.client.request(method, *params)
        except errors as exc:
            common_metrics.RPC_ERRORS.labels(self.chain).inc()
            raise SourceError(f"{method}: {type(exc).__name__}") from None

    async def height(self) -> int:
        tip = await self._request("blockchain.headers.subscribe")
        if not isinstance(tip, dict) or not isinstance(tip.get("height"), int):
            raise SourceError("blockchain.headers.subscribe: unexpected answer")
        return int(tip["height"])

    async def balances(self, holdings: Sequence[Holding], height: int) -> dict[Holding, int]:
        found: dict[Holding, int] = {}
        for h in holdings:
            scripthash = electrum_scripthash(utxo_script_pubkey(h.address, self.hrp))
            answer = await self._request("blockchain.scripthash.get_balance", scripthash)
            try:
                found[h] = int(answer["confirmed"]) + int(answer["unconfirmed"])
            except (KeyError, TypeError, ValueError):
                raise SourceError("blockchain.scripthash.get_balance: unexpected answer") from None
        return found

    async def close(self) -> None:
        if self.started:
            await self.client.close()


def _electrum_module() -> Any | None:
    """The Electrum client, where this build has it; without it UTXO chains are not checked."""
    try:
        return importlib.import_module("otc_common.electrum")
    except ImportError:
        return None


# --------------------------------------------------------------------------- the check


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    deal_id: str
    party: Party
    chain: str
    asset: str
    address: str
    minimum: int
    balance: int

    @property
    def shortfall(self) -> int:
        return self.minimum - self.balance

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.chain, self.asset, self.address)


@dataclass
class Round:
    findings: list[Finding] = field(default_factory=list)
    checked_chains: set[str] = field(default_factory=set)


class _Escrow(msgspec.Struct, frozen=True, kw_only=True):
    deal_id: str
    party: Party
    chain: str
    asset: str
    holding: Holding
    before: Escrow


def _by_deal(rows: Sequence[Any]) -> dict[str, list[Any]]:
    """Rows keyed by their deal, each deal's in the order the query gave them."""
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        grouped.setdefault(row["deal_id"], []).append(row)
    return grouped


class SolvencyChecker:
    def __init__(self, engine: Engine, registry: Registry, client: httpx.AsyncClient | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.client = client or httpx.AsyncClient(timeout=RPC_TIMEOUT_SECONDS)
        self._sources: dict[str, BalanceSource | None] = {}
        self._reported: set[tuple[str, str, str, int, int]] = set()

    async def close(self) -> None:
        for source in self._sources.values():
            if source is not None:
                await source.close()
        await self.client.aclose()

    def _source(self, chain: Chain) -> BalanceSource | None:
        if chain.id not in self._sources:
            source: BalanceSource | None = None
            if chain.kind is ChainKind.EVM and chain.rpc:
                source = EvmSource(chain, self.client)
            elif chain.kind is ChainKind.UTXO and chain.electrum:
                electrum = _electrum_module()
                if electrum is None:
                    log.warning("no Electrum client in this build: escrows on %s are not checked", chain.id)
                else:
                    source = ElectrumSource(chain, electrum)
            self._sources[chain.id] = source
        return self._sources[chain.id]

    # ----------------------------------------------------------------- ledger snapshots

    async def open_deals(self) -> list[str]:
        """Deals whose escrows may hold money: not closed, or closed and still watched."""
        since = now_utc() - self.engine.flow.post_close_window
        rows = await self.engine.pool.fetch(
            """SELECT deal_id FROM deals
               WHERE stage <> 'CLOSED' OR (NOT unwatched AND closed_at > $1) ORDER BY deal_id""",
            since,
        )
        return [row["deal_id"] for row in rows]

    async def snapshot(self, deal_ids: Sequence[str]) -> tuple[dict[str, DealFacts], dict[str, int]]:
        """Every listed deal's facts as of one moment, in five queries whatever their number."""
        ids = list(deal_ids)
        async with self.engine.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            deals = await conn.fetch("SELECT * FROM deals WHERE deal_id = ANY($1::text[])", ids)
            sides = await conn.fetch("SELECT * FROM deal_sides WHERE deal_id = ANY($1::text[])", ids)
            deposits = await conn.fetch(
                """SELECT * FROM deposits WHERE deal_id = ANY($1::text[])
                   ORDER BY block_number NULLS LAST, first_seen""",
                ids,
            )
            transfers = await conn.fetch(
                "SELECT * FROM transfers WHERE deal_id = ANY($1::text[]) ORDER BY created_at, phase", ids
            )
            gas = await conn.fetch("SELECT * FROM gas_fundings WHERE deal_id = ANY($1::text[])", ids)
            tips = await store.tips(conn)
        # Grouped once: filtering every list per deal costs the square of the deal count, which at
        # 10,000 open deals blocks the event loop (API, consumers) for minutes each round.
        sides_of, deposits_of, transfers_of, gas_of = (_by_deal(rows) for rows in (sides, deposits, transfers, gas))
        facts: dict[str, DealFacts] = {}
        for deal in deals:
            deal_id = deal["deal_id"]
            try:
                facts[deal_id] = DealFacts(
                    deal,
                    {Party(s["party"]): s for s in sides_of.get(deal_id, [])},
                    deposits_of.get(deal_id, []),
                    transfers_of.get(deal_id, []),
                    gas_of.get(deal_id, []),
                    tips,
                    self.registry,
                )
            except KeyError:
                log.warning("deal %s names a chain or asset the registry lacks; not checked", deal_id)
        return facts, tips

    # ----------------------------------------------------------------- one pass

    async def measure(self, deal_ids: Sequence[str], beat: Callable[[], None]) -> Round:
        """Reads the ledger, the balances, and the ledger again; returns the escrows below their minimum."""
        before, tips = await self.snapshot(deal_ids)
        by_chain: dict[str, list[_Escrow]] = {}
        for deal_id, facts in before.items():
            for party, escrow in facts.escrows.items():
                if estimate(escrow) <= 0:
                    continue
                side = facts.sides[party]
                chain = self.registry.chain(side["chain"])
                asset = chain.assets[side["asset"]]
                holding = Holding(address=side["escrow_address"], contract=None if asset.native else asset.contract)
                by_chain.setdefault(chain.id, []).append(
                    _Escrow(
                        deal_id=deal_id, party=party, chain=chain.id, asset=asset.symbol, holding=holding, before=escrow
                    )
                )
        measured: dict[str, tuple[list[_Escrow], dict[Holding, int]]] = {}
        for chain_id, escrows in sorted(by_chain.items()):
            beat()
            source = self._source(self.registry.chain(chain_id))
            if source is None:
                SKIPPED.labels(chain_id, "unsupported").inc()
                continue
            try:
                height = await source.height()
                if height < tips.get(chain_id, 0):
                    # A node behind the watchers' view may lack deposits the ledger counts as confirmed.
                    SKIPPED.labels(chain_id, "node_behind").inc()
                    log.info(
                        "solvency check of %s skipped: node at %s, watchers at %s", chain_id, height, tips[chain_id]
                    )
                    continue
                balances = await source.balances([e.holding for e in escrows], height)
            except SourceError as exc:
                SKIPPED.labels(chain_id, "rpc").inc()
                log.warning("solvency check of %s skipped: %s", chain_id, exc)
                continue
            measured[chain_id] = (escrows, balances)
        result = Round(checked_chains=set(measured))
        if not measured:
            return result
        after, _ = await self.snapshot(sorted({e.deal_id for escrows, _ in measured.values() for e in escrows}))
        for escrows, balances in measured.values():
            for e in escrows:
                later = after.get(e.deal_id)
                minimum = minimum_holding(e.before, later.escrows[e.party] if later is not None else e.before)
                balance = balances[e.holding]
                if balance < minimum:
                    result.findings.append(
                        Finding(
                            deal_id=e.deal_id,
                            party=e.party,
                            chain=e.chain,
                            asset=e.asset,
                            address=e.holding.address,
                            minimum=minimum,
                            balance=balance,
                        )
                    )
        return result

    async def check_once(self, beat: Callable[[], None] = lambda: None) -> list[Finding]:
        """One round over every open escrow; a mismatch is measured again before anything is halted."""
        async with self.engine.pool.acquire() as lock_conn:
            if not await lock_conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", LOCK_KEY):
                return []  # another engine replica is checking right now
            try:
                first = await self.measure(await self.open_deals(), beat)
                confirmed: list[Finding] = []
                if first.findings:
                    suspects = {f.key for f in first.findings}
                    again = await self.measure(sorted({f.deal_id for f in first.findings}), beat)
                    confirmed = [f for f in again.findings if f.key in suspects]
                    if len(confirmed) < len(first.findings):
                        log.info("a solvency mismatch was not seen again on re-measuring; nothing halted for it")
                for finding in confirmed:
                    await self.halt(finding)
                self._publish_gauges(first.checked_chains, confirmed)
                return confirmed
            finally:
                try:
                    await lock_conn.execute("SELECT pg_advisory_unlock(hashtext($1))", LOCK_KEY)
                except BaseException:
                    # Pooled connections are not reset: a lock left on one would stop every later round.
                    lock_conn.terminate()
                    raise

    def _publish_gauges(self, chains: set[str], findings: Sequence[Finding]) -> None:
        now = time.time()
        for chain_id in chains:
            LAST_CHECK.labels(chain_id).set(now)
            for symbol in self.registry.chain(chain_id).assets:
                missing = sum(f.shortfall for f in findings if f.chain == chain_id and f.asset == symbol)
                SHORTFALL.labels(chain_id, symbol).set(missing)

    def _describe(self, f: Finding) -> tuple[str, str]:
        decimals = self.registry.chain(f.chain).assets[f.asset].decimals

        def amount(value: int) -> str:
            return f"{format_amount(value, decimals)} {f.asset}"

        reason = f"solvency mismatch: escrow {f.address} (deal {f.deal_id}) is short by {amount(f.shortfall)}"
        detail = (
            f"{f.chain} escrow {f.address} of deal {f.deal_id} ({f.party.value}) holds {amount(f.balance)}; "
            f"the ledger needs at least {amount(f.minimum)}. Payouts on {f.chain} are halted."
        )
        return reason, detail

    async def halt(self, f: Finding) -> None:
        """Halts the chain and alerts, once per distinct finding: an operator who lifts the halt after
        looking into it is not overruled by the same finding; any change (another escrow, a balance
        that moves) halts again."""
        report = (f.chain, f.asset, f.address, f.minimum, f.balance)
        if report in self._reported:
            return
        reason, detail = self._describe(f)
        async with self.engine.pool.acquire() as conn, conn.transaction():
            fresh = await admin.halt(conn, f.chain, reason)
            await emit(
                conn,
                subjects.alert("engine"),
                AlertRaised(source="engine", kind="solvency_mismatch", detail=detail, chain=f.chain, deal_id=f.deal_id),
                event_id=stable_event_id("solvency", *report),
            )
        self._reported.add(report)
        HALTED.labels(f.chain).set(1)
        common_metrics.ALERTS.labels("engine", "solvency_mismatch").inc()
        log.error(
            "solvency mismatch; payouts halted" if fresh else "solvency mismatch on a halted chain",
            extra={
                "chain": f.chain,
                "deal_id": f.deal_id,
                "address": f.address,
                "minimum": f.minimum,
                "balance": f.balance,
            },
        )


async def _pause(loop: Loop, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        loop.beat()
        await asyncio.sleep(min(left, BEAT_SLICE_SECONDS))
    loop.beat()


async def run_solvency(
    engine: Engine, registry: Registry, loop: Loop, *, interval_seconds: float = DEFAULT_INTERVAL_SECONDS
) -> None:
    """Checks every `interval_seconds`, the first time one interval after start."""
    # httpx logs each request with its URL, and a node URL may carry an API key.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    checker = SolvencyChecker(engine, registry)
    try:
        while True:
            await _pause(loop, interval_seconds)
            try:
                await checker.check_once(loop.beat)
                ROUNDS.labels("ok").inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A failing round must not stop the engine; the counter and the log tell the operator.
                ROUNDS.labels("failed").inc()
                log.error("solvency check failed (%s: %s); retrying next round", type(exc).__name__, exc)
    finally:
        await checker.close()
