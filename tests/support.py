"""What several test modules share: a test registry, service processes, a JSON-RPC client."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from otc_common.signing_keys import account_xpub, load_seed, private_key_at

# A fixed, public test seed: these keys guard nothing.
TEST_SEED_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
EVM_PATH = "m/44'/60'/0'/0/{index}"
UTXO_PATH = "m/84'/0'/0'/0/{index}"

# Addresses with valid checksums, for party details.
ALICE_EVM = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
BOB_EVM = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
OPERATOR_EVM = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
ALPHA_ADDRESS = "alpha1qcr8te4kr609gcawutmrza0j4xv80jy8zn4smkh"


#: Tests poll the gateway far faster than any trader; its per-client and per-deal limits are tested on their own.
UNLIMITED_RATES = {
    "OTC_RATE_CLIENT_PER_SECOND": "100000",
    "OTC_RATE_CLIENT_BURST": "100000",
    "OTC_RATE_DEAL_PER_SECOND": "100000",
    "OTC_RATE_DEAL_BURST": "100000",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TANK_PATH = "m/44'/60'/1'/0/0"
#: The first contract anvil account 0 deploys on a fresh chain lands here.
FIRST_CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def tank_address() -> str:
    from eth_account import Account

    return str(Account.from_key(private_key_at(load_seed(TEST_SEED_HEX), TANK_PATH)).address)


def write_test_registry(
    path: Path,
    eth_rpc: str = "http://127.0.0.1:1",
    polygon_rpc: str = "http://127.0.0.1:2",
    *,
    eth_usdt: str = FIRST_CONTRACT,
    polygon_usdt: str = FIRST_CONTRACT,
    electrum: str = "tcp://127.0.0.1:3",
) -> Path:
    seed = load_seed(TEST_SEED_HEX)
    evm_xpub = account_xpub(seed, EVM_PATH)
    utxo_xpub = account_xpub(seed, UTXO_PATH)
    tank = tank_address()
    path.write_text(
        f"""
[chains.ETH]
kind = "evm"
chain_id = 31337
confirmations = 2
rpc = "{eth_rpc}"
operator_address = "{OPERATOR_EVM}"
tank_address = "{tank}"
derivation_path = "{EVM_PATH}"
account_xpub = "{evm_xpub}"
min_timeout_seconds = 2
[chains.ETH.assets.ETH]
decimals = 18
native = true
max_amount = "1000"
fee_reserve = "0.001"
[chains.ETH.assets.USDT]
decimals = 6
contract = "{eth_usdt}"
fixed_fee = "1"
max_amount = "10000000"

[chains.POLYGON]
kind = "evm"
chain_id = 31338
confirmations = 3
rpc = "{polygon_rpc}"
operator_address = "{OPERATOR_EVM}"
tank_address = "{tank}"
derivation_path = "{EVM_PATH}"
account_xpub = "{evm_xpub}"
min_timeout_seconds = 2
[chains.POLYGON.assets.MATIC]
decimals = 18
native = true
max_amount = "100000"
fee_reserve = "0.01"
[chains.POLYGON.assets.USDT]
decimals = 6
contract = "{polygon_usdt}"
fixed_fee = "1"
max_amount = "10000000"

[chains.UNICITY]
kind = "utxo"
confirmations = 2
electrum = "{electrum}"
hrp = "alpha"
operator_address = "{ALPHA_ADDRESS}"
derivation_path = "{UTXO_PATH}"
account_xpub = "{utxo_xpub}"
min_timeout_seconds = 2
[chains.UNICITY.assets.ALPHA]
decimals = 8
native = true
max_amount = "21000000"
fee_reserve = "0.0001"
""",
        encoding="utf-8",
    )
    return path


class ServiceProcess:
    """One service as a real OS process, with its own health port."""

    _counter = itertools.count()

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTC_")}
        self.env = {**base, **env, "OTC_HTTP_PORT": str(self.port), "OTC_HTTP_HOST": "127.0.0.1"}
        self.log_path = log_dir / f"{name}-{next(self._counter)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    async def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    response = await client.get(f"{self.url}/readyz", timeout=1)
                    if response.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RpcClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._ids = itertools.count(1)

    async def raw(self, body: Any) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            if isinstance(body, bytes | str):
                return await client.post(
                    f"{self.base_url}/rpc",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=10,
                )
            return await client.post(f"{self.base_url}/rpc", json=body, timeout=10)

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        """The whole JSON-RPC response object."""
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
        if params is not None:
            body["params"] = params
        response = await self.raw(body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def result(self, method: str, params: Any = None) -> Any:
        reply = await self.call(method, params)
        assert "error" not in reply, reply
        return reply["result"]
