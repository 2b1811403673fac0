"""otc-devnet: run the devnet until SIGTERM or Ctrl-C.

    otc-devnet --port 50001 --data-dir .otc/dev/unicity [--autominer 2] [--hrp alpha]

Prints one line starting with "otc-devnet ready" once clients can connect.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .chain import Chain, ChainError
from .faucet import Faucet, FaucetError
from .params import ChainParams, parse_coins
from .server import Devnet
from .store import BlockFile, DataDir, DataDirLocked

log = logging.getLogger("otc_devnet")


def _coins_per_kb(text: str) -> int:
    try:
        return parse_coins(text)
    except (ArithmeticError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of coins per kB, e.g. 0.00001") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 86400")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otc-devnet", description="A local Unicity-like chain served over Electrum.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50001, help="Electrum TCP port (default 50001; 0 picks one)")
    parser.add_argument("--data-dir", type=Path, required=True, help="where the chain and the faucet key are kept")
    parser.add_argument("--autominer", type=_seconds, default=0.0, help="mine a block every SECONDS (default off)")
    parser.add_argument("--hrp", default="alpha", help="bech32 prefix of addresses (default alpha)")
    parser.add_argument(
        "--alpha",
        action="store_true",
        help="the production Alpha chain's rules: 112-byte RandomX-style headers, one input per transaction",
    )
    parser.add_argument("--coinbase-maturity", type=int, default=100, help="confirmations before a coinbase spends")
    parser.add_argument(
        "--premine", type=int, default=None, help="blocks to have at start-up (default coinbase maturity + 100)"
    )
    parser.add_argument("--relay-fee", type=_coins_per_kb, default=1000, help="min relay fee, coins/kB (0.00001)")
    parser.add_argument("--estimate-fee", type=_coins_per_kb, default=1000, help="estimatefee answer, coins/kB")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.coinbase_maturity < 1:
        parser.error("--coinbase-maturity must be at least 1")
    if args.premine is None:
        args.premine = args.coinbase_maturity + 100
    return args


async def run(args: argparse.Namespace) -> None:
    params = ChainParams(
        hrp=args.hrp,
        coinbase_maturity=args.coinbase_maturity,
        min_relay_fee=args.relay_fee,
        estimate_fee=args.estimate_fee,
        alpha=args.alpha,
    )
    data = DataDir(args.data_dir)
    with data.locked():
        faucet = Faucet.load_or_create(data.faucet_key, params.hrp)
        blocks = BlockFile(data.blocks)
        chain = Chain(params, faucet.script, sink=blocks)
        chain.load(blocks.loaded)
        blocks.loaded = []
        if chain.height < args.premine:
            chain.mine(args.premine - chain.height)
        chain.take_changes()
        devnet = Devnet(chain, faucet, data, blocks, args.host, args.port)
        restored = devnet.load_mempool()
        await devnet.start()
        if args.autominer:
            devnet.set_autominer(args.autominer)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"otc-devnet ready on tcp://{args.host}:{devnet.port} height {chain.height} "
            f"mempool {restored} faucet {faucet.address}",
            flush=True,
        )
        await stop.wait()
        log.info("stopping")
        await devnet.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run(args))
    except (DataDirLocked, ChainError, FaucetError) as exc:
        sys.exit(f"otc-devnet: {exc}")
    except OSError as exc:
        sys.exit(f"otc-devnet: cannot start: {exc.strerror or exc}")


if __name__ == "__main__":
    main()
