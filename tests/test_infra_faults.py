"""Infrastructure faults while deals are in flight: the chains' RPC unreachable for a minute, the Electrum
server restarted (and crashed), NATS restarted, PostgreSQL restarted.

After each fault every deal completes, every balance is exact to the base unit, what left each escrow on
chain is exactly the deal's confirmed transfers (nothing paid twice), and no service exited: each must
ride the fault out on its own. NATS and PostgreSQL are servers of these tests alone (the session's are
shared with every other test); the RPC outage is a TCP proxy between the services and the anvils.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from bitcoin.core import CTransaction, b2lx

from otc_cli import contracts
from otc_cli.servers import ManagedServer, free_port, start_nats, start_postgres
from otc_common.addresses import utxo_script_pubkey
from otc_common.errors import ErrorCode
from otc_common.money import parse_amount
from tests.conftest import EvmChains, with_database
from tests.e2e import FUNDER, Deal, EvmStack, alpha_scripthash
from tests.support import ALPHA_ADDRESS, OPERATOR_EVM, TEST_SEED_HEX, write_test_registry
from tests.utxo_support import UnicityDevnet

OUTAGE_SECONDS = 60.0
DECIMALS = {"ETH": 18, "MATIC": 18, "USDT": 6, "ALPHA": 8}
WAIT = 180.0


# --------------------------------------------------------------------------- a proxy that can be cut


class TcpProxy:
    """127.0.0.1:port forwarded to a target; while cut, connections are refused and open ones reset."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        """Nothing reaches the target any more: the port refuses, every open connection is reset."""
        assert self.server is not None
        self.server.close()
        for writer in list(self.open):
            writer.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.cut()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self.open |= {client_writer, upstream_writer}
        try:
            await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer))
        finally:
            self.open -= {client_writer, upstream_writer}
            for writer in (client_writer, upstream_writer):
                writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


# --------------------------------------------------------------------------- stacks


async def build_stack(
    base_env: dict[str, str],
    work_dir: Path,
    tmp: Path,
    chains: EvmChains,
    devnet: UnicityDevnet | None = None,
    *,
    bump_after: int | None = None,
    **rpc: str,
) -> EvmStack:
    """Every service on `chains` (and the devnet), reaching the anvils at `rpc` where given (a proxy)."""
    registry = write_test_registry(
        tmp / "registry.toml",
        rpc.get("ETH", chains.rpc["ETH"]),
        rpc.get("POLYGON", chains.rpc["POLYGON"]),
        eth_usdt=chains.usdt["ETH"],
        polygon_usdt=chains.usdt["POLYGON"],
        **({"electrum": devnet.url} if devnet is not None else {}),
    )
    env = {**base_env, "OTC_REGISTRY_FILE": str(registry)}
    stack = EvmStack(env, work_dir, chains, devnet=devnet)
    if bump_after is not None:
        stack.procs["queue"].env["OTC_BUMP_AFTER_SECONDS"] = str(bump_after)
    await stack.start()
    return stack


@pytest.fixture
def chains(work_dir: Path) -> Iterator[EvmChains]:
    # Started from the event loop's thread: the servers' parent-death signal is tied to it.
    running = EvmChains(work_dir)
    yield running
    running.stop()


@pytest.fixture
def own_nats(work_dir: Path) -> Iterator[ManagedServer]:
    """A NATS of this test alone: restarting the session's would disturb every other test."""
    data = Path(tempfile.mkdtemp(prefix="otc-restart-nats-"))
    server = start_nats(data / "js", free_port(), work_dir / f"restart-nats-{data.name}.log")
    yield server
    server.stop()
    shutil.rmtree(data, ignore_errors=True)


@dataclass
class OwnPostgres:
    server: ManagedServer
    database_url: str


