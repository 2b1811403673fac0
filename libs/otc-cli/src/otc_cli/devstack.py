"""`otc dev up`: the whole broker on one machine with only Python and npm.

NATS, PostgreSQL, two anvil chains and the Unicity devnet run as child processes with their
data under `.otc/dev/`; the services run as supervised children that are restarted with
backoff when they die. A second `up` reuses every piece of data, including the deployed
tokens and the Unicity chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx
from eth_account import Account
from rich.console import Console
from rich.table import Table
from web3 import Web3
from web3.exceptions import Web3Exception

from otc_cli import contracts
from otc_cli.servers import (
    HOST,
    ManagedServer,
    ServerError,
    kill_all,
    start_anvil,
    start_nats,
    start_postgres,
    stop_all,
)
from otc_cli.unicity import start_unicity_devnet

log = logging.getLogger("otc.dev")

DEFAULT_DATA_DIR = Path(".otc") / "dev"
EVM_DERIVATION_PATH = "m/44'/60'/0'/0/{index}"
TANK_PATH = "m/44'/60'/1'/0/0"
OPERATOR_ACCOUNT = 9
TOKEN_MINTER_ACCOUNT = 0
USDT_SYMBOL = "USDT"
USDT_NAME = "Tether USD (dev)"
USDT_DECIMALS = 6
USDT_GRANT = 1_000_000 * 10**USDT_DECIMALS
#: Blocks on a timer: deposits need 2 confirmations, which an idle automining chain never gives.
BLOCK_TIME_SECONDS = 1
READY_TIMEOUT_SECONDS = 60.0
HEALTH_POLL_SECONDS = 1.0
RESTART_BACKOFF_MAX = 30.0
#: A service that ran this long before dying starts again from the shortest backoff.
STABLE_AFTER_SECONDS = 30.0
#: Longer than the services' own drain grace (20 s), so Ctrl-C lets in-flight work finish.
SERVICE_STOP_TIMEOUT = 25.0

#: The UTXO chain: the devnet with the production Alpha chain's rules, served over Electrum.
UNICITY = "UNICITY"
UNICITY_SYMBOL = "ALPHA"
UNICITY_DECIMALS = 8
UNICITY_HRP = "alpha"
UNICITY_PORT_ENV = "OTC_DEV_UNICITY_PORT"
UNICITY_DEFAULT_PORT = 15001
#: Deposits need 2 confirmations; the devnet mines only on request unless told to.
UNICITY_BLOCK_SECONDS = 2
UTXO_DERIVATION_PATH = "m/84'/0'/0'/0/{index}"
#: The operator's commission address on Unicity: the first receive address of the next account.
UTXO_OPERATOR_ACCOUNT = "m/84'/0'/1'"


@dataclass(frozen=True)
class DevChain:
    name: str
    chain_id: int
    native_symbol: str
    port_env: str
    default_port: int


DEV_CHAINS: tuple[DevChain, ...] = (
    DevChain("ETH", 31337, "ETH", "OTC_DEV_ETH_PORT", 18545),
    DevChain("POLYGON", 31338, "MATIC", "OTC_DEV_POLYGON_PORT", 18546),
)


@dataclass(frozen=True)
class ChainEndpoint:
    """A running dev chain: what the registry and endpoints.json say about it."""

    name: str
    chain_id: int
    rpc: str
    native_symbol: str
    token_contract: str


@dataclass(frozen=True)
class UtxoEndpoint:
    """The running Unicity devnet: what the registry and endpoints.json say about it."""

    name: str
    electrum: str
    account_xpub: str
    operator_address: str


@dataclass(frozen=True)
class DevPorts:
    nats: int
    postgres: int
    gateway: int
    chains: Mapping[str, int]
    unicity: int = UNICITY_DEFAULT_PORT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DevPorts:
        env = os.environ if environ is None else environ

        def port(name: str, default: int) -> int:
            text = env.get(name)
            if not text:
                return default
            try:
                value = int(text)
            except ValueError:
                raise SystemExit(f"{name}={text!r} is not a port number") from None
            if not 0 < value < 65536:
                raise SystemExit(f"{name}={value} is not a port number")
            return value

        return cls(
            nats=port("OTC_DEV_NATS_PORT", 14222),
            postgres=port("OTC_DEV_PG_PORT", 15432),
            gateway=port("OTC_DEV_GATEWAY_PORT", 8080),
            chains={chain.name: port(chain.port_env, chain.default_port) for chain in DEV_CHAINS},
            unicity=port(UNICITY_PORT_ENV, UNICITY_DEFAULT_PORT),
        )


@dataclass(frozen=True)
class ServiceSpec:
    """One supervised service process of the dev stack."""

    name: str
    module: str
    http_port: int
    args: tuple[str, ...] = ()
    #: Only the processes that sign may see the seed (see DESIGN.md, key custody).
    needs_seed: bool = False
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


def dev_services(gateway_port: int = 8080) -> list[ServiceSpec]:
    """The services `otc dev up` runs, in start order."""
    return [
        ServiceSpec(
            "gateway",
            "otc_gateway",
            gateway_port,
            extra_env={"OTC_PUBLIC_BASE_URL": f"http://{HOST}:{gateway_port}"},
        ),
        ServiceSpec("engine", "otc_engine", 18101),
        ServiceSpec("queue-processor", "otc_queue", 18102, needs_seed=True),
        ServiceSpec("tank", "otc_tank", 18103, needs_seed=True),
        ServiceSpec("watcher-evm-ETH", "otc_watcher_evm", 18104, args=("--chain", "ETH")),
        ServiceSpec("watcher-evm-POLYGON", "otc_watcher_evm", 18105, args=("--chain", "POLYGON")),
        ServiceSpec(f"watcher-utxo-{UNICITY}", "otc_watcher_utxo", 18106, args=("--chain", UNICITY)),
    ]


class DevPaths:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.seed = self.root / "seed"
        self.state = self.root / "state.json"
        self.registry = self.root / "registry.toml"
        self.endpoints = self.root / "endpoints.json"
        self.logs = self.root / "logs"
        self.nats = self.root / "nats"
        self.postgres = self.root / "postgres"
        self.unicity = self.root / "unicity"
        self.lock = self.root / ".lock"

    def anvil_state(self, chain: str) -> Path:
        return self.root / "anvil" / f"{chain}.json"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def default_data_dir(start: Path | None = None) -> Path:
    """`.otc/dev` in the repository root above start (the cwd), else in start itself.

    So `otc dev up` from a subdirectory finds the same stack instead of making a new one.
    """
    here = (start or Path.cwd()).resolve()
    for directory in [here, *here.parents]:
        if (directory / "uv.lock").exists() or (directory / ".git").exists():
            return directory / DEFAULT_DATA_DIR
    return here / DEFAULT_DATA_DIR


# --- files ------------------------------------------------------------------------------


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    tmp.replace(path)


def ensure_seed(path: Path) -> str:
    """The dev seed as hex, created (32 random bytes, mode 0600) on first use."""
    if not path.exists():
        write_atomic(path, secrets.token_bytes(32).hex() + "\n", mode=0o600)
        log.info("generated a new dev seed in %s", path)
    elif stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


def _seed_derivations(seed_hex: str) -> tuple[str, str]:
    """(account xpub for the EVM escrow path, tank address) of the dev seed."""
    from otc_common.signing_keys import account_xpub, load_seed, private_key_at

    seed = load_seed(seed_hex)
    tank_address = str(Account.from_key(private_key_at(seed, TANK_PATH)).address)
    return account_xpub(seed, EVM_DERIVATION_PATH), tank_address


def _utxo_derivations(seed_hex: str) -> tuple[str, str]:
    """(account xpub for the Unicity escrow path, operator address) of the dev seed."""
    from otc_common.keys import EscrowKeyring
    from otc_common.signing_keys import account_xpub, extended_public_key_at, load_seed

    seed = load_seed(seed_hex)
    operator_keys = EscrowKeyring(
        extended_public_key_at(seed, UTXO_OPERATOR_ACCOUNT), UTXO_OPERATOR_ACCOUNT + "/0/{index}"
    )
    return account_xpub(seed, UTXO_DERIVATION_PATH), operator_keys.utxo_address(0, UNICITY_HRP)


def _toml_string(value: str) -> str:
    # A JSON string literal is also a valid TOML basic string.
    return json.dumps(value)


def render_dev_registry(
    chains: Sequence[ChainEndpoint],
    *,
    operator_address: str,
    tank_address: str,
    account_xpub: str,
    utxo: UtxoEndpoint | None = None,
) -> str:
    lines = ["# Written by `otc dev up` on every start; edits are overwritten.", ""]
    for chain in chains:
        lines += [
            f"[chains.{chain.name}]",
            'kind = "evm"',
            f"chain_id = {chain.chain_id}",
            "confirmations = 2",
            f"rpc = {_toml_string(chain.rpc)}",
            f"operator_address = {_toml_string(operator_address)}",
            f"tank_address = {_toml_string(tank_address)}",
            f"derivation_path = {_toml_string(EVM_DERIVATION_PATH)}",
            f"account_xpub = {_toml_string(account_xpub)}",
            'explorer_tx_url = ""',
            "min_timeout_seconds = 10",
            "",
            f"[chains.{chain.name}.assets.{chain.native_symbol}]",
            "decimals = 18",
            "native = true",
            'max_amount = "100000"',
            # Two payouts of 21,000 gas at up to ~20 gwei, kept back for the escrow's own fees.
            'fee_reserve = "0.001"',
            "",
            f"[chains.{chain.name}.assets.{USDT_SYMBOL}]",
            f"decimals = {USDT_DECIMALS}",
            f"contract = {_toml_string(chain.token_contract)}",
            'fixed_fee = "1"',
            'max_amount = "10000000"',
            "",
        ]
    if utxo is not None:
        lines += [
            f"[chains.{utxo.name}]",
            'kind = "utxo"',
            f"electrum = {_toml_string(utxo.electrum)}",
            f"hrp = {_toml_string(UNICITY_HRP)}",
            "confirmations = 2",
            f"operator_address = {_toml_string(utxo.operator_address)}",
            f"derivation_path = {_toml_string(UTXO_DERIVATION_PATH)}",
            f"account_xpub = {_toml_string(utxo.account_xpub)}",
            'explorer_tx_url = ""',
            "min_timeout_seconds = 10",
            "",
            f"[chains.{utxo.name}.assets.{UNICITY_SYMBOL}]",
            f"decimals = {UNICITY_DECIMALS}",
            "native = true",
            'max_amount = "1000000"',
            # The escrow pays its own payouts' fees: three phases at a few hundred satoshis each.
            'fee_reserve = "0.001"',
            "",
        ]
    return "\n".join(lines)


def write_dev_registry(
    path: Path,
    chains: Sequence[ChainEndpoint],
    *,
    operator_address: str,
    tank_address: str,
    account_xpub: str,
    utxo: UtxoEndpoint | None = None,
) -> None:
    """The chain registry the services read (OTC_REGISTRY_FILE) for the dev chains."""
    text = render_dev_registry(
        chains, operator_address=operator_address, tank_address=tank_address, account_xpub=account_xpub, utxo=utxo
    )
    write_atomic(path, text)


def build_endpoints(
    *,
    gateway_port: int,
    nats_url: str,
    database_url: str,
    chains: Sequence[ChainEndpoint],
    utxo: UtxoEndpoint | None = None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "gateway": f"http://{HOST}:{gateway_port}",
        "nats": nats_url,
        "database": database_url,
        "chains": {
            chain.name: {
                "kind": "evm",
                "rpc": chain.rpc,
                "chain_id": chain.chain_id,
                "assets": {
                    chain.native_symbol: {"decimals": 18, "native": True},
                    USDT_SYMBOL: {"decimals": USDT_DECIMALS, "contract": chain.token_contract},
                },
            }
            for chain in chains
        },
    }
    if utxo is not None:
        document["chains"][utxo.name] = {
            "kind": "utxo",
            "electrum": utxo.electrum,
            "assets": {UNICITY_SYMBOL: {"decimals": UNICITY_DECIMALS, "native": True}},
        }
    return document


# --- the test token ---------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"chains": {}}
    except ValueError:
        log.warning("%s is not valid JSON; tokens will be redeployed", path)
        return {"chains": {}}
    state.setdefault("chains", {})
    return state


def _is_dev_usdt(rpc: str, address: str) -> bool:
    # On a reset chain another contract may sit at the same address (same deployer, nonce).
    if not contracts.code_exists(rpc, address):
        return False
    try:
        erc20 = contracts.token_contract(Web3(Web3.HTTPProvider(rpc)), address)
        return bool(
            erc20.functions.symbol().call() == USDT_SYMBOL and erc20.functions.decimals().call() == USDT_DECIMALS
        )
    except (Web3Exception, ValueError):
        return False


def _ensure_token(chain: DevChain, rpc: str, known: str | None) -> tuple[str, bool]:
    """The chain's USDT address and whether it was deployed just now."""
    if known and _is_dev_usdt(rpc, known):
        return known, False
    if known:
        log.info("%s: no contract at %s any more (chain reset); redeploying %s", chain.name, known, USDT_SYMBOL)
    key = contracts.ANVIL_PRIVATE_KEYS[TOKEN_MINTER_ACCOUNT]
    token = contracts.deploy_test_token(rpc, USDT_NAME, USDT_SYMBOL, USDT_DECIMALS, key)
    grants = [(contracts.anvil_address(i), USDT_GRANT) for i in range(len(contracts.ANVIL_PRIVATE_KEYS))]
    contracts.mint_many(rpc, token, grants, key)
    return token, True


