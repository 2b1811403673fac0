"""The chaos simulation: a mix of deals on ETH, POLYGON and UNICITY while services die and chains reorganise.

Three parts, put together by `ChaosRun` (tests/test_chaos.py runs it):

- `DealMix` plans the deals (kinds x assets x chains, from one seeded random generator) and drives each one
  as its traders would, through the gateway, with deposits sent to the chains themselves.
- `FaultDriver` SIGKILLs a random service every 2-5 s and starts it again, restarts NATS and PostgreSQL once
  each, and stops a watcher for a while; between faults it supervises the services the way an orchestrator
  would (a process that exits on its own is counted and started again).
- `InvariantChecker` reads, once everything has settled, the chains themselves (anvil JSON-RPC blocks, receipts
  and token logs; the devnet's Electrum histories and raw transactions parsed with python-bitcoinlib) and the
  queue's own tables, all in integers, and reports every broken invariant.

Blocks come only from this module: automine is off on both anvils and the devnet has no autominer, so
`ChaosMiner` (and the reorgs, made while it holds a chain) is the only block producer, and `BlockLog` knows
when each height came into being. The sizes live in `CI` and `LONG`; OTC_CHAOS_LONG=1 selects the long one,
OTC_CHAOS_SEED replays a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from bitcoin.core import CTransaction, b2lx

from otc_cli import contracts
from otc_cli.servers import ManagedServer, free_port, start_nats, start_postgres
from otc_common.addresses import utxo_script_pubkey
from otc_common.money import format_amount, parse_amount
from tests.conftest import EvmChains, with_database
from tests.e2e import Chain, EvmStack, alpha_scripthash, fresh_address_on
from tests.support import ALPHA_ADDRESS, OPERATOR_EVM, TEST_SEED_HEX, tank_address, write_test_registry
from tests.utxo_support import UnicityDevnet

PARTIES = ("ALICE", "BOB")
OTHER = {"ALICE": "BOB", "BOB": "ALICE"}
KINDS = ("happy", "timeout", "topup", "overpay", "late", "reorg_waiting", "reorg_swap")
SWAPPED_KINDS = frozenset(KINDS) - {"timeout"}
CHAINS = ("ETH", "POLYGON", "UNICITY")
#: (chain, asset) pairs a side can trade.
ASSETS = (("ETH", "ETH"), ("ETH", "USDT"), ("POLYGON", "MATIC"), ("POLYGON", "USDT"), ("UNICITY", "ALPHA"))
NATIVE = {"ETH": "ETH", "POLYGON": "MATIC", "UNICITY": "ALPHA"}
DECIMALS = {"ETH": 18, "MATIC": 18, "USDT": 6, "ALPHA": 8}
#: What the test registry (tests/support.py) says: confirmations, commission, fixed fees and fee reserves.
THRESHOLD = {"ETH": 2, "POLYGON": 3, "UNICITY": 2}
COMMISSION_BPS = 30
FIXED_FEE = {"USDT": 10**6}
FEE_RESERVE = {"ETH": 10**15, "MATIC": 10**16, "ALPHA": 10_000}
#: Base-unit ranges of trade amounts: small enough for the faucet's one-coin payments (under 49 ALPHA).
AMOUNT_RANGE = {
    "ETH": (10**16, 5 * 10**17),
    "MATIC": (10**18, 50 * 10**18),
    "USDT": (10 * 10**6, 3000 * 10**6),
    "ALPHA": (5 * 10**7, 20 * 10**8),
}
#: Late deposits: well above any return's own network fee.
LATE_RANGE = {"ETH": (10**15, 10**16), "MATIC": (10**16, 10**17), "USDT": (10**6, 9 * 10**6), "ALPHA": (10**6, 10**7)}
#: Anvil dev accounts that fund deposits: not 0 (deploys the token) nor 2 (the operator's address).
FUNDERS = (1, 3, 4, 5, 6, 7, 8)
#: Funds only the deposits a reorg will drop, so no later transaction of the same sender is dropped with them.
REORG_FUNDER = 9
SERVICES = ("engine", "gateway", "queue", "tank", "watcher-ETH", "watcher-POLYGON", "watcher-UNICITY")
WATCHERS = ("watcher-ETH", "watcher-POLYGON", "watcher-UNICITY")
#: Each watcher's schema, and whether it keeps EVM balance baselines: read for the post-mortem of a failed deal.
WATCHER_SCHEMAS = (("watcher_evm_eth", True), ("watcher_evm_polygon", True), ("watcher_utxo_unicity", False))
ERC20_TRANSFER = "0xa9059cbb"
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class ChaosSize:
    name: str
    deals: int
    #: Deals start evenly over this window, and faults are injected during it.
    fault_seconds: float
    watcher_outage_seconds: float
    #: The deadline of the single-side-timeout deals.
    refund_timeout_seconds: int
    #: After the faults, for every deal to reach its end.
    drain_seconds: float
    #: pytest-timeout for the whole test.
    test_timeout: int
    #: Deals of each reorg kind. Each holds its chain's blocks back for a moment (every other deal on that chain
    #: waits meanwhile), so many of them would measure the holds rather than the system; the rest of the deals
    #: are shared equally by the other kinds.
    reorgs_per_kind: int


CI = ChaosSize("ci", deals=30, fault_seconds=30.0, watcher_outage_seconds=6.0, refund_timeout_seconds=10,
               drain_seconds=180.0, test_timeout=480, reorgs_per_kind=4)  # fmt: skip
LONG = ChaosSize("long", deals=200, fault_seconds=120.0, watcher_outage_seconds=15.0, refund_timeout_seconds=15,
                 drain_seconds=420.0, test_timeout=1500, reorgs_per_kind=15)  # fmt: skip
BLOCK_INTERVAL = 0.4
#: How long a reorg in WAITING, its chain held, waits for the engine to see the deal in WAITING.
HOLD_WAIT = 20.0


def chaos_size() -> ChaosSize:
    return LONG if os.environ.get("OTC_CHAOS_LONG") == "1" else CI


def chaos_seed() -> int:
    text = os.environ.get("OTC_CHAOS_SEED")
    return int(text) if text else secrets.randbelow(2**32)


# --------------------------------------------------------------------------- servers and chains


class ChaosServers:
    """NATS and PostgreSQL for this run alone: they are restarted mid-run, so never the session's shared ones."""

    def __init__(self, work_dir: Path) -> None:
        tag = secrets.token_hex(3)
        self.nats = start_nats(work_dir / f"chaos-nats-{tag}", free_port(), work_dir / f"chaos-nats-{tag}.log")
        # Not under pytest's tmp folder: a later pytest session resets its mode to 0700, which cuts off the
        # server's unprivileged user from its data (see conftest.pg_url).
        self.pg_dir = Path(tempfile.mkdtemp(prefix="otc-chaos-pg-"))
        os.chmod(self.pg_dir, 0o755)
        try:
            self.pg = start_postgres(self.pg_dir / "data", work_dir / f"chaos-pg-{tag}.log")
        except BaseException:
            self.nats.stop()
            raise
        self.database_url = ""

    async def create_database(self) -> str:
        admin = await asyncpg.connect(self.pg.url)
        try:
            await admin.execute('CREATE DATABASE "otc_chaos"')
        finally:
            await admin.close()
        self.database_url = with_database(self.pg.url, "otc_chaos")
        return self.database_url

    async def restart(self, server: ManagedServer) -> float:
        """Stops the server and starts it again on the same port and data; the seconds it was away."""
        started = time.monotonic()
        await asyncio.to_thread(server.stop)
        # Launched from the event loop's thread: the parent-death signal is tied to the launching thread.
        server.launch()
        await asyncio.to_thread(server.wait_ready)
        return time.monotonic() - started

    def stop(self) -> None:
        for server in (self.nats, self.pg):
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(self.pg_dir, ignore_errors=True)


async def rpc_batch(chain: Chain, calls: list[tuple[str, list[Any]]]) -> list[Any]:
    """Several anvil JSON-RPC calls in one request, results in order."""
    results: list[Any] = []
    for start in range(0, len(calls), 200):
        chunk = calls[start : start + 200]
        body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(chunk)]
        replies = (await chain.client.post(chain.url, json=body)).json()
        by_id = {reply["id"]: reply for reply in replies}
        for i, (method, _) in enumerate(chunk):
            if "error" in by_id[i]:
                raise RuntimeError(f"{method}: {by_id[i]['error']}")
            results.append(by_id[i]["result"])
    return results


class BlockLog:
    """When each height came into being, on this machine's clock.

    Every block is made by a call of this module, so the moment just before the call that first took a chain
    to height H is a lower bound of when H existed anywhere: nothing can have seen H earlier.
    """

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[float, int]]] = defaultdict(list)

    def note(self, chain: str, before: float, height: int) -> None:
        self.records[chain].append((before, height))

    def reached(self, chain: str, height: int) -> float | None:
        for before, seen in self.records[chain]:
            if seen >= height:
                return before
        return None