@pytest.fixture
async def own_postgres(work_dir: Path) -> AsyncIterator[OwnPostgres]:
    """A PostgreSQL of this test alone (restarting the session's would disturb every other test)."""
    data = Path(tempfile.mkdtemp(prefix="otc-restart-pg-"))
    os.chmod(data, 0o755)
    server = start_postgres(data / "data", work_dir / f"restart-pg-{data.name}.log")
    admin = await asyncpg.connect(server.url)
    await admin.execute('CREATE DATABASE "otc"')
    await admin.close()
    try:
        yield OwnPostgres(server, with_database(server.url, "otc"))
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def env_of(nats_url: str, database_url: str) -> dict[str, str]:
    return {
        "OTC_NATS_URL": nats_url,
        "OTC_DATABASE_URL": database_url,
        "OTC_LOG_LEVEL": "INFO",
        "OTC_SEED": TEST_SEED_HEX,
    }


# --------------------------------------------------------------------------- deals and their checks


class Book:
    """The deals of one test, what each escrow received, and the operator's balances before them."""

    def __init__(self, stack: EvmStack) -> None:
        self.stack = stack
        self.deals: list[Deal] = []
        self.received: dict[tuple[str, str], int] = {}
        self.operator_before: dict[tuple[str, str], int] = {}
        self.since: dict[str, int] = {}
        #: (deal, party) → (escrow, required deposit): known before any fault, when the gateway may be down.
        self.terms: dict[tuple[str, str], tuple[str, int]] = {}
        #: chain → sender → txids, read once the deals are done.
        self.outgoing: dict[str, dict[str, list[str]]] = {}

    async def open(self) -> None:
        self.since = {"ETH": await self.stack.eth.height(), "POLYGON": await self.stack.polygon.height()}
        for chain, asset in (("ETH", "ETH"), ("ETH", "USDT"), ("POLYGON", "MATIC"), ("POLYGON", "USDT")):
            self.operator_before[(chain, asset)] = await self.operator_balance(chain, asset)
        if self.stack.devnet is not None:
            self.operator_before[("UNICITY", "ALPHA")] = await self.operator_balance("UNICITY", "ALPHA")

    async def operator_balance(self, chain: str, asset: str) -> int:
        if chain == "UNICITY":
            return await self.stack.alpha_balance(ALPHA_ADDRESS)
        node = self.stack.chain(chain)
        return await (
            node.balance(OPERATOR_EVM)
            if asset != "USDT"
            else node.token_balance(self.stack.chains.usdt[chain], OPERATOR_EVM)
        )

    async def deal(self, alice: tuple[str, str, str], bob: tuple[str, str, str]) -> Deal:
        deal = await Deal.create(self.stack, alice, bob)
        await deal.fill()
        self.deals.append(deal)
        for party in ("ALICE", "BOB"):
            self.terms[(deal.id, party)] = (await deal.escrow(party), await deal.required(party))
        return deal

    async def pay(self, deal: Deal, party: str) -> None:
        """The party pays exactly what is required, straight to the node (not through any proxy)."""
        escrow, amount = self.terms[(deal.id, party)]
        chain = deal.sides[party]["chainId"]
        if chain == "UNICITY":
            assert self.stack.devnet is not None
            await self.stack.devnet.faucet(escrow, amount)
        else:
            key = contracts.anvil_account(FUNDER[party]).key.hex()
            token = deal.token(party)
            rpc = self.stack.chains.rpc[chain]
            if token is None:
                await asyncio.to_thread(contracts.send_native, rpc, escrow, amount, key)
            else:
                await asyncio.to_thread(contracts.transfer, rpc, token, escrow, amount, key)
        self.received[(deal.id, party)] = self.received.get((deal.id, party), 0) + amount

    async def pay_both(self, deal: Deal) -> None:
        await asyncio.gather(self.pay(deal, "ALICE"), self.pay(deal, "BOB"))

    async def all_swapped(self, timeout: float = WAIT) -> None:
        for deal in self.deals:
            await deal.wait("CLOSED", outcome="SWAPPED", timeout=timeout)

        async def settled() -> bool:
            transfers = [t for deal in self.deals for t in (await deal.status())["transfers"]]
            return all(t["status"] == "CONFIRMED" for t in transfers)

        await until(settled, "every transfer confirmed", self.stack)

    async def check(self) -> None:
        """Exact balances for every deal, every escrow empty, every payout on chain exactly once."""
        commissions: dict[tuple[str, str], int] = {}
        for deal in self.deals:
            status = await deal.status()
            for party, other in (("ALICE", "BOB"), ("BOB", "ALICE")):
                side = deal.sides[party]
                chain, asset = side["chainId"], side["asset"]
                breakdown = status["instructions"][party.lower()]["breakdown"]
                amount = parse_amount(breakdown["tradeAmount"], DECIMALS[asset])
                commission = parse_amount(breakdown["commission"], DECIMALS[asset])
                commissions[(chain, asset)] = commissions.get((chain, asset), 0) + commission
                escrow = status["instructions"][party.lower()]["to"]
                where = f"deal {deal.id} {party} on {chain}"
                assert await deal.holding(party, deal.recipient[other]) == amount, f"{where}: counterparty paid"
                txids, fees = await self.sent_from(chain, escrow)
                confirmed = [t["txid"] for t in status["transfers"] if t["chainId"] == chain]
                assert all(t["status"] == "CONFIRMED" for t in status["transfers"]), where
                assert len(txids) == len(set(txids)) and sorted(txids) == sorted(confirmed), (
                    f"{where}: on chain {txids}, confirmed transfers {confirmed}"
                )
                assert await deal.holding(party, escrow) == 0, f"{where}: escrow not empty"
                received = self.received[(deal.id, party)]
                native = asset != "USDT"
                if native:
                    # The escrow paid its own fees out of the reserve; the rest came back.
                    expected = received - amount - commission - fees
                else:
                    # The tank paid the fees; its unused gas went back to it, and no coin stays behind.
                    expected = received - amount - commission
                    assert await self.stack.chain(chain).balance(escrow) == 0, f"{where}: gas left behind"
                assert await deal.holding(party, deal.payback[party]) == expected, f"{where}: payback"
        for (chain, asset), total in commissions.items():
            gained = await self.operator_balance(chain, asset) - self.operator_before[(chain, asset)]
            assert gained == total, f"operator on {chain} in {asset}: {gained} != {total}"

    async def sent_from(self, chain: str, escrow: str) -> tuple[list[str], int]:
        """The transactions out of an escrow, read from the chain, and the network fees the escrow paid."""
        if chain == "UNICITY":
            assert self.stack.devnet is not None
            spends = await utxo_spends(self.stack.devnet, escrow)
            return [txid for txid, _ in spends], sum(fee for _, fee in spends)
        node = self.stack.chain(chain)
        if chain not in self.outgoing:
            # One pass over the blocks since the test began (hundreds after an outage), for every escrow.
            by_sender: dict[str, list[str]] = {}
            for number in range(self.since[chain], await node.height() + 1):
                block = await node.call("eth_getBlockByNumber", hex(number), True)
                for tx in block["transactions"]:
                    by_sender.setdefault(tx["from"].lower(), []).append(tx["hash"])
            self.outgoing[chain] = by_sender
        sent = self.outgoing[chain].get(escrow.lower(), [])
        return sent, sum([await node.fee_of(txid) for txid in sent])


