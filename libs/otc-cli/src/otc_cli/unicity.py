"""The Unicity devnet (`otc-devnet`) as a managed child process, like the other local servers."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from otc_cli.servers import DEFAULT_START_TIMEOUT, HOST, ManagedServer, _require_free_port

__all__ = ["electrum_version", "start_unicity_devnet"]


def electrum_version(port: int, timeout: float = 1.0) -> list[str]:
    """The server.version answer of the Electrum server on port (raises OSError/ValueError if none)."""
    request = {"jsonrpc": "2.0", "id": 0, "method": "server.version", "params": ["otc-ready-check", "1.4"]}
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            reply += chunk
    result = json.loads(reply)["result"]
    if not isinstance(result, list):
        raise ValueError(f"unexpected server.version answer: {result!r}")
    return result


def start_unicity_devnet(
    port: int,
    data_dir: Path,
    log_file: Path,
    autominer: float | None = None,
    *,
    hrp: str = "alpha",
    alpha: bool = False,
    coinbase_maturity: int | None = None,
    premine: int | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT,
    name: str = "unicity-devnet",
) -> ManagedServer:
    """otc-devnet on 127.0.0.1:port with its chain in data_dir; ready once server.version answers.

    The chain, the faucet key and (after a graceful stop) the mempool persist in data_dir, so
    a restart continues the same chain. `url` is the Electrum endpoint, tcp://127.0.0.1:port.
    With alpha the devnet follows the production Alpha chain where it differs from Bitcoin:
    112-byte RandomX-style headers and exactly one input per transaction.
    """
    _require_free_port(port, "otc-devnet")
    argv = [sys.executable, "-m", "otc_devnet", "--host", HOST, "--port", str(port), "--data-dir", str(data_dir)]
    argv += ["--hrp", hrp]
    if alpha:
        argv.append("--alpha")
    if autominer:
        argv += ["--autominer", str(autominer)]
    if coinbase_maturity is not None:
        argv += ["--coinbase-maturity", str(coinbase_maturity)]
    if premine is not None:
        argv += ["--premine", str(premine)]

    def ready() -> bool:
        try:
            return bool(electrum_version(port))
        except (OSError, ValueError, KeyError):
            return False

    server = ManagedServer(
        name,
        argv,
        url=f"tcp://{HOST}:{port}",
        log_file=log_file,
        ready=ready,
        start_timeout=start_timeout,
        port=port,
    )
    return server.start()