class ChaosMiner:
    """Mines a block on each chain every `interval` seconds, except on a chain a scenario holds.

    A hold keeps a chain's blocks back so that a deposit or a payout can be caught with one confirmation; the
    holder mines and reorganises that chain itself, through the same log.
    """

    def __init__(self, evm: dict[str, Chain], devnet: UnicityDevnet, log: BlockLog, interval: float) -> None:
        self.evm = evm
        self.devnet = devnet
        self.log = log
        self.interval = interval
        self.locks = {chain: asyncio.Lock() for chain in CHAINS}
        #: Held while a reorg rewrites a chain: a transaction sent to the node meanwhile can be lost (anvil hands out
        #: a nonce the re-included transactions then take), so deposits wait for it.
        self.rewriting = {chain: asyncio.Lock() for chain in CHAINS}
        self.blocks: Counter[str] = Counter()
        self.held_seconds: defaultdict[str, float] = defaultdict(float)
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def height(self, chain: str) -> int:
        if chain == "UNICITY":
            return await self.devnet.height()
        return await self.evm[chain].height()

    async def begin(self) -> None:
        now = time.time()
        for chain in CHAINS:
            self.log.note(chain, now, await self.height(chain))
        self._task = asyncio.create_task(self._run())

    async def mine(self, chain: str, blocks: int = 1) -> int:
        """Mines on a chain whose lock the caller holds; the new height."""
        before = time.time()
        if chain == "UNICITY":
            await self.devnet.mine(blocks)
        else:
            await self.evm[chain].call("anvil_mine", hex(blocks))
        height = await self.height(chain)
        self.log.note(chain, before, height)
        self.blocks[chain] += blocks
        return height

    async def reorg_unicity(self, drop_txid: str) -> None:
        """Replaces the devnet's tip block (two new ones, without `drop_txid`); the caller holds the chain."""
        before = time.time()
        async with self.rewriting["UNICITY"]:
            await self.devnet.reorg(1, [drop_txid])
        self.log.note("UNICITY", before, await self.height("UNICITY"))
        self.blocks["UNICITY"] += 2

    @contextlib.asynccontextmanager
    async def hold(self, chain: str) -> AsyncIterator[None]:
        async with self.locks[chain]:
            started = time.monotonic()
            try:
                yield
            finally:
                self.held_seconds[chain] += time.monotonic() - started

    async def _run(self) -> None:
        while True:
            for chain in CHAINS:
                lock = self.locks[chain]
                if lock.locked():
                    continue
                async with lock:
                    try:
                        await self.mine(chain)
                    except Exception as exc:
                        self.errors.append(f"{chain}: {exc!r}")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


async def evm_reorg_dropping(chain: Chain, txid: str) -> list[str]:
    """Replaces the tip block by one at the same height holding the same transactions but `txid`.

    Later transactions of the same sender in that block go too (their nonces would no longer fit); the hashes
    of all dropped transactions are returned. The caller holds the chain, so the tip is the block it mined.
    """
    block = await chain.call("eth_getBlockByNumber", "latest", True)
    txs = block["transactions"]
    target = next((tx for tx in txs if tx["hash"] == txid), None)
    if target is None:
        raise AssertionError(f"{txid} is not in the tip block {int(block['number'], 16)}")
    sender, nonce = target["from"].lower(), int(target["nonce"], 16)
    dropped = [tx["hash"] for tx in txs if tx["from"].lower() == sender and int(tx["nonce"], 16) >= nonce]
    kept = [tx["hash"] for tx in txs if tx["hash"] not in dropped]
    raws = await rpc_batch(chain, [("eth_getRawTransactionByHash", [h]) for h in kept])
    await chain.call("anvil_reorg", 1, [[raw, 0] for raw in raws])
    receipts = await rpc_batch(chain, [("eth_getTransactionReceipt", [h]) for h in kept + dropped])
    lost = [h for h, receipt in zip(kept, receipts, strict=False) if receipt is None]
    back = [h for h, receipt in zip(dropped, receipts[len(kept) :], strict=True) if receipt is not None]
    if lost or back:
        raise AssertionError(f"reorg on {chain.url}: kept transactions lost {lost}, dropped ones still mined {back}")
    return dropped


# --------------------------------------------------------------------------- the gateway, tolerant of its deaths


class RpcFailure(Exception):
    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(f"{method}: {error}")
        self.error = error


