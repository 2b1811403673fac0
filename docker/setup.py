"""Prepares the docker compose stack: the dev seed, the test USDT on both anvil chains, the registry.

The one-shot `setup` service of docker-compose.yml runs it before any broker service starts.
Every step is idempotent, so it runs again on each `docker compose up`: the seed is made once,
the token is deployed only on a chain that does not hold it yet, the registry is rewritten.
With --tokens-only it only makes sure the tokens exist (the dev Kubernetes overlay's Job, whose
registry is a ConfigMap) and fails if they are not where that registry says.

This is development tooling: like `otc dev up` it holds the dev seed to derive the registry's
extended public keys. Never point it at a production seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from eth_account import Account

from otc_cli import contracts
from otc_cli.devstack import (
    DEV_CHAINS,
    EVM_DERIVATION_PATH,
    OPERATOR_ACCOUNT,
    TANK_PATH,
    USDT_SYMBOL,
    ChainEndpoint,
    ensure_seed,
    ensure_tokens,
    render_dev_registry,
    write_atomic,
)
from otc_common.keys import EscrowKeyring
from otc_common.signing_keys import account_xpub, load_seed, private_key_at

log = logging.getLogger("otc.setup")

UTXO_CHAIN = "UNICITY"
UTXO_HRP = "alpha"
UTXO_PATH = "m/84'/0'/0'/0/{index}"
#: The devnet's commission goes to the first address of the seed's second UTXO account, so it
#: never collides with an escrow (account 0).
UTXO_OPERATOR_PATH = "m/84'/0'/1'/0/{index}"


def render_registry(seed_hex: str, rpcs: Mapping[str, str], tokens: Mapping[str, str], electrum: str) -> str:
    """The registry of the dev chains: the EVM part exactly as `otc dev up` writes it, plus the devnet."""
    seed = load_seed(seed_hex)
    evm_xpub = account_xpub(seed, EVM_DERIVATION_PATH)
    tank_address = str(Account.from_key(private_key_at(seed, TANK_PATH)).address)
    chains = [
        ChainEndpoint(chain.name, chain.chain_id, rpcs[chain.name], chain.native_symbol, tokens[chain.name])
        for chain in DEV_CHAINS
    ]
    text = render_dev_registry(
        chains,
        operator_address=contracts.anvil_address(OPERATOR_ACCOUNT),
        tank_address=tank_address,
        account_xpub=evm_xpub,
    )
    utxo_xpub = account_xpub(seed, UTXO_PATH)
    operator = EscrowKeyring(account_xpub(seed, UTXO_OPERATOR_PATH), UTXO_OPERATOR_PATH).utxo_address(0, UTXO_HRP)
    lines = [
        f"[chains.{UTXO_CHAIN}]",
        'kind = "utxo"',
        "confirmations = 2",
        f"electrum = {json.dumps(electrum)}",
        f"hrp = {json.dumps(UTXO_HRP)}",
        f"operator_address = {json.dumps(operator)}",
        f"derivation_path = {json.dumps(UTXO_PATH)}",
        f"account_xpub = {json.dumps(utxo_xpub)}",
        'explorer_tx_url = ""',
        "min_timeout_seconds = 10",
        "",
        f"[chains.{UTXO_CHAIN}.assets.ALPHA]",
        "decimals = 8",
        "native = true",
        'max_amount = "21000000"',
        # A few P2WPKH payouts at the devnet's default fee rate, kept back for the escrow's own fees.
        'fee_reserve = "0.0001"',
        "",
    ]
    return text.replace("`otc dev up`", "docker/setup.py") + "\n" + "\n".join(lines)


def _chain_urls(pairs: list[str]) -> dict[str, str]:
    known = {chain.name for chain in DEV_CHAINS}
    urls = {}
    for pair in pairs:
        name, _, url = pair.partition("=")
        if name not in known or not url:
            raise SystemExit(f"--rpc {pair!r}: expected CHAIN=URL with CHAIN one of {', '.join(sorted(known))}")
        urls[name] = url
    if set(urls) != known:
        raise SystemExit(f"--rpc is needed for each of {', '.join(sorted(known))}")
    return urls


def _expect_tokens(state_file: Path, address: str) -> None:
    """Tell ensure_tokens where the token should be, so a second run finds it instead of redeploying."""
    chains = {chain.name: {"chain_id": chain.chain_id, "tokens": {USDT_SYMBOL: address}} for chain in DEV_CHAINS}
    write_atomic(state_file, json.dumps({"chains": chains}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="setup.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rpc", action="append", default=[], metavar="CHAIN=URL", help="JSON-RPC URL of ETH and POLYGON"
    )
    parser.add_argument("--electrum", default="tcp://devnet:50001", help="the devnet's Electrum URL")
    parser.add_argument("--registry", type=Path, default=Path("/etc/otc/registry.toml"))
    parser.add_argument("--seed-file", type=Path, default=Path("/var/lib/otc/seed/seed"))
    parser.add_argument("--state-file", type=Path, default=Path("/var/lib/otc/state/state.json"))
    parser.add_argument("--tokens-only", action="store_true", help="only make sure the test tokens exist")
    parser.add_argument("--expect-token", metavar="ADDRESS", help="with --tokens-only: where the registry has USDT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    rpcs = _chain_urls(args.rpc)
    try:
        if args.expect_token:
            _expect_tokens(args.state_file, args.expect_token)
        tokens = ensure_tokens(args.state_file, rpcs)
    except contracts.ContractError as exc:
        raise SystemExit(f"setup: {exc}") from None
    if args.expect_token:
        wrong = {name: token for name, token in tokens.items() if token.lower() != args.expect_token.lower()}
        if wrong:
            raise SystemExit(f"setup: USDT is not at {args.expect_token} on {', '.join(wrong)} (chain not fresh?)")
    if args.tokens_only:
        return
    seed_hex = ensure_seed(args.seed_file)
    write_atomic(args.registry, render_registry(seed_hex, rpcs, tokens, args.electrum))
    log.info("wrote %s", args.registry)


if __name__ == "__main__":
    main()