async def raw_utxo(devnet: UnicityDevnet, txid: str) -> CTransaction:
    return CTransaction.deserialize(bytes.fromhex(await devnet.call("blockchain.transaction.get", txid)))


async def utxo_spends(devnet: UnicityDevnet, escrow: str) -> list[tuple[str, int]]:
    """(txid, fee) of every transaction spending the escrow's outputs, chain and mempool."""
    script = utxo_script_pubkey(escrow, "alpha")
    spends = []
    for entry in await devnet.call("blockchain.scripthash.get_history", alpha_scripthash(escrow)):
        tx = await raw_utxo(devnet, entry["tx_hash"])
        spent = 0
        for vin in tx.vin:
            funding = await raw_utxo(devnet, b2lx(vin.prevout.hash))
            if bytes(funding.vout[vin.prevout.n].scriptPubKey) == script:
                spent += funding.vout[vin.prevout.n].nValue
        if spent:
            spends.append((entry["tx_hash"], spent - sum(out.nValue for out in tx.vout)))
    return spends


async def until(check: Any, what: str, stack: EvmStack, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{stack.logs()}")


async def stage_of(deal: Deal) -> str:
    return str((await deal.status())["stage"])


async def in_swap_with_a_payout_sent(deal: Deal) -> bool:
    status = await deal.status()
    return status["stage"] == "SWAP" and any(t["txid"] for t in status["transfers"])


async def assert_all_alive(stack: EvmStack) -> None:
    """No service exited, and each one's loops are beating (liveness) and it is ready again."""
    for name, process in stack.procs.items():
        assert process.proc is not None and process.proc.poll() is None, f"{name} exited:\n{process.log_tail()}"

    async def all_ready() -> bool:
        async with httpx.AsyncClient(timeout=5) as client:
            for process in stack.procs.values():
                for probe in ("healthz", "readyz"):
                    if (await client.get(f"{process.url}/{probe}")).status_code != 200:
                        return False
        return True

    await until(all_ready, "every service live and ready", stack)


async def status_error(deal: Deal) -> dict[str, Any]:
    """otc.status while something the gateway needs is down: an error the trader can act on, never a 5xx."""
    reply = await deal.stack.rpc.call("otc.status", {"dealId": deal.id})
    assert "error" in reply, reply
    error: dict[str, Any] = reply["error"]
    return error


def logged(stack: EvmStack, service: str, text: str) -> bool:
    return text in stack.procs[service].log_path.read_text(errors="replace")


# --------------------------------------------------------------------------- the faults


@pytest.mark.timeout(600)
async def test_chain_rpc_unreachable_for_a_minute(
    service_env: dict[str, str], chains: EvmChains, work_dir: Path, tmp_path: Path
) -> None:
    proxies = {}
    for name in ("ETH", "POLYGON"):
        port = int(chains.rpc[name].rsplit(":", 1)[1])
        proxies[name] = TcpProxy("127.0.0.1", port)
        await proxies[name].start()
    stack = await build_stack(
        service_env, work_dir, tmp_path, chains, ETH=proxies["ETH"].url, POLYGON=proxies["POLYGON"].url
    )
    try:
        book = Book(stack)
        await book.open()
        stack.miner.start()
        # In SWAP when the cut comes: payouts and tank funding under way.
        swapping = await book.deal(("POLYGON", "MATIC", "50"), ("ETH", "USDT", "700"))
        await book.pay_both(swapping)
        # Funded just before the cut; paid during it; created before it and paid during it.
        waiting = await book.deal(("ETH", "ETH", "0.1"), ("POLYGON", "MATIC", "20"))
        late = await book.deal(("ETH", "ETH", "0.3"), ("POLYGON", "USDT", "500"))
        await until(lambda: in_swap_with_a_payout_sent(swapping), "the first deal paying out", stack)
        await book.pay_both(waiting)

        cut_at = time.monotonic()
        await asyncio.gather(*(proxy.cut() for proxy in proxies.values()))
        await book.pay_both(late)
        await asyncio.sleep(OUTAGE_SECONDS / 2)
        await assert_all_alive(stack)
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
        assert await stage_of(late) == "COLLECTION", "nothing is seen through a cut RPC"
        for name in ("watcher-ETH", "watcher-POLYGON"):
            assert logged(stack, name, "chain rpc failed"), f"{name} never noticed the outage"
        await asyncio.gather(*(proxy.restore() for proxy in proxies.values()))
        restored_at = time.monotonic()

        await book.all_swapped()
        print(f"\nRPC back after {OUTAGE_SECONDS:.0f}s: every deal closed {time.monotonic() - restored_at:.1f}s later")
        await stack.miner.stop()
        await book.check()
        await assert_all_alive(stack)
    finally:
        await stack.stop()
        for proxy in proxies.values():
            await proxy.close()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_electrum_server_restarted(
    service_env: dict[str, str],
    chains: EvmChains,
    unicity_devnet: UnicityDevnet,
    work_dir: Path,
    tmp_path: Path,
    how: str,
) -> None:
    """A graceful restart keeps the devnet's mempool; a crash loses it, so the payouts that were waiting in
    it must be broadcast again (the same bytes) by the queue."""
    devnet = unicity_devnet
    # No fee bump: the payout caught by the restart must be the one that confirms.
    stack = await build_stack(service_env, work_dir, tmp_path, chains, devnet, bump_after=600)
    try:
        book = Book(stack)
        await book.open()
        # One deal whose ALPHA payout is in the mempool at the restart, one still collecting.
        swapping = await book.deal(("UNICITY", "ALPHA", "6"), ("ETH", "ETH", "0.2"))
        collecting = await book.deal(("ETH", "USDT", "300"), ("UNICITY", "ALPHA", "4"))
        await book.pay_both(swapping)
        for _ in range(40):
            if await in_swap_with_a_payout_sent(swapping):
                break
            await stack.mine()
            await asyncio.sleep(0.25)
        payout = await until(lambda: _alpha_payout(swapping), "the ALPHA payout broadcast", stack)
        await book.pay(collecting, "BOB")
        if how == "crash":
            await devnet.mine(1)  # a crash loses the mempool: the deposit is mined first
        mempool = (await devnet.call("devnet.info"))["mempool_size"]
        await devnet.close()
        if how == "restart":
            devnet.restart()
            assert (await devnet.call("devnet.info"))["mempool_size"] == mempool
        else:
            devnet.server.kill()
            devnet.server.start()
            assert (await devnet.call("devnet.info"))["mempool_size"] == 0
        await book.pay(collecting, "ALICE")
        stack.miner.start()
        await book.all_swapped()
        await stack.miner.stop()
        assert await _alpha_payout(swapping) == payout, "the payout the restart caught is the one that confirmed"
        await book.check()
        await assert_all_alive(stack)
    finally:
        await stack.stop()


async def _alpha_payout(deal: Deal) -> str | None:
    for t in (await deal.status())["transfers"]:
        if t["purpose"] == "SWAP_PAYOUT" and t["chainId"] == "UNICITY" and t["txid"]:
            return str(t["txid"])
    return None


async def restart_with_deals_in_flight(stack: EvmStack, server: ManagedServer, how: str) -> None:
    """Deals at every stage when `server` goes down (stopped, or killed as a crash would), deposits and blocks
    while it is down, then it comes back on its port with its data: every deal completes, exactly."""
    book = Book(stack)
    await book.open()
    stack.miner.start()
    swapping = await book.deal(("ETH", "ETH", "0.5"), ("POLYGON", "USDT", "900"))
    alpha = await book.deal(("UNICITY", "ALPHA", "8"), ("POLYGON", "MATIC", "30"))
    during = await book.deal(("POLYGON", "USDT", "250"), ("ETH", "ETH", "0.05"))
    await book.pay_both(swapping)
    await book.pay_both(alpha)
    await until(lambda: in_swap_with_a_payout_sent(swapping), "the first deal paying out", stack)

    await asyncio.to_thread(server.stop if how == "restart" else server.kill)
    # Deposits land and blocks come while it is down: what the services saw waits in their outboxes.
    await book.pay_both(during)
    error = await status_error(during)
    assert error["code"] == ErrorCode.TEMPORARILY_UNAVAILABLE, error
    await asyncio.sleep(5)
    # Launched from the event loop's thread, which lives as long as the server should.
    server.launch()
    await asyncio.to_thread(server.wait_ready)

    await book.all_swapped()
    await stack.miner.stop()
    await book.check()
    await assert_all_alive(stack)


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_nats_restarted(
    own_nats: ManagedServer,
    database_url: str,
    chains: EvmChains,
    unicity_devnet: UnicityDevnet,
    work_dir: Path,
    tmp_path: Path,
    how: str,
) -> None:
    stack = await build_stack(env_of(own_nats.url, database_url), work_dir, tmp_path, chains, unicity_devnet)
    try:
        await restart_with_deals_in_flight(stack, own_nats, how)
    finally:
        await stack.stop()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_postgresql_restarted(
    own_postgres: OwnPostgres,
    clean_nats: str,
    chains: EvmChains,
    unicity_devnet: UnicityDevnet,
    work_dir: Path,
    tmp_path: Path,
    how: str,
) -> None:
    env = env_of(clean_nats, own_postgres.database_url)
    stack = await build_stack(env, work_dir, tmp_path, chains, unicity_devnet)
    try:
        await restart_with_deals_in_flight(stack, own_postgres.server, how)
    finally:
        await stack.stop()