class TolerantRpc:
    """JSON-RPC to the gateway, which may be killed at any moment: unanswered calls are retried until a deadline.

    Retried: no connection, no answer, a non-200 reply, and the errors that mean nothing was done (1010, the
    engine did not answer; -32603, internal error). A retried createDeal may leave an unanswered deal behind in
    CREATED; nobody deposits into it, so it holds no money.
    """

    RETRIED = frozenset({1010, -32603})

    def __init__(self, url: str) -> None:
        self.url = url + "/rpc"
        self.client = httpx.AsyncClient(timeout=10, trust_env=False)
        self.retries = 0
        self._ids = 0

    async def call(
        self, method: str, params: dict[str, Any], *, within: float = 120.0, accept: Iterable[int] = ()
    ) -> Any:
        """The result; None when the error code is in `accept`."""
        deadline = time.monotonic() + within
        last: object = None
        while True:
            self._ids += 1
            body = {"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params}
            try:
                response = await self.client.post(self.url, json=body)
                if response.status_code == 200:
                    reply = response.json()
                    error = reply.get("error")
                    if error is None:
                        return reply["result"]
                    if error["code"] in accept:
                        return None
                    if error["code"] not in self.RETRIED:
                        raise RpcFailure(method, error)
                last = response.text[:200]
            except httpx.HTTPError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} unanswered for {within:.0f}s: {last!r}")
            self.retries += 1
            await asyncio.sleep(0.3)

    async def close(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------- the deal mix


@dataclass(frozen=True)
class Side:
    chain: str
    asset: str
    amount: int

    @property
    def native(self) -> bool:
        return NATIVE[self.chain] == self.asset

    @property
    def commission(self) -> int:
        return self.amount * COMMISSION_BPS // 10_000 + FIXED_FEE.get(self.asset, 0)

    @property
    def required(self) -> int:
        return self.amount + self.commission + FEE_RESERVE.get(self.asset, 0)

    def text(self) -> str:
        return format_amount(self.amount, DECIMALS[self.asset])


@dataclass(frozen=True)
class DealSpec:
    number: int
    kind: str
    sides: dict[str, Side]
    timeout: int
    #: Seconds after the start of the run.
    starts_at: float
    #: The party whose chain a reorg scenario reorganises.
    reorg_party: str | None = None

    @property
    def expected(self) -> str:
        return "SWAPPED" if self.kind in SWAPPED_KINDS else "REFUNDED"


@dataclass
class ChaosDeal:
    spec: DealSpec
    id: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    payback: dict[str, str] = field(default_factory=dict)
    recipient: dict[str, str] = field(default_factory=dict)
    escrow: dict[str, str] = field(default_factory=dict)
    #: (party, txid, amount) of every deposit sent, including any a reorg dropped.
    deposits: list[tuple[str, str, int]] = field(default_factory=list)
    late: tuple[str, int] | None = None
    #: What the reorg scenarios saw: "waiting seen", "collection again", "payout mined", "payout reorged", ...
    notes: list[str] = field(default_factory=list)
    #: The payout a reorg in SWAP took out of the chain.
    reorged_payout: str | None = None
    dropped: list[str] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    opened_at: float = 0.0
    finished_at: float | None = None

    def side(self, party: str) -> Side:
        return self.spec.sides[party]

    def label(self) -> str:
        a, b = self.side("ALICE"), self.side("BOB")
        return (
            f"#{self.spec.number} {self.spec.kind} {self.id} {a.chain}/{a.asset} {a.text()} <-> "
            f"{b.chain}/{b.asset} {b.text()}"
        )


def _amount(rng: random.Random, asset: str, span: dict[str, tuple[int, int]]) -> int:
    low, high = span[asset]
    # Round to a few significant digits, as people type amounts.
    step = 10 ** max(0, DECIMALS[asset] - 4)
    amount: int = max(step, rng.randrange(low, high) // step * step)
    return amount


def plan_deals(size: ChaosSize, rng: random.Random) -> list[DealSpec]:
    """`size.deals` deals of every kind, spread over the assets and chains, starting evenly."""
    reorg_kinds = ["reorg_waiting", "reorg_swap"]
    others = [kind for kind in KINDS if kind not in reorg_kinds]
    kinds = reorg_kinds * size.reorgs_per_kind
    kinds += [others[i % len(others)] for i in range(size.deals - len(kinds))]
    rng.shuffle(kinds)
    reorg_chains = {kind: list(CHAINS) for kind in ("reorg_waiting", "reorg_swap")}
    for chains in reorg_chains.values():
        rng.shuffle(chains)
    specs = []
    for number, kind in enumerate(kinds):
        reorg_party = None
        if kind in reorg_chains:
            chain = reorg_chains[kind].pop(0)
            reorg_chains[kind].append(chain)
            # A reorg in SWAP catches a payout from a native escrow: a token escrow's payout waits for tank gas
            # on the very chain that is held.
            own = (chain, NATIVE[chain]) if kind == "reorg_swap" else rng.choice([a for a in ASSETS if a[0] == chain])
            other = rng.choice([a for a in ASSETS if a[0] != chain])
            reorg_party = rng.choice(PARTIES)
            pairs = {reorg_party: own, OTHER[reorg_party]: other}
        else:
            pairs = {"ALICE": rng.choice(ASSETS), "BOB": rng.choice(ASSETS)}
            while pairs["ALICE"] == pairs["BOB"]:
                pairs["BOB"] = rng.choice(ASSETS)
        sides = {
            party: Side(chain, asset, _amount(rng, asset, AMOUNT_RANGE)) for party, (chain, asset) in pairs.items()
        }
        timeout = size.refund_timeout_seconds if kind == "timeout" else 3600
        starts_at = size.fault_seconds * number / size.deals + rng.uniform(0, 0.5)
        specs.append(DealSpec(number, kind, sides, timeout, starts_at, reorg_party))
    return specs


class DealMix:
    """Drives each planned deal through the gateway as its two traders would, and the chains as the test needs."""

    def __init__(
        self, stack: EvmStack, miner: ChaosMiner, rpc: TolerantRpc, rng: random.Random, size: ChaosSize
    ) -> None:
        self.stack = stack
        self.miner = miner
        self.rpc = rpc
        self.rng = rng
        self.size = size
        self.devnet = stack.devnet
        assert self.devnet is not None
        self.evm = {"ETH": stack.eth, "POLYGON": stack.polygon}
        self._funder = 0
        #: Deals that could not even be created and filled, with the reason.
        self.unopened: list[str] = []
        self._raw: dict[str, CTransaction] = {}
        self._senders: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    # ---------------------------------------------------------------- reading the deal

    async def status(self, deal: ChaosDeal) -> dict[str, Any]:
        result: dict[str, Any] = await self.rpc.call("otc.status", {"dealId": deal.id, "token": deal.tokens["ALICE"]})
        return result

    async def wait_for(
        self,
        deal: ChaosDeal,
        test: Callable[[dict[str, Any]], bool],
        within: float,
        what: str,
        *,
        soft: bool = False,
        every: float = 1.0,
    ) -> dict[str, Any] | None:
        """Polls the deal's status until `test` holds; None (soft) or TimeoutError after `within` seconds.

        Once a second by default, as a trader's page would: with dozens of deals open the polling is load on the
        gateway and the engine too. A held chain stalls every deal on it, so waits inside a hold poll faster.
        """
        deadline = time.monotonic() + within
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = await self.status(deal)
            if test(status):
                return status
            await asyncio.sleep(every)
        if soft:
            return None
        raise TimeoutError(f"{deal.label()}: not {what} after {within:.0f}s (stage {status.get('stage')})")

    @staticmethod
    def deposited(status: dict[str, Any], deal: ChaosDeal, party: str) -> int:
        text = status["collection"][party.lower()]["deposited"]
        return parse_amount(text, DECIMALS[deal.side(party).asset]) if text != "0" else 0

    # ---------------------------------------------------------------- acting

    async def open(self, spec: DealSpec) -> ChaosDeal:
        deal = ChaosDeal(spec)
        params = {
            party.lower(): {"chainId": side.chain, "asset": side.asset, "amount": side.text()}
            for party, side in spec.sides.items()
        }
        created = await self.rpc.call("otc.createDeal", {**params, "timeoutSeconds": spec.timeout})
        deal.id = created["dealId"]
        deal.tokens = {"ALICE": created["aliceToken"], "BOB": created["bobToken"]}
        for party in PARTIES:
            deal.payback[party] = fresh_address_on(spec.sides[party].chain)
            deal.recipient[party] = fresh_address_on(spec.sides[OTHER[party]].chain)
        for party in PARTIES:
            # 1008 (filled already) or 1003 (both filled, collection started): an earlier attempt went through
            # but its answer was lost with a killed gateway or engine. The status below says whose details won.
            await self.rpc.call(
                "otc.fillPartyDetails",
                {
                    "dealId": deal.id,
                    "party": party,
                    "token": deal.tokens[party],
                    "paybackAddress": deal.payback[party],
                    "recipientAddress": deal.recipient[party],
                },
                accept={1003, 1008},
            )
        status = await self.status(deal)
        for party in PARTIES:
            view = status[party.lower()]
            if (view["paybackAddress"], view["recipientAddress"]) != (deal.payback[party], deal.recipient[party]):
                raise AssertionError(f"{deal.label()}: {party}'s details are not the ones filled: {view}")
        for party in PARTIES:
            instructions = status["instructions"][party.lower()]
            side = spec.sides[party]
            deal.escrow[party] = instructions["to"]
            required = parse_amount(instructions["amount"], DECIMALS[side.asset])
            commission = parse_amount(instructions["breakdown"]["commission"], DECIMALS[side.asset])
            if (required, commission) != (side.required, side.commission):
                deal.notes.append(f"{party} asked for {required} (commission {commission}), expected {side.required}")
        return deal

    def next_funder(self) -> int:
        self._funder = (self._funder + 1) % len(FUNDERS)
        return FUNDERS[self._funder]

    async def deposit(self, deal: ChaosDeal, party: str, amount: int, *, funder: int | None = None) -> str:
        side = deal.side(party)
        escrow = deal.escrow[party]
        if side.chain == "UNICITY":
            assert self.devnet is not None
            async with self.miner.rewriting["UNICITY"]:
                txid = await self.devnet.faucet(escrow, amount)
        else:
            chain = self.evm[side.chain]
            sender = contracts.anvil_address(self.next_funder() if funder is None else funder)
            if side.native:
                tx = {"from": sender, "to": escrow, "value": hex(amount)}
            else:
                data = ERC20_TRANSFER + escrow[2:].lower().rjust(64, "0") + format(amount, "064x")
                tx = {"from": sender, "to": self.stack.chains.usdt[side.chain], "data": data}
            # Anvil's dev accounts are unlocked and anvil hands out the nonce, but two requests of one sender at
            # the same moment can get the same one: one at a time per sender and chain.
            async with self._senders[(side.chain, sender)], self.miner.rewriting[side.chain]:
                txid = str(await chain.call("eth_sendTransaction", tx))
        deal.deposits.append((party, txid, amount))
        return txid

    async def is_mined(self, chain: str, txid: str) -> bool:
        if chain == "UNICITY":
            assert self.devnet is not None
            return bool((await self.devnet.tx(txid)).get("confirmations"))
        return await self.evm[chain].receipt(txid) is not None

    # ---------------------------------------------------------------- the kinds

    async def drive(self, deal_spec: DealSpec, started: float, deals: list[ChaosDeal]) -> None:
        await asyncio.sleep(max(0.0, started + deal_spec.starts_at - time.monotonic()))
        try:
            deal = await self.open(deal_spec)
        except Exception as exc:
            self.unopened.append(f"#{deal_spec.number} {deal_spec.kind}: {type(exc).__name__}: {exc}")
            return
        deal.opened_at = time.monotonic()
        deals.append(deal)
        try:
            await getattr(self, f"_{deal_spec.kind}")(deal)
            deal.final = (
                await self.wait_for(
                    deal, lambda s: s["stage"] == "CLOSED", self.size.drain_seconds + self.size.fault_seconds, "CLOSED"
                )
                or {}
            )
            if deal.spec.kind == "late" and deal.final.get("outcome") == "SWAPPED":
                await self._late_after_close(deal)
        except Exception as exc:
            deal.error = f"{type(exc).__name__}: {exc}"
        deal.finished_at = time.monotonic()

    async def _happy(self, deal: ChaosDeal) -> None:
        await asyncio.gather(*(self.deposit(deal, p, deal.side(p).required) for p in PARTIES))

    _late = _happy

    async def _overpay(self, deal: ChaosDeal) -> None:
        over = self.rng.choice([("ALICE",), ("BOB",), PARTIES])
        extra = {p: deal.side(p).amount * self.rng.randint(1, 10) // 100 if p in over else 0 for p in PARTIES}
        await asyncio.gather(*(self.deposit(deal, p, deal.side(p).required + extra[p]) for p in PARTIES))

    async def _topup(self, deal: ChaosDeal) -> None:
        short = self.rng.choice([("ALICE",), ("BOB",), PARTIES])
        part = {p: deal.side(p).required * self.rng.randint(30, 70) // 100 for p in short}
        await asyncio.gather(*(self.deposit(deal, p, part.get(p, deal.side(p).required)) for p in PARTIES))
        # The top-up follows once the first part is in a block, so the side is funded by two deposits.
        await self.wait_for(
            deal,
            lambda s: all(self.deposited(s, deal, p) >= part[p] for p in short),
            60,
            "partly funded",
            soft=True,
        )
        await asyncio.gather(*(self.deposit(deal, p, deal.side(p).required - part[p]) for p in short))

    async def _timeout(self, deal: ChaosDeal) -> None:
        funded = self.rng.choice(PARTIES)
        await self.deposit(deal, funded, deal.side(funded).required)
        if self.rng.random() < 0.5:
            # The other side pays something, not enough: refunded too.
            await self.deposit(deal, OTHER[funded], deal.side(OTHER[funded]).required // 3)

    async def _late_after_close(self, deal: ChaosDeal) -> None:
        party = self.rng.choice(PARTIES)
        amount = _amount(self.rng, deal.side(party).asset, LATE_RANGE)
        deal.late = (party, amount)
        await self.deposit(deal, party, amount)
        payback = deal.payback[party].lower()

        def returned(status: dict[str, Any]) -> bool:
            return any(
                t["purpose"] == "LATE_RETURN" and t["to"].lower() == payback and t["status"] == "CONFIRMED"
                for t in status["transfers"]
            )

        deal.final = await self.wait_for(deal, returned, self.size.drain_seconds, "late deposit returned") or {}

    async def _reorg_waiting(self, deal: ChaosDeal) -> None:
        """The last deposit is reorganised out while the deal waits for its confirmations; then paid again.

        The chain is held from before that deposit until the reorg, so the deposit stays at one confirmation
        (below every threshold); nothing the holder waits for needs another chain to move.
        """
        assert deal.spec.reorg_party is not None
        party = deal.spec.reorg_party
        other = OTHER[party]
        chain = deal.side(party).chain
        needed = deal.side(other).required
        await self.deposit(deal, other, needed)
        await self.wait_for(deal, lambda s: self.deposited(s, deal, other) >= needed, 60, "other side mined", soft=True)
        async with self.miner.hold(chain):
            funder = REORG_FUNDER if chain != "UNICITY" else None
            txid = await self.deposit(deal, party, deal.side(party).required, funder=funder)
            await self.miner.mine(chain)
            if not await self.is_mined(chain, txid):
                raise AssertionError(f"{deal.label()}: deposit {txid} not in the block mined for it")
            waiting = await self.wait_for(
                deal, lambda s: s["stage"] == "WAITING", HOLD_WAIT, "WAITING", soft=True, every=0.2
            )
            if waiting:
                deal.notes.append("waiting seen")
            if chain == "UNICITY":
                await self.miner.reorg_unicity(txid)
                deal.dropped = [txid]
            else:
                async with self.miner.rewriting[chain]:
                    deal.dropped = await evm_reorg_dropping(self.evm[chain], txid)
            deal.notes.append("deposit reorged")
        if await self.wait_for(deal, lambda s: s["stage"] == "COLLECTION", 60, "COLLECTION again", soft=True):
            deal.notes.append("collection again")
        # The devnet's faucet signs deterministically from the oldest coin, which the reorg freed again: the very
        # same amount would give the very same transaction. A little more makes it a new one (returned as surplus).
        again = deal.side(party).required + (1_000 if chain == "UNICITY" else 0)
        await self.deposit(deal, party, again)

    async def _reorg_swap(self, deal: ChaosDeal) -> None:
        """The payout is reorganised out with one confirmation; the queue must broadcast the same bytes again.

        The other side locks first, then this one. The payout is watched for on the node itself (the pool, the tip
        block), not through the engine, so the chain is held only once it is there: one block mines it if it is
        not mined yet, and a reorg of that block takes it out again.
        """
        assert deal.spec.reorg_party is not None
        party = deal.spec.reorg_party
        other = OTHER[party]
        chain = deal.side(party).chain
        await self.deposit(deal, other, deal.side(other).required)
        await self.wait_for(
            deal, lambda s: s["collection"][other.lower()]["locked"], 60, "other side locked", soft=True
        )
        await self.deposit(deal, party, deal.side(party).required)
        escrow, recipient = deal.escrow[party], deal.recipient[other]
        deadline = time.monotonic() + 120
        while await self.find_payout(chain, escrow, recipient) is None:
            if time.monotonic() > deadline:
                deal.notes.append("payout never seen")
                return
            await asyncio.sleep(0.1)
        async with self.miner.hold(chain):
            found = await self.find_payout(chain, escrow, recipient)
            if found is not None and found[1] is None:
                await self.miner.mine(chain)
                found = await self.find_payout(chain, escrow, recipient)
            if found is None or found[1] != await self.miner.height(chain):
                # Mined before the hold with more than one confirmation: nothing to catch this time.
                deal.notes.append("payout missed")
                return
            payout = found[0]
            deal.notes.append("payout mined")
            if chain == "UNICITY":
                await self.miner.reorg_unicity(payout)
                deal.dropped = [payout]
            else:
                async with self.miner.rewriting[chain]:
                    deal.dropped = await evm_reorg_dropping(self.evm[chain], payout)
            deal.reorged_payout = payout
            deal.notes.append("payout reorged")

    async def find_payout(self, chain: str, escrow: str, recipient: str) -> tuple[str, int | None] | None:
        """A transaction from `escrow` paying `recipient` that the node holds: in its pool (height None) or in its
        tip block."""
        if chain == "UNICITY":
            assert self.devnet is not None
            script = utxo_script_pubkey(recipient, "alpha")
            for entry in await self.devnet.call("blockchain.scripthash.get_history", alpha_scripthash(escrow)):
                raw = self._raw.get(entry["tx_hash"])
                if raw is None:
                    raw = CTransaction.deserialize(
                        bytes.fromhex(await self.devnet.call("blockchain.transaction.get", entry["tx_hash"]))
                    )
                    self._raw[entry["tx_hash"]] = raw
                if any(bytes(out.scriptPubKey) == script for out in raw.vout):
                    return str(entry["tx_hash"]), (int(entry["height"]) if entry["height"] > 0 else None)
            return None
        client = self.evm[chain]
        pending = (await client.call("txpool_content"))["pending"].get(escrow.lower(), {})
        for tx in pending.values():
            if (tx["to"] or "").lower() == recipient.lower():
                return str(tx["hash"]), None
        block = await client.call("eth_getBlockByNumber", "latest", True)
        for tx in block["transactions"]:
            if tx["from"].lower() == escrow.lower() and (tx["to"] or "").lower() == recipient.lower():
                return str(tx["hash"]), int(block["number"], 16)
        return None


# --------------------------------------------------------------------------- faults


@dataclass
class FaultLog:
    kills: Counter[str] = field(default_factory=Counter)
    restarts: dict[str, float] = field(default_factory=dict)
    outage: tuple[str, float] | None = None
    #: (service, exit code) of processes that ended without being killed by the driver.
    unexpected_exits: list[tuple[str, int | None]] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)


class FaultDriver:
    """SIGKILLs a random service every 2-5 s, restarts NATS and PostgreSQL once each, stops a watcher a while.

    Meanwhile it supervises the services as an orchestrator would: one that exits on its own is started again,
    and recorded, since every service is meant to wait out a lost NATS or PostgreSQL rather than give up.
    """

    def __init__(self, stack: EvmStack, servers: ChaosServers, rng: random.Random, size: ChaosSize) -> None:
        self.stack = stack
        self.servers = servers
        self.rng = rng
        self.size = size
        self.log = FaultLog()
        self.down: set[str] = set()
        self._started = time.monotonic()
        self._supervisor: asyncio.Task[None] | None = None
        self._revivals: set[asyncio.Task[None]] = set()

    def note(self, what: str) -> None:
        self.log.timeline.append((time.monotonic() - self._started, what))

    async def run(self) -> None:
        self._started = time.monotonic()
        self._supervisor = asyncio.create_task(self._supervise())
        duration = self.size.fault_seconds
        await asyncio.gather(
            self._kills(duration),
            self._at(self.rng.uniform(0.1, 0.2) * duration, self._watcher_outage),
            self._at(self.rng.uniform(0.3, 0.4) * duration, lambda: self._restart("nats", self.servers.nats)),
            self._at(self.rng.uniform(0.6, 0.7) * duration, lambda: self._restart("postgres", self.servers.pg)),
        )

    async def _at(self, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(delay)
        await action()

    async def _kills(self, duration: float) -> None:
        end = self._started + duration
        while (wait := self.rng.uniform(2.0, 5.0)) < end - time.monotonic():
            await asyncio.sleep(wait)
            name = self.rng.choice([name for name in SERVICES if name not in self.down])
            self.down.add(name)
            self.stack.procs[name].kill()
            self.log.kills[name] += 1
            self.note(f"SIGKILL {name}")
            # Started again a moment later, while the next kill is already on its way.
            revival = asyncio.create_task(self._revive(name, self.rng.uniform(0.2, 1.5)))
            self._revivals.add(revival)
            revival.add_done_callback(self._revivals.discard)
        await asyncio.gather(*self._revivals)

    async def _revive(self, name: str, after: float) -> None:
        await asyncio.sleep(after)
        self.stack.procs[name].spawn()
        self.down.discard(name)

    async def _watcher_outage(self) -> None:
        name = self.rng.choice([w for w in WATCHERS if w not in self.down])
        self.down.add(name)
        self.note(f"stop {name}")
        await self.stack.procs[name].stop()
        await asyncio.sleep(self.size.watcher_outage_seconds)
        self.stack.procs[name].spawn()
        self.down.discard(name)
        self.log.outage = (name, self.size.watcher_outage_seconds)
        self.note(f"start {name}")

    async def _restart(self, what: str, server: ManagedServer) -> None:
        self.note(f"restart {what}")
        self.log.restarts[what] = await self.servers.restart(server)
        self.note(f"{what} back")

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for name in SERVICES:
                proc = self.stack.procs[name]
                if name in self.down or proc.proc is None or proc.proc.poll() is None:
                    continue
                self.log.unexpected_exits.append((name, proc.proc.returncode))
                self.note(f"{name} exited by itself ({proc.proc.returncode})")
                proc.spawn()

    async def settle(self, within: float = 120.0) -> None:
        """Every service running and, as far as it answers in time, ready again; the supervisor keeps watching.

        A service too busy to answer its readiness probe is noted, not fatal: the deals' own deadlines judge it.
        """
        deadline = time.monotonic() + within
        for name in SERVICES:
            while True:
                try:
                    await self.stack.procs[name].wait_ready(max(1.0, deadline - time.monotonic()))
                    break
                except RuntimeError:
                    # It exited while starting: the supervisor starts it again.
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)
                except TimeoutError:
                    self.note(f"{name} running but not ready after the faults")
                    break

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)


# --------------------------------------------------------------------------- the invariant checker


@dataclass
class Flow:
    """One asset's movements through one escrow, read from its chain."""

    came_in: int = 0
    #: Outflows by destination (lower-case EVM address, or the UNICITY output script as hex).
    out: Counter[str] = field(default_factory=Counter)
    fees: int = 0
    remains: int = 0
    #: (height, amount) of every incoming payment.
    deposits: list[tuple[int, int]] = field(default_factory=list)

    def balanced(self) -> bool:
        return self.came_in == sum(self.out.values()) + self.fees + self.remains


@dataclass
class Spend:
    """A transaction sending out of an escrow, as mined."""

    txid: str
    chain: str
    height: int


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    #: The engine's and the queue's records of every deal with a violation, for the post-mortem.
    records: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.violations.append(message)


class InvariantChecker:
    """Reads the chains and the queue's tables after the run and checks, to the base unit:

    1. the right outcome: every deal CLOSED with SWAPPED (happy, top-up, overpay, late deposit, both reorgs) or
       REFUNDED (single-side timeout); a swap pays the counterparty's recipient exactly the trade amount, the
       operator exactly the commission and the payback address the rest; a refund pays nothing to any recipient
       or to the operator; the operator's balances grew by exactly the commissions of the swapped deals;
    2. per escrow and asset: what came in = what went out + what remains + network fees, with nothing left;
       the traded asset goes only to the counterparty's recipient, the operator or the payback address, the
       native gas of a token escrow only back to the tank (its fees are native, its amounts are tokens:
       accounted apart);
    3. no payout twice: every transaction out of an escrow is a candidate the queue signed, and no transfer
       (or UTXO leg) of the queue has two transactions mined;
    4. no payout before its locks: a side is locked at height L = h + threshold - 1, h being the height of the
       deposit that took the confirmed total to the requirement. For a payout on the same chain the chain
       itself says it: its block must be above L. Across chains, heights of different chains cannot be
       compared, and block timestamps do not help either: anvil stamps whole seconds and the devnet stamps
       max(clock, median time past + 1), which runs ahead of the clock at several blocks a second. So the
       comparison is made on this machine's clock: the queue stores each signed transaction with its
       `signed_at` before broadcasting it (its tables), and every block is made by this test, whose
       `BlockLog` holds the moment just before the call that first took the lock's chain to L. A payout
       signed before that moment was certainly broadcast before its lock existed; the check is sound (it
       never blames a correct run) and misses only a signature inside the few milliseconds of that call.
    """

    SWAP_PURPOSES = frozenset({"SWAP_PAYOUT", "COMMISSION", "SURPLUS", "GAS_RETURN"})

    def __init__(
        self, stack: EvmStack, database_url: str, block_log: BlockLog, operator_start: dict[tuple[str, str], int]
    ) -> None:
        self.stack = stack
        assert stack.devnet is not None
        self.devnet = stack.devnet
        self.database_url = database_url
        self.block_log = block_log
        self.operator_start = operator_start
        self.evm = {"ETH": stack.eth, "POLYGON": stack.polygon}
        self._raw: dict[str, CTransaction] = {}

    # ---------------------------------------------------------------- reading

    async def operator_balances(self) -> dict[tuple[str, str], int]:
        balances = {}
        for chain, client in self.evm.items():
            balances[(chain, NATIVE[chain])] = await client.balance(OPERATOR_EVM)
            balances[(chain, "USDT")] = await client.token_balance(self.stack.chains.usdt[chain], OPERATOR_EVM)
        balances[("UNICITY", "ALPHA")] = await self.stack.alpha_balance(ALPHA_ADDRESS)
        return balances

    async def evm_flows(
        self, chain: str, escrows: dict[str, bool]
    ) -> tuple[dict[str, dict[str, Flow]], list[tuple[str, Spend]], list[str]]:
        """Per escrow (lower-case) its flows by asset ("native", "token"), its spends, and reverted transactions."""
        client = self.evm[chain]
        tip = await client.height()
        blocks = await rpc_batch(client, [("eth_getBlockByNumber", [hex(n), True]) for n in range(tip + 1)])
        mine = [
            (int(block["number"], 16), tx)
            for block in blocks
            for tx in block["transactions"]
            if tx["from"].lower() in escrows or (tx["to"] or "").lower() in escrows
        ]
        receipts = await rpc_batch(client, [("eth_getTransactionReceipt", [tx["hash"]]) for _, tx in mine])
        flows: dict[str, dict[str, Flow]] = {e: {"native": Flow(), "token": Flow()} for e in escrows}
        spends: list[tuple[str, Spend]] = []
        reverted: list[str] = []
        for (height, tx), receipt in zip(mine, receipts, strict=True):
            ok = receipt["status"] == "0x1"
            sender, to, value = tx["from"].lower(), (tx["to"] or "").lower(), int(tx["value"], 16)
            if sender in escrows:
                flows[sender]["native"].fees += int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)
                spends.append((sender, Spend(tx["hash"], chain, height)))
                if not ok:
                    reverted.append(tx["hash"])
                elif value:
                    flows[sender]["native"].out[to] += value
            if to in escrows and ok and value:
                flows[to]["native"].came_in += value
                flows[to]["native"].deposits.append((height, value))
        token = self.stack.chains.usdt[chain]
        logs = await client.call(
            "eth_getLogs", {"fromBlock": "0x0", "toBlock": hex(tip), "address": token, "topics": [TRANSFER_TOPIC]}
        )
        for log in logs:
            sender, to = "0x" + log["topics"][1][-40:], "0x" + log["topics"][2][-40:]
            value, height = int(log["data"], 16), int(log["blockNumber"], 16)
            if sender in escrows:
                flows[sender]["token"].out[to] += value
            if to in escrows:
                flows[to]["token"].came_in += value
                flows[to]["token"].deposits.append((height, value))
        for escrow in escrows:
            flows[escrow]["native"].remains = await client.balance(escrow)
            flows[escrow]["token"].remains = await client.token_balance(token, escrow)
        return flows, spends, reverted

    async def raw_tx(self, txid: str) -> CTransaction:
        if txid not in self._raw:
            raw = await self.devnet.call("blockchain.transaction.get", txid)
            self._raw[txid] = CTransaction.deserialize(bytes.fromhex(raw))
        return self._raw[txid]

    async def utxo_flow(self, escrow: str) -> tuple[Flow, list[Spend], int]:
        """The escrow's ALPHA flow, its spends, and how many of its transactions are still unconfirmed."""
        script = utxo_script_pubkey(escrow, "alpha")
        flow = Flow()
        spends = []
        unconfirmed = 0
        for entry in await self.devnet.call("blockchain.scripthash.get_history", alpha_scripthash(escrow)):
            if entry["height"] <= 0:
                unconfirmed += 1
                continue
            tx = await self.raw_tx(entry["tx_hash"])
            spent = 0
            for vin in tx.vin:
                funding = await self.raw_tx(b2lx(vin.prevout.hash))
                if bytes(funding.vout[vin.prevout.n].scriptPubKey) == script:
                    spent += funding.vout[vin.prevout.n].nValue
            if spent:
                if len(tx.vin) != 1:
                    raise AssertionError(f"{entry['tx_hash']} spends {len(tx.vin)} inputs on Alpha")
                flow.fees += spent - sum(out.nValue for out in tx.vout)
                for out in tx.vout:
                    if bytes(out.scriptPubKey) != script:
                        flow.out[bytes(out.scriptPubKey).hex()] += out.nValue
                spends.append(Spend(entry["tx_hash"], "UNICITY", entry["height"]))
            else:
                for out in tx.vout:
                    if bytes(out.scriptPubKey) == script:
                        flow.came_in += out.nValue
                        flow.deposits.append((entry["height"], out.nValue))
        balance = await self.devnet.call("blockchain.scripthash.get_balance", alpha_scripthash(escrow))
        flow.remains = int(balance["confirmed"]) + int(balance["unconfirmed"])
        return flow, spends, unconfirmed

    async def queue_records(self) -> tuple[dict[str, tuple[str, int, int]], dict[str, datetime]]:
        """txid -> (transfer_id, leg, seq) of every candidate the queue signed; transfer_id -> first signed_at."""
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                """SELECT txid, transfer_id, 0 AS leg, seq, signed_at FROM queue.candidates
                   UNION ALL SELECT txid, transfer_id, leg, seq, signed_at FROM queue.utxo_candidates"""
            )
        finally:
            await conn.close()
        candidates = {r["txid"].lower(): (r["transfer_id"], r["leg"], r["seq"]) for r in rows}
        first: dict[str, datetime] = {}
        for r in rows:
            if r["transfer_id"] not in first or r["signed_at"] < first[r["transfer_id"]]:
                first[r["transfer_id"]] = r["signed_at"]
        return candidates, first

    async def stored_raws(self, txids: list[str]) -> dict[str, bytes]:
        """The signed bytes the queue stored for these transactions."""
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                """SELECT txid, raw FROM queue.candidates WHERE txid = ANY($1::text[])
                   UNION ALL SELECT txid, raw FROM queue.utxo_candidates WHERE txid = ANY($1::text[])""",
                txids,
            )
        finally:
            await conn.close()
        return {r["txid"].lower(): bytes(r["raw"]) for r in rows}

    async def records_of(self, deal_ids: list[str]) -> list[str]:
        """The engine's events, deposits and transfers and the queue's candidates of these deals, as text."""
        conn = await asyncpg.connect(self.database_url)
        lines = []
        try:
            for deal_id in deal_ids:
                lines.append(f"--- {deal_id}")
                for r in await conn.fetch(
                    "SELECT at, type, detail FROM engine.deal_events WHERE deal_id = $1 ORDER BY id", deal_id
                ):
                    lines.append(f"event {r['at'].isoformat()} {r['type']} {r['detail']}")
                for r in await conn.fetch(
                    """SELECT party, chain, txid, idx, amount, block_number, first_seen FROM engine.deposits
                       WHERE deal_id = $1 ORDER BY first_seen""",
                    deal_id,
                ):
                    lines.append(f"deposit {dict(r)}")
                for r in await conn.fetch(
                    """SELECT transfer_id, status, txid, amount, amount_sent, fee_paid, confirmations, reason,
                              created_at, updated_at FROM engine.transfers WHERE deal_id = $1 ORDER BY created_at""",
                    deal_id,
                ):
                    lines.append(f"transfer {dict(r)}")
                for r in await conn.fetch(
                    """SELECT t.transfer_id, t.status, c.txid, c.seq, c.signed_at, c.mined_block FROM queue.transfers t
                       JOIN queue.utxo_candidates c USING (transfer_id) WHERE t.deal_id = $1
                       UNION ALL
                       SELECT t.transfer_id, t.status, c.txid, c.seq, c.signed_at, c.mined_block FROM queue.transfers t
                       JOIN queue.candidates c USING (transfer_id) WHERE t.deal_id = $1""",
                    deal_id,
                ):
                    lines.append(f"queue {dict(r)}")
                for schema, evm in WATCHER_SCHEMAS:
                    lines += await self._watcher_records(conn, schema, evm, deal_id)
        finally:
            await conn.close()
        return lines

    @staticmethod
    async def _watcher_records(conn: asyncpg.Connection, schema: str, evm: bool, deal_id: str) -> list[str]:
        """A watcher's view of a deal's escrows: when each was watched, its baseline and what was published."""
        baseline = (", b.balance, b.version", f"LEFT JOIN {schema}.balances b USING (address)") if evm else ("", "")
        try:
            watched = await conn.fetch(
                f"""SELECT w.address, w.party, w.asset, w.added_at{baseline[0]} FROM {schema}.watch_set w
                    {baseline[1]} WHERE w.deal_id = $1""",
                deal_id,
            )
            published = await conn.fetch(
                f"""SELECT p.* FROM {schema}.published p JOIN {schema}.watch_set w USING (address)
                    WHERE w.deal_id = $1 ORDER BY p.block_number""",
                deal_id,
            )
        except asyncpg.PostgresError as exc:
            return [f"{schema}: {exc}"]
        return [f"{schema} watched {dict(r)}" for r in watched] + [f"{schema} published {dict(r)}" for r in published]

    async def engine_transfers(self) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return list(
                await conn.fetch(
                    "SELECT transfer_id, deal_id, party, chain, purpose, status, txid, amount FROM engine.transfers"
                )
            )
        finally:
            await conn.close()

    # ---------------------------------------------------------------- checking

    @staticmethod
    def destination(chain: str, address: str) -> str:
        if chain == "UNICITY":
            return utxo_script_pubkey(address, "alpha").hex()
        return address.lower()

    async def check(self, deals: list[ChaosDeal]) -> Report:
        report = Report()
        candidates, first_signed = await self.queue_records()
        raws = await self.stored_raws([d.reorged_payout for d in deals if d.reorged_payout])
        transfers = await self.engine_transfers()
        purpose_of = {t["transfer_id"]: t["purpose"] for t in transfers}
        # Tank gas too little to pay for its own return stays in the escrow, once the queue skipped it as dust.
        dust_gas = {
            (t["deal_id"], t["party"]): int(t["amount"])
            for t in transfers
            if t["purpose"] == "GAS_RETURN" and t["status"] == "SKIPPED"
        }

        # Read every escrow's flows once, chain by chain.
        flows: dict[tuple[str, str], dict[str, Flow]] = {}
        spends: dict[tuple[str, str], list[Spend]] = defaultdict(list)
        for chain in ("ETH", "POLYGON"):
            escrows = {
                d.escrow[p].lower(): d.side(p).native for d in deals for p in PARTIES if d.side(p).chain == chain
            }
            chain_flows, chain_spends, reverted = await self.evm_flows(chain, escrows)
            for escrow, by_asset in chain_flows.items():
                flows[(chain, escrow)] = by_asset
            for escrow, spend in chain_spends:
                spends[(chain, escrow)].append(spend)
            for txid in reverted:
                report.fail(f"{chain}: transaction {txid} out of an escrow reverted")
        for deal in deals:
            for party in PARTIES:
                if deal.side(party).chain == "UNICITY":
                    flow, utxo_spends, unconfirmed = await self.utxo_flow(deal.escrow[party])
                    flows[("UNICITY", deal.escrow[party])] = {"native": flow, "token": Flow()}
                    spends[("UNICITY", deal.escrow[party])] = utxo_spends
                    if unconfirmed:
                        report.fail(f"{deal.label()}: {unconfirmed} unconfirmed transactions at the {party} escrow")

        commissions: Counter[tuple[str, str]] = Counter()
        lock_latencies: list[float] = []
        slowest: list[tuple[float, str]] = []
        for deal in deals:
            if deal.error:
                report.fail(f"{deal.label()}: {deal.error}")
            for note in deal.notes:
                if note.startswith(("ALICE asked", "BOB asked")):
                    report.fail(f"{deal.label()}: {note}")
            outcome = deal.final.get("outcome")
            if deal.final.get("stage") != "CLOSED" or outcome != deal.spec.expected:
                report.fail(
                    f"{deal.label()}: {deal.final.get('stage')}/{outcome}, expected CLOSED/{deal.spec.expected}"
                )
            for t in deal.final.get("transfers", []):
                if t["status"] not in ("CONFIRMED", "SKIPPED"):
                    report.fail(f"{deal.label()}: transfer {t['purpose']} on {t['chainId']} ended {t['status']}")
            swapped = deal.spec.expected == "SWAPPED"
            locks: dict[str, tuple[str, int]] = {}
            keys = {p: (deal.side(p).chain, self._key(deal.side(p).chain, deal.escrow[p])) for p in PARTIES}
            for party in PARTIES:
                side = deal.side(party)
                by_asset = flows[keys[party]]
                flow = by_asset["native" if side.native else "token"]
                where = f"{deal.label()} {party} escrow {deal.escrow[party]}"
                self._check_flow(report, where, side, deal, party, flow, swapped)
                if not side.native:
                    gas = by_asset["native"]
                    if not gas.balanced() or gas.remains not in (0, dust_gas.get((deal.id, party))):
                        report.fail(f"{where}: tank gas in {gas.came_in}, fees {gas.fees}, left {gas.remains}")
                    strays = {d for d in gas.out if d != tank_address().lower()}
                    if strays:
                        report.fail(f"{where}: native gas sent to {sorted(strays)}, not to the tank")
                if swapped:
                    commissions[(side.chain, side.asset)] += side.commission
                    lock = self._lock_height(flow, side)
                    if lock is None:
                        report.fail(f"{where}: swapped but its deposits never reach {side.required}")
                    else:
                        locks[party] = (side.chain, lock)
                if deal.spec.kind == "topup" and swapped and party in self._short(deal) and len(flow.deposits) < 2:
                    report.fail(f"{where}: paid in two parts, but {len(flow.deposits)} deposit(s) on chain")
            for party in PARTIES:
                where = f"{deal.label()} {party} escrow {deal.escrow[party]}"
                # Every transaction out of the escrow was signed by the queue, once per transfer leg.
                seen: Counter[tuple[str, int]] = Counter()
                for spend in spends[keys[party]]:
                    known = candidates.get(spend.txid.lower())
                    if known is None:
                        report.fail(f"{where}: {spend.txid} left the escrow but the queue never signed it")
                        continue
                    seen[(known[0], known[1])] += 1
                    purpose = purpose_of.get(known[0])
                    if swapped and purpose in self.SWAP_PURPOSES:
                        latency = self._check_lock(report, where, spend, first_signed.get(known[0]), locks)
                        if purpose == "SWAP_PAYOUT":
                            lock_latencies += latency
                            slowest += [(late, deal.label()) for late in latency]
                for (transfer_id, leg), count in seen.items():
                    if count > 1:
                        report.fail(f"{where}: transfer {transfer_id} leg {leg} mined {count} times")
                if not swapped and any(purpose_of.get(c[0]) == "SWAP_PAYOUT" for c in seen):
                    report.fail(f"{where}: a refunded deal has a swap payout")
            await self._check_recipients(report, deal, swapped)
            await self._check_reorg(report, deal, candidates, spends, raws)
            await self.check_dropped(report, deal)
            await self.check_deposits_mined(report, deal)

        failing = sorted({d.id for d in deals for v in report.violations if d.id and d.id in v})
        if failing:
            report.records = await self.records_of(failing)
        ending = await self.operator_balances()
        for key, start in self.operator_start.items():
            grew = ending[key] - start
            if grew != commissions[key]:
                report.fail(
                    f"operator on {key[0]} received {grew} {key[1]}, the commissions add up to {commissions[key]}"
                )
        if lock_latencies:
            report.figures["lock_to_signed_ms"] = (
                round(statistics.median(lock_latencies) * 1000),
                round(max(lock_latencies) * 1000),
            )
            report.figures["slowest_payouts"] = [f"{late:.1f}s {label}" for late, label in sorted(slowest)[-3:]]
        return report

    @staticmethod
    def _key(chain: str, escrow: str) -> str:
        return escrow if chain == "UNICITY" else escrow.lower()

    @staticmethod
    def _short(deal: ChaosDeal) -> set[str]:
        """The parties of a top-up deal that paid in two parts."""
        counts = Counter(party for party, _, _ in deal.deposits)
        return {party for party, n in counts.items() if n > 1}

    def _check_flow(
        self, report: Report, where: str, side: Side, deal: ChaosDeal, party: str, flow: Flow, swapped: bool
    ) -> None:
        recipient = self.destination(side.chain, deal.recipient[OTHER[party]])
        operator = self.destination(side.chain, ALPHA_ADDRESS if side.chain == "UNICITY" else OPERATOR_EVM)
        payback = self.destination(side.chain, deal.payback[party])
        fees = flow.fees if side.native else 0
        if not flow.balanced():
            report.fail(
                f"{where}: in {flow.came_in} != out {sum(flow.out.values())} + fees {flow.fees} + left {flow.remains}"
            )
        if flow.remains:
            report.fail(f"{where}: {flow.remains} left in the escrow")
        strays = set(flow.out) - {recipient, operator, payback}
        if strays:
            report.fail(f"{where}: paid to {sorted(strays)}, none of recipient, operator, payback")
        if swapped:
            expected = {
                recipient: side.amount,
                operator: side.commission,
                payback: flow.came_in - side.amount - side.commission - fees,
            }
        else:
            expected = {recipient: 0, operator: 0, payback: flow.came_in - fees}
        for destination, amount in expected.items():
            if flow.out[destination] != amount:
                role = {recipient: "recipient", operator: "operator", payback: "payback"}[destination]
                report.fail(f"{where}: {role} got {flow.out[destination]}, expected {amount}")

    @staticmethod
    def _lock_height(flow: Flow, side: Side) -> int | None:
        total = 0
        for height, amount in sorted(flow.deposits):
            total += amount
            if total >= side.required:
                return height + THRESHOLD[side.chain] - 1
        return None

    def _check_lock(
        self, report: Report, where: str, spend: Spend, signed: datetime | None, locks: dict[str, tuple[str, int]]
    ) -> list[float]:
        """Checks one payout against both locks; how long after the later lock block it was signed."""
        if len(locks) < 2:
            return []
        reached_all = []
        for chain, lock_height in locks.values():
            if chain == spend.chain and spend.height <= lock_height:
                report.fail(f"{where}: {spend.txid} mined at {spend.height}, the lock on {chain} is at {lock_height}")
            reached = self.block_log.reached(chain, lock_height)
            if signed is None or reached is None:
                report.fail(f"{where}: {spend.txid}: no signing time, or {chain} never reached {lock_height}")
                return []
            if signed.timestamp() < reached:
                report.fail(
                    f"{where}: {spend.txid} signed {reached - signed.timestamp():.3f}s before {chain} reached "
                    f"the lock height {lock_height}"
                )
            reached_all.append(reached)
        assert signed is not None
        return [signed.timestamp() - max(reached_all)]

    async def _check_recipients(self, report: Report, deal: ChaosDeal, swapped: bool) -> None:
        """Fresh addresses: what each recipient holds now is all it was ever paid."""
        for party in PARTIES:
            paying = deal.side(OTHER[party])
            address = deal.recipient[party]
            if paying.chain == "UNICITY":
                held = await self.stack.alpha_balance(address)
            elif paying.native:
                held = await self.evm[paying.chain].balance(address)
            else:
                held = await self.evm[paying.chain].token_balance(self.stack.chains.usdt[paying.chain], address)
            expected = paying.amount if swapped else 0
            if held != expected:
                report.fail(f"{deal.label()}: {party}'s recipient holds {held}, expected {expected}")

    async def _check_reorg(
        self,
        report: Report,
        deal: ChaosDeal,
        candidates: dict[str, tuple[str, int, int]],
        spends: dict[tuple[str, str], list[Spend]],
        raws: dict[str, bytes],
    ) -> None:
        """The payout a reorg took out is mined again as the very bytes the queue stored (unless it bumped it)."""
        if deal.reorged_payout is None:
            return
        party = deal.spec.reorg_party
        assert party is not None
        side = deal.side(party)
        mined = {s.txid.lower() for s in spends[(side.chain, self._key(side.chain, deal.escrow[party]))]}
        transfer_id, leg, _ = candidates.get(deal.reorged_payout.lower(), ("?", 0, 0))
        bumped = [c for c in candidates.values() if c[0] == transfer_id and c[1] == leg and c[2] > 0]
        if deal.reorged_payout.lower() not in mined and not bumped:
            report.fail(f"{deal.label()}: the reorged payout {deal.reorged_payout} was not broadcast again")
        if deal.reorged_payout.lower() in mined:
            stored = raws.get(deal.reorged_payout.lower())
            if side.chain == "UNICITY":
                on_chain = bytes.fromhex(await self.devnet.call("blockchain.transaction.get", deal.reorged_payout))
            else:
                text = await self.evm[side.chain].call("eth_getRawTransactionByHash", deal.reorged_payout)
                on_chain = bytes.fromhex(text[2:])
            if stored != on_chain:
                report.fail(f"{deal.label()}: the payout mined again is not the bytes the queue stored")

    async def check_deposits_mined(self, report: Report, deal: ChaosDeal) -> None:
        """Every deposit sent is on its chain, unless a reorg of this test dropped it (then it was sent again)."""
        for party, txid, _ in deal.deposits:
            if txid in deal.dropped:
                continue
            chain = deal.side(party).chain
            if chain == "UNICITY":
                history = await self.devnet.call(
                    "blockchain.scripthash.get_history", alpha_scripthash(deal.escrow[party])
                )
                mined = any(entry["tx_hash"] == txid and entry["height"] > 0 for entry in history)
            else:
                mined = await self.evm[chain].receipt(txid) is not None
            if not mined:
                report.fail(f"{deal.label()}: the {party} deposit {txid} was never mined (lost by the node)")

    async def check_dropped(self, report: Report, deal: ChaosDeal) -> None:
        """A deposit a reorg dropped (and that nobody sent again) is on no chain."""
        if deal.spec.reorg_party is None or deal.reorged_payout is not None:
            return
        chain = deal.side(deal.spec.reorg_party).chain
        for txid in deal.dropped:
            if chain == "UNICITY":
                escrow = deal.escrow[deal.spec.reorg_party]
                history = await self.devnet.call("blockchain.scripthash.get_history", alpha_scripthash(escrow))
                if any(entry["tx_hash"] == txid for entry in history):
                    report.fail(f"{deal.label()}: the dropped deposit {txid} is back on UNICITY")
            elif await self.evm[chain].receipt(txid) is not None:
                report.fail(f"{deal.label()}: the dropped deposit {txid} is back on {chain}")