def ensure_tokens(state_file: Path, rpcs: Mapping[str, str]) -> dict[str, str]:
    """USDT on every dev chain, deployed and minted only where it is not there yet."""
    state = _load_state(state_file)
    by_name = {chain.name: chain for chain in DEV_CHAINS}

    def one(name: str) -> tuple[str, str, bool]:
        known = state["chains"].get(name, {}).get("tokens", {}).get(USDT_SYMBOL)
        token, fresh = _ensure_token(by_name[name], rpcs[name], known)
        return name, token, fresh

    # Blocks come every second, so deploying on both chains at once halves the wait.
    with ThreadPoolExecutor(max_workers=len(rpcs)) as pool:
        results = list(pool.map(one, rpcs))
    for name, token, fresh in results:
        state["chains"][name] = {"chain_id": by_name[name].chain_id, "tokens": {USDT_SYMBOL: token}}
        if fresh:
            log.info("%s: deployed %s at %s and minted 1,000,000 to anvil accounts 0-9", name, USDT_SYMBOL, token)
        else:
            log.info("%s: reusing %s at %s", name, USDT_SYMBOL, token)
    state["token_minter"] = contracts.anvil_address(TOKEN_MINTER_ACCOUNT)
    write_atomic(state_file, json.dumps(state, indent=2) + "\n")
    return {name: token for name, token, _ in results}


