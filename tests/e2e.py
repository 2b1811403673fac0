"""The whole system as separate processes on live anvil chains, and helpers to trade through it."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account

from otc_cli import contracts
from otc_common.addresses import electrum_scripthash, segwit_address, utxo_script_pubkey
from otc_common.money import parse_amount
from tests.conftest import EvmChains
from tests.support import UNLIMITED_RATES, RpcClient, ServiceProcess, tank_address, write_test_registry
from tests.utxo_support import UnicityDevnet

FUNDER = {"ALICE": 1, "BOB": 3}


DECIMALS = {"USDT": 6, "ALPHA": 8}


def fresh_address() -> str:
    return str(Account.create(secrets.token_hex(16)).address)


def fresh_alpha() -> str:
    return segwit_address("alpha", 0, secrets.token_bytes(20))


def fresh_address_on(chain: str) -> str:
    return fresh_alpha() if chain == "UNICITY" else fresh_address()


def alpha_scripthash(address: str) -> str:
    return electrum_scripthash(utxo_script_pubkey(address, "alpha"))


def chains_env(
    service_env: dict[str, str], registry: Path, chains: EvmChains, devnet: UnicityDevnet | None = None
) -> dict[str, str]:
    """The services' environment with a registry (written to `registry`) naming these live chains."""
    write_test_registry(
        registry,
        chains.rpc["ETH"],
        chains.rpc["POLYGON"],
        eth_usdt=chains.usdt["ETH"],
        polygon_usdt=chains.usdt["POLYGON"],
        **({"electrum": devnet.url} if devnet is not None else {}),
    )
    return {**service_env, "OTC_REGISTRY_FILE": str(registry)}