# --------------------------------------------------------------------------- the run


@dataclass
class ChaosResult:
    size: ChaosSize
    seed: int
    deals: list[ChaosDeal]
    faults: FaultLog
    report: Report
    timings: dict[str, float]
    blocks: Counter[str]
    held: dict[str, float]
    rpc_retries: int
    miner_errors: list[str]

    def details(self) -> str:
        """One line per deal, then the fault timeline: for the log of a failed run."""
        lines = [
            f"{d.label()}: {d.final.get('stage')}/{d.final.get('outcome')} in "
            f"{(d.finished_at or d.opened_at) - d.opened_at:.1f}s notes={d.notes} error={d.error}"
            for d in self.deals
        ]
        lines += [
            f"slowest swap payout after its locks: {line}" for line in self.report.figures.get("slowest_payouts", [])
        ]
        lines += [f"{at:7.1f}s {what}" for at, what in self.faults.timeline]
        return "\n".join(lines)

    def summary(self) -> str:
        kinds = Counter(d.spec.kind for d in self.deals)
        outcomes = Counter(f"{d.spec.kind}:{d.final.get('outcome')}" for d in self.deals)
        reorgs = Counter(note for d in self.deals for note in d.notes if not note.startswith(("ALICE", "BOB")))
        chains = Counter(d.side(p).chain for d in self.deals for p in PARTIES)
        lines = [
            f"chaos ({self.size.name}, seed {self.seed}): {len(self.deals)} deals, {len(self.report.violations)} "
            f"violations",
            "  kinds: " + ", ".join(f"{k} {kinds[k]}" for k in KINDS),
            "  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
            "  sides per chain: " + ", ".join(f"{c} {chains[c]}" for c in CHAINS),
            "  reorg scenarios: " + (", ".join(f"{k} {v}" for k, v in sorted(reorgs.items())) or "none"),
            f"  faults: {sum(self.faults.kills.values())} SIGKILLs ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.kills.items()))
            + "), "
            + ", ".join(f"{k} restarted in {v:.1f}s" for k, v in self.faults.restarts.items())
            + (f", {self.faults.outage[0]} stopped {self.faults.outage[1]:.0f}s" if self.faults.outage else ""),
            f"  services that exited by themselves: {Counter(n for n, _ in self.faults.unexpected_exits) or 'none'}",
            "  blocks: "
            + ", ".join(f"{c} {self.blocks[c]} (held {self.held[c]:.1f}s)" for c in CHAINS)
            + f"; gateway retries {self.rpc_retries}; miner errors {len(self.miner_errors)}",
            "  wall: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()),
        ]
        if "lock_to_signed_ms" in self.report.figures:
            median, worst = self.report.figures["lock_to_signed_ms"]
            lines.append(f"  later lock block made -> swap payout signed: median {median} ms, max {worst} ms")
        return "\n".join(lines)