# --- services ---------------------------------------------------------------------------


def service_env(
    spec: ServiceSpec,
    *,
    database_url: str,
    nats_url: str,
    registry_file: Path,
    seed_file: Path,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one service process.

    Inherited OTC_* variables are dropped so that a shell that sourced `otc dev env`
    cannot hand the seed file, or any other setting, to a service it was not meant for.
    """
    env = {key: value for key, value in (os.environ if base is None else base).items() if not key.startswith("OTC_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(
        {
            "OTC_DATABASE_URL": database_url,
            "OTC_NATS_URL": nats_url,
            "OTC_REGISTRY_FILE": str(registry_file),
            "OTC_HTTP_PORT": str(spec.http_port),
            "OTC_LOG_LEVEL": "INFO",
        }
    )
    if spec.needs_seed:
        env["OTC_SEED_FILE"] = str(seed_file)
    env.update(spec.extra_env)
    return env


@dataclass
class _Supervised:
    spec: ServiceSpec
    process: ManagedServer
    restarts: int = 0
    backoff: float = 1.0
    restart_at: float | None = None
    last_exit: int | None = None
    live: bool = False
    ready: bool = False


class Supervisor:
    """Keeps the service processes running and knows which of them are healthy."""

    def __init__(self, services: Sequence[tuple[ServiceSpec, ManagedServer]]) -> None:
        self.items = [_Supervised(spec, process) for spec, process in services]
        self._http = httpx.Client(timeout=0.5, trust_env=False)
        self._next_health = 0.0

    def start(self) -> None:
        for item in self.items:
            self._launch(item)

    def _launch(self, item: _Supervised) -> None:
        try:
            item.process.launch()
        except OSError as exc:
            item.last_exit = -1
            self._schedule_restart(item, f"could not start: {exc}")

    def _schedule_restart(self, item: _Supervised, why: str) -> None:
        item.restart_at = time.monotonic() + item.backoff
        log.warning("%s %s; restarting in %.0fs (log: %s)", item.spec.name, why, item.backoff, item.process.log_file)
        item.backoff = min(item.backoff * 2, RESTART_BACKOFF_MAX)

    def tick(self) -> None:
        now = time.monotonic()
        for item in self.items:
            if item.restart_at is not None:
                if now >= item.restart_at:
                    item.restart_at = None
                    item.restarts += 1
                    self._launch(item)
                continue
            code = item.process.returncode
            if code is None:
                continue
            started = item.process.started_at or now
            if now - started >= STABLE_AFTER_SECONDS:
                item.backoff = 1.0
            # Whatever the service forked dies with it, so the next run starts clean.
            item.process.kill()
            item.last_exit = code
            item.live = item.ready = False
            self._schedule_restart(item, f"exited with code {code}")
        if now >= self._next_health:
            self._next_health = now + HEALTH_POLL_SECONDS
            self._poll_health()

    def _probe(self, port: int, path: str) -> bool:
        try:
            return self._http.get(f"http://{HOST}:{port}{path}").status_code == 200
        except httpx.HTTPError:
            return False

    def _poll_health(self) -> None:
        for item in self.items:
            running = item.process.is_running()
            live = running and self._probe(item.spec.http_port, "/healthz")
            ready = live and self._probe(item.spec.http_port, "/readyz")
            if item.ready and not ready:
                log.warning("%s is no longer ready", item.spec.name)
            item.live, item.ready = live, ready

    def all_ready(self) -> bool:
        return all(item.ready for item in self.items)

    def not_ready(self) -> list[str]:
        return [item.spec.name for item in self.items if not item.ready]

    def status(self, item: _Supervised) -> str:
        if item.restart_at is not None:
            wait = max(0.0, item.restart_at - time.monotonic())
            return f"[red]exited ({item.last_exit}), restart in {wait:.0f}s[/red]"
        if item.ready:
            return "[green]ready[/green]"
        if item.live:
            return "[yellow]live, not ready[/yellow]"
        return "[yellow]starting[/yellow]" if item.process.is_running() else "[red]down[/red]"

    def table(self) -> Table:
        table = Table(title="services", title_justify="left", box=None, pad_edge=False)
        for column in ("service", "pid", "port", "status", "restarts", "log"):
            table.add_column(column)
        for item in self.items:
            table.add_row(
                item.spec.name,
                str(item.process.pid or "-"),
                str(item.spec.http_port),
                self.status(item),
                str(item.restarts),
                _relative(item.process.log_file),
            )
        return table

    def stop(self) -> None:
        stop_all((item.process for item in self.items), timeout=SERVICE_STOP_TIMEOUT)
        self._http.close()


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- up ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(paths: DevPaths) -> Iterator[None]:
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another `otc dev up` is using {paths.root}") from None
        yield


def _is_locked(paths: DevPaths) -> bool:
    if not paths.lock.exists():
        return False
    with open(paths.lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C: unwind, then stop everything in order.
    raise KeyboardInterrupt


def _while_stopping(signum: int, frame: FrameType | None) -> None:
    # A second Ctrl-C is the impatient way out: no more waiting for graceful exits.
    log.warning("killing whatever is still running")
    kill_all()


def _configure_logging(stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # One line per health probe would bury everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _infra_table(servers: Sequence[ManagedServer]) -> Table:
    table = Table(title="servers", title_justify="left", box=None, pad_edge=False)
    for column in ("server", "pid", "url", "log"):
        table.add_column(column)
    for server in servers:
        table.add_row(server.name, str(server.pid), server.url, _relative(server.log_file))
    return table


class DevStack:
    def __init__(
        self,
        data_dir: Path,
        *,
        with_services: bool = True,
        demo: bool = False,
        console: Console | None = None,
    ) -> None:
        self.paths = DevPaths(data_dir)
        self.with_services = with_services
        self.demo = demo
        self.endpoints_document: dict[str, Any] = {}
        self.ports = DevPorts.from_env()
        # Piped output would otherwise be cut at 80 columns, truncating URLs and paths.
        self.console = console or Console(width=None if sys.stdout.isatty() else 200)
        self.nats: ManagedServer | None = None
        self.postgres: ManagedServer | None = None
        self.anvils: dict[str, ManagedServer] = {}
        self.unicity: ManagedServer | None = None
        self.supervisor: Supervisor | None = None

    def infra(self) -> list[ManagedServer]:
        servers = [self.nats, self.postgres, *self.anvils.values(), self.unicity]
        return [server for server in servers if server is not None]

    def run(self) -> None:
        started = time.monotonic()
        previous_term = signal.signal(signal.SIGTERM, _on_terminate)
        # Explicit, because a shell starting us in the background sets SIGINT to "ignore".
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with _exclusive(self.paths):
                try:
                    self._start(started)
                    self._supervise(started)
                except KeyboardInterrupt:
                    pass
                finally:
                    signal.signal(signal.SIGINT, _while_stopping)
                    signal.signal(signal.SIGTERM, _while_stopping)
                    self.shutdown()
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, previous_int)

    def _start(self, started: float) -> None:
        paths, ports = self.paths, self.ports
        log.info("dev stack in %s", paths.root)
        paths.logs.mkdir(parents=True, exist_ok=True)
        seed_hex = ensure_seed(paths.seed)

        self.nats = start_nats(paths.nats, ports.nats, paths.log("nats"))
        log.info("nats ready at %s", self.nats.url)
        self.postgres = start_postgres(paths.postgres, paths.log("postgres"), port=ports.postgres)
        log.info("postgres ready at %s", self.postgres.url)
        for chain in DEV_CHAINS:
            anvil = start_anvil(
                ports.chains[chain.name],
                chain.chain_id,
                paths.log(f"anvil-{chain.name}"),
                state_file=paths.anvil_state(chain.name),
                block_time=BLOCK_TIME_SECONDS,
                name=f"anvil-{chain.name}",
            )
            self.anvils[chain.name] = anvil
            log.info("anvil %s (chain id %d) ready at %s", chain.name, chain.chain_id, anvil.url)
        self.unicity = start_unicity_devnet(
            ports.unicity,
            paths.unicity,
            paths.log("unicity"),
            autominer=UNICITY_BLOCK_SECONDS,
            alpha=True,
            name="unicity-devnet",
        )
        log.info("unicity devnet (%s) ready at %s", UNICITY, self.unicity.url)

        tokens = ensure_tokens(paths.state, {name: anvil.url for name, anvil in self.anvils.items()})
        endpoints = [
            ChainEndpoint(
                chain.name,
                chain.chain_id,
                self.anvils[chain.name].url,
                chain.native_symbol,
                tokens[chain.name],
            )
            for chain in DEV_CHAINS
        ]
        xpub, tank_address = _seed_derivations(seed_hex)
        utxo_xpub, utxo_operator = _utxo_derivations(seed_hex)
        utxo = UtxoEndpoint(UNICITY, self.unicity.url, utxo_xpub, utxo_operator)
        write_dev_registry(
            paths.registry,
            endpoints,
            operator_address=contracts.anvil_address(OPERATOR_ACCOUNT),
            tank_address=tank_address,
            account_xpub=xpub,
            utxo=utxo,
        )
        document = build_endpoints(
            gateway_port=ports.gateway,
            nats_url=self.nats.url,
            database_url=self.postgres.url,
            chains=endpoints,
            utxo=utxo,
        )
        self.endpoints_document = document
        if not self.with_services:
            self._write_endpoints()
        log.info("wrote %s", _relative(paths.registry))
        self.console.print(_infra_table(self.infra()))
        log.info("servers ready in %.1fs", time.monotonic() - started)

        if self.with_services:
            specs = dev_services(ports.gateway)
            self.supervisor = Supervisor(
                [
                    (
                        spec,
                        ManagedServer(
                            spec.name,
                            spec.argv(),
                            url=f"http://{HOST}:{spec.http_port}",
                            log_file=paths.log(spec.name),
                            env=service_env(
                                spec,
                                database_url=self.postgres.url,
                                nats_url=self.nats.url,
                                registry_file=paths.registry,
                                seed_file=paths.seed,
                            ),
                            port=spec.http_port,
                            stop_timeout=SERVICE_STOP_TIMEOUT,
                        ),
                    )
                    for spec in specs
                ]
            )
            self.supervisor.start()
            log.info("started %d services; waiting for them to be ready", len(specs))

    def _write_endpoints(self) -> None:
        """Written once everything answers, so a client that finds the file can use it."""
        write_atomic(self.paths.endpoints, json.dumps(self.endpoints_document, indent=2) + "\n")
        log.info("wrote %s", _relative(self.paths.endpoints))

    def _on_first_ready(self) -> None:
        self._write_endpoints()
        if self.demo:
            from otc_cli.demo import start_demo

            start_demo(self.endpoints_document)

    def _supervise(self, started: float) -> None:
        supervisor = self.supervisor
        if supervisor is None:
            log.info("running without services; Ctrl-C stops the stack")
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        announced = warned = ever_ready = False
        while True:
            self._watch_infra()
            if supervisor is not None:
                supervisor.tick()
                if supervisor.all_ready():
                    if not announced:
                        if ever_ready:
                            log.info("all services ready again")
                        else:
                            self.console.print(supervisor.table())
                            log.info("stack ready in %.1fs; Ctrl-C stops it", time.monotonic() - started)
                            self._on_first_ready()
                        announced = ever_ready = True
                else:
                    announced = False
                    if not warned and time.monotonic() >= deadline:
                        self.console.print(supervisor.table())
                        log.warning(
                            "not healthy after %.0fs: %s (still supervised; see their logs)",
                            READY_TIMEOUT_SECONDS,
                            ", ".join(supervisor.not_ready()),
                        )
                        warned = True
            time.sleep(0.2)

    def _watch_infra(self) -> None:
        """Restart a server that died under the stack; give up if it cannot come back."""
        for server in self.infra():
            code = server.returncode
            if code is None:
                continue
            log.error("%s exited unexpectedly with code %s; restarting it", server.name, code)
            server.restart()
            log.info("%s is back at %s", server.name, server.url)

    def shutdown(self) -> None:
        log.info("stopping the dev stack")
        if self.supervisor is not None:
            self.supervisor.stop()
            log.info("services stopped")
        # anvil writes its state file and the devnet its mempool on the way out: they stop first.
        stop_all([*self.anvils.values(), *([self.unicity] if self.unicity is not None else [])])
        for server in (self.nats, self.postgres):
            if server is not None:
                server.stop()
        log.info("dev stack stopped; data kept in %s", self.paths.root)


def up(data_dir: Path, *, with_services: bool = True, demo: bool = False) -> None:
    _configure_logging(sys.stderr)
    try:
        DevStack(data_dir, with_services=with_services, demo=demo).run()
    except (ServerError, contracts.ContractError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


def env_lines(data_dir: Path) -> list[str]:
    """`export` lines for running one service by hand against the stack in data_dir."""
    paths = DevPaths(data_dir)
    try:
        endpoints = json.loads(paths.endpoints.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"no dev stack in {paths.root}: run `otc dev up` first") from None
    gateway_port = DevPorts.from_env().gateway
    ports = ", ".join(str(spec.http_port) for spec in dev_services(gateway_port))

    def export(name: str, value: str) -> str:
        return f"export {name}={shlex.quote(value)}"

    return [
        export("OTC_DATABASE_URL", endpoints["database"]),
        export("OTC_NATS_URL", endpoints["nats"]),
        export("OTC_REGISTRY_FILE", str(paths.registry)),
        export("OTC_LOG_LEVEL", "INFO"),
        f"# OTC_HTTP_PORT: pick one the stack does not use ({ports})",
        "# queue-processor and tank only:",
        "# " + export("OTC_SEED_FILE", str(paths.seed)),
        "# gateway only:",
        "# " + export("OTC_PUBLIC_BASE_URL", endpoints["gateway"]),
    ]


def reset(data_dir: Path) -> None:
    paths = DevPaths(data_dir)
    if not paths.root.exists():
        return
    if _is_locked(paths):
        raise SystemExit(f"a dev stack is running on {paths.root}; stop it (Ctrl-C) first")
    shutil.rmtree(paths.root)