class Chain:
    """Plain JSON-RPC to one anvil, for balances, mining and reorgs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.AsyncClient(timeout=30, trust_env=False)

    async def call(self, method: str, *params: Any) -> Any:
        reply = (
            await self.client.post(self.url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        ).json()
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def balance(self, address: str) -> int:
        return int(await self.call("eth_getBalance", address, "latest"), 16)

    async def token_balance(self, token: str, owner: str) -> int:
        data = "0x70a08231" + owner[2:].lower().rjust(64, "0")
        return int(await self.call("eth_call", {"to": token, "data": data}, "latest"), 16)

    async def height(self) -> int:
        return int(await self.call("eth_blockNumber"), 16)

    async def receipt(self, txid: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self.call("eth_getTransactionReceipt", txid)
        return result

    async def fee_of(self, txid: str) -> int:
        receipt = await self.receipt(txid)
        assert receipt is not None, txid
        return int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)

    async def sent_from(self, address: str, first_block: int) -> list[dict[str, Any]]:
        """Every transaction `address` sent since `first_block`, read from the blocks themselves."""
        found = []
        for number in range(first_block, await self.height() + 1):
            block = await self.call("eth_getBlockByNumber", hex(number), True)
            found += [tx for tx in block["transactions"] if tx["from"].lower() == address.lower()]
        return found


class Miner:
    """Mines a block on each chain every `interval` seconds while running (chains without a block timer)."""

    def __init__(self, chains: list[Chain], interval: float = 0.3, devnet: UnicityDevnet | None = None) -> None:
        self.chains = chains
        self.interval = interval
        self.devnet = devnet
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for chain in self.chains:
                await chain.call("anvil_mine", "0x1")
            if self.devnet is not None:
                await self.devnet.mine(1)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


class EvmStack:
    """Gateway, engine, queue processor, tank and one watcher per chain, each its own process."""

    def __init__(
        self,
        env: dict[str, str],
        work_dir: Path,
        chains: EvmChains,
        *,
        engines: int = 1,
        devnet: UnicityDevnet | None = None,
    ) -> None:
        self.env = env
        self.chains = chains
        self.devnet = devnet
        self.procs: dict[str, ServiceProcess] = {}
        for i in range(engines):
            self.procs[f"engine{i}" if i else "engine"] = ServiceProcess("engine", ["-m", "otc_engine"], env, work_dir)
        self.procs["gateway"] = ServiceProcess(
            "gateway",
            ["-m", "otc_gateway"],
            {**env, **UNLIMITED_RATES, "OTC_PUBLIC_BASE_URL": "https://otc.example"},
            work_dir,
        )
        self.procs["queue"] = ServiceProcess(
            "queue", ["-m", "otc_queue"], {**env, "OTC_BUMP_AFTER_SECONDS": "10"}, work_dir
        )
        self.procs["tank"] = ServiceProcess(
            "tank", ["-m", "otc_tank"], {**env, "OTC_TANK_RETRY_SECONDS": "1"}, work_dir
        )
        for chain in ("ETH", "POLYGON"):
            self.procs[f"watcher-{chain}"] = ServiceProcess(
                f"watcher-{chain}",
                ["-m", "otc_watcher_evm", "--chain", chain],
                {**env, "OTC_POLL_INTERVAL_MS": "100"},
                work_dir,
            )
        if devnet is not None:
            self.procs["watcher-UNICITY"] = ServiceProcess(
                "watcher-UNICITY", ["-m", "otc_watcher_utxo", "--chain", "UNICITY"], env, work_dir
            )
        self.rpc = RpcClient(self.procs["gateway"].url)
        self.eth = Chain(chains.rpc["ETH"])
        self.polygon = Chain(chains.rpc["POLYGON"])
        self.miner = Miner([self.eth, self.polygon], devnet=devnet)

    def chain(self, name: str) -> Chain:
        return self.eth if name == "ETH" else self.polygon

    async def start(self) -> None:
        for chain in (self.eth, self.polygon):
            await chain.call("anvil_setBalance", tank_address(), hex(100 * 10**18))
        engines = [p for name, p in self.procs.items() if name.startswith("engine")]
        await asyncio.gather(*(p.start() for p in engines))
        await asyncio.gather(*(p.start() for name, p in self.procs.items() if not name.startswith("engine")))

    async def stop(self) -> None:
        await self.miner.stop()
        await asyncio.gather(*(p.stop() for p in self.procs.values()))

    async def mine(self, blocks: int = 1) -> None:
        for chain in (self.eth, self.polygon):
            await chain.call("anvil_mine", hex(blocks))
        if self.devnet is not None:
            await self.devnet.mine(blocks)

    async def alpha_balance(self, address: str) -> int:
        """Confirmed plus unconfirmed satoshi held by `address` on the devnet."""
        assert self.devnet is not None
        balance = await self.devnet.call("blockchain.scripthash.get_balance", alpha_scripthash(address))
        return int(balance["confirmed"]) + int(balance["unconfirmed"])

    async def alpha_confirmed(self, address: str) -> int:
        assert self.devnet is not None
        balance = await self.devnet.call("blockchain.scripthash.get_balance", alpha_scripthash(address))
        return int(balance["confirmed"])

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log_tail(25)}" for name, p in self.procs.items())


class Deal:
    def __init__(self, stack: EvmStack, created: dict[str, Any], sides: dict[str, dict[str, str]]) -> None:
        self.stack = stack
        self.id: str = created["dealId"]
        self.tokens = {"ALICE": created["aliceToken"], "BOB": created["bobToken"]}
        self.sides = sides
        other = {"ALICE": "BOB", "BOB": "ALICE"}
        self.payback = {party: fresh_address_on(sides[party]["chainId"]) for party in ("ALICE", "BOB")}
        self.recipient = {party: fresh_address_on(sides[other[party]]["chainId"]) for party in ("ALICE", "BOB")}

    @classmethod
    async def create(
        cls, stack: EvmStack, alice: tuple[str, str, str], bob: tuple[str, str, str], timeout: int = 600
    ) -> Deal:
        sides = {
            "ALICE": {"chainId": alice[0], "asset": alice[1], "amount": alice[2]},
            "BOB": {"chainId": bob[0], "asset": bob[1], "amount": bob[2]},
        }
        created = await stack.rpc.result(
            "otc.createDeal", {"alice": sides["ALICE"], "bob": sides["BOB"], "timeoutSeconds": timeout}
        )
        return cls(stack, created, sides)

    async def fill(self) -> None:
        for party in ("ALICE", "BOB"):
            await self.fill_one(party)

    async def fill_one(self, party: str) -> None:
        await self.stack.rpc.result(
            "otc.fillPartyDetails",
            {
                "dealId": self.id,
                "party": party,
                "token": self.tokens[party],
                "paybackAddress": self.payback[party],
                "recipientAddress": self.recipient[party],
            },
        )

    async def status(self) -> dict[str, Any]:
        """The deal's status; "temporarily unavailable" (1010, a server restarting) is retried as clients are told."""
        deadline = time.monotonic() + 60
        while True:
            reply = await self.stack.rpc.call("otc.status", {"dealId": self.id, "token": self.tokens["ALICE"]})
            error = reply.get("error")
            if error is None:
                result: dict[str, Any] = reply["result"]
                return result
            assert error["code"] == 1010 and time.monotonic() < deadline, reply
            await asyncio.sleep(0.2)

    async def required(self, party: str) -> int:
        instructions = (await self.status())["instructions"][party.lower()]
        return self.units(party, instructions["amount"])

    async def escrow(self, party: str) -> str:
        return str((await self.status())["instructions"][party.lower()]["to"])

    def units(self, party: str, text: str) -> int:
        return parse_amount(text, DECIMALS.get(self.sides[party]["asset"], 18))

    def token(self, party: str) -> str | None:
        side = self.sides[party]
        return self.stack.chains.usdt[side["chainId"]] if side["asset"] == "USDT" else None

    async def deposit(self, party: str, amount: int, from_account: int | None = None) -> str:
        side = self.sides[party]
        if side["chainId"] == "UNICITY":
            assert self.stack.devnet is not None
            return await self.stack.devnet.faucet(await self.escrow(party), amount)
        key = contracts.anvil_account(from_account if from_account is not None else FUNDER[party]).key.hex()
        rpc = self.stack.chains.rpc[side["chainId"]]
        to = await self.escrow(party)
        token = self.token(party)
        if token is None:
            return await asyncio.to_thread(contracts.send_native, rpc, to, amount, key)
        return await asyncio.to_thread(contracts.transfer, rpc, token, to, amount, key)

    async def holding(self, party: str, address: str) -> int:
        """`address`'s balance in the asset `party` sends."""
        if self.sides[party]["chainId"] == "UNICITY":
            return await self.stack.alpha_balance(address)
        chain = self.stack.chain(self.sides[party]["chainId"])
        token = self.token(party)
        return await chain.balance(address) if token is None else await chain.token_balance(token, address)

    async def wait(self, stage: str, timeout: float = 90.0, outcome: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = await self.status()
            if status["stage"] == stage and (outcome is None or status["outcome"] == outcome):
                return status
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"deal {self.id} not {stage}/{outcome} after {timeout}s: {status.get('stage')} "
            f"{status.get('transfers')}\n{self.stack.logs()}"
        )


async def wait_until(read: Callable[[], Awaitable[Any]], expected: Any, stack: EvmStack, timeout: float = 60) -> None:
    """Polls `read` until it returns `expected`; fails with the services' logs otherwise."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await read()
        if value == expected:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"expected {expected}, still {value}\n{stack.logs()}")


async def mine_until(stack: EvmStack, deal: Deal, stage: str, limit: int = 60) -> dict[str, Any]:
    """Mines a block on every chain at a time until the deal reaches `stage`."""
    for _ in range(limit):
        status = await deal.status()
        if status["stage"] == stage:
            return status
        await stack.mine()
        await asyncio.sleep(0.25)
    raise AssertionError(f"not {stage}: {(await deal.status())['stage']}\n{stack.logs()}")