class ChaosRun:
    """The whole system on dedicated servers, the deal mix, the faults, and the check."""

    def __init__(self, work_dir: Path, size: ChaosSize, seed: int) -> None:
        self.work_dir = work_dir
        self.size = size
        self.seed = seed
        self.rng = random.Random(seed)
        self.servers: ChaosServers | None = None
        self.chains: EvmChains | None = None
        self.devnet: UnicityDevnet | None = None
        self.stack: EvmStack | None = None
        self.timings: dict[str, float] = {}

    async def start(self) -> None:
        started = time.monotonic()
        # Started from the event loop's thread, like every server here (see otc_cli.servers).
        self.servers = ChaosServers(self.work_dir)
        database_url = await self.servers.create_database()
        self.timings["servers"] = time.monotonic() - started
        self.chains = EvmChains(self.work_dir)
        self.timings["chains"] = time.monotonic() - started - self.timings["servers"]
        for url in self.chains.rpc.values():
            httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "evm_setAutomine", "params": [False]})
        self.devnet = UnicityDevnet(self.work_dir)
        registry = write_test_registry(
            self.work_dir / f"chaos-registry-{secrets.token_hex(3)}.toml",
            self.chains.rpc["ETH"],
            self.chains.rpc["POLYGON"],
            eth_usdt=self.chains.usdt["ETH"],
            polygon_usdt=self.chains.usdt["POLYGON"],
            electrum=self.devnet.url,
        )
        env = {
            "OTC_NATS_URL": self.servers.nats.url,
            "OTC_DATABASE_URL": database_url,
            "OTC_REGISTRY_FILE": str(registry),
            "OTC_LOG_LEVEL": "INFO",
            "OTC_SEED": TEST_SEED_HEX,
        }
        self.stack = EvmStack(env, self.work_dir, self.chains, devnet=self.devnet)
        await self.stack.start()
        self.timings["start"] = time.monotonic() - started

    async def run(self) -> ChaosResult:
        assert self.stack is not None and self.servers is not None and self.devnet is not None
        stack = self.stack
        block_log = BlockLog()
        miner = ChaosMiner({"ETH": stack.eth, "POLYGON": stack.polygon}, self.devnet, block_log, BLOCK_INTERVAL)
        rpc = TolerantRpc(stack.procs["gateway"].url)
        checker = InvariantChecker(stack, self.servers.database_url, block_log, {})
        checker.operator_start = await checker.operator_balances()
        mix = DealMix(stack, miner, rpc, random.Random(self.rng.random()), self.size)
        faults = FaultDriver(stack, self.servers, random.Random(self.rng.random()), self.size)
        deals: list[ChaosDeal] = []
        specs = plan_deals(self.size, self.rng)
        await miner.begin()
        began = time.monotonic()
        drivers = [asyncio.create_task(mix.drive(spec, began, deals)) for spec in specs]
        try:
            await faults.run()
            self.timings["faults"] = time.monotonic() - began
            await faults.settle()
            drained = time.monotonic()
            _, pending = await asyncio.wait(drivers, timeout=self.size.drain_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
            self.timings["drain"] = time.monotonic() - drained
            settled = time.monotonic()
            await self._settle(mix, deals)
            self.timings["settle"] = time.monotonic() - settled
        finally:
            for task in drivers:
                task.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
            await faults.stop()
            await miner.stop()
            await rpc.close()
        checked = time.monotonic()
        report = await checker.check(deals)
        self.timings["check"] = time.monotonic() - checked
        for failure in mix.unopened:
            report.fail(f"deal not opened: {failure}")
        for deal in deals:
            if deal.finished_at is None:
                report.fail(f"{deal.label()}: still running after the drain ({deal.notes})")
        if miner.errors:
            report.fail(f"the miner failed {len(miner.errors)} times: {miner.errors[:3]}")
        for name, code in faults.log.unexpected_exits:
            # Every service waits out a lost NATS or PostgreSQL; one that gives up instead is a bug.
            report.fail(f"{name} exited by itself with code {code}: see {stack.procs[name].log_path}")
        return ChaosResult(
            self.size,
            self.seed,
            sorted(deals, key=lambda d: d.spec.number),
            faults.log,
            report,
            self.timings,
            miner.blocks,
            miner.held_seconds,
            rpc.retries,
            miner.errors,
        )

    async def _settle(self, mix: DealMix, deals: list[ChaosDeal], within: float = 60.0) -> None:
        """Every deal closed with every transfer final and its escrows emptied of the traded asset, and nothing
        waiting in a mempool: then the chains hold the whole story. (A late deposit returns only after its
        confirmations and, for tokens, the tank's gas: the empty escrow is what says it is done.)"""
        assert self.devnet is not None and self.stack is not None
        deadline = time.monotonic() + within
        for deal in deals:
            if deal.error is not None:
                continue
            while True:
                status = await mix.status(deal)
                deal.final = status
                final = status["stage"] == "CLOSED" and all(
                    t["status"] in ("CONFIRMED", "SKIPPED", "FAILED") for t in status["transfers"]
                )
                if final and not any([await self.holds(deal, party) for party in PARTIES]):
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.4)
        while time.monotonic() < deadline:
            pools = [await c.call("txpool_content") for c in (self.stack.eth, self.stack.polygon)]
            waiting = sum(len(p["pending"]) + len(p["queued"]) for p in pools)
            waiting += int((await self.devnet.call("devnet.info"))["mempool_size"])
            if not waiting:
                return
            await asyncio.sleep(0.5)

    async def holds(self, deal: ChaosDeal, party: str) -> int:
        """What the party's escrow holds of the asset it trades, read from the chain."""
        assert self.stack is not None
        side = deal.side(party)
        if side.chain == "UNICITY":
            return await self.stack.alpha_balance(deal.escrow[party])
        chain = self.stack.chain(side.chain)
        if side.native:
            return await chain.balance(deal.escrow[party])
        return await chain.token_balance(self.stack.chains.usdt[side.chain], deal.escrow[party])

    async def close(self) -> None:
        if self.stack is not None:
            # Nothing is left to drain once the run is checked; a kill is what the services are built for anyway.
            await self.stack.miner.stop()
            for proc in self.stack.procs.values():
                proc.kill()
        if self.devnet is not None:
            await self.devnet.close()
            self.devnet.stop()
        if self.chains is not None:
            self.chains.stop()
        if self.servers is not None:
            self.servers.stop()
