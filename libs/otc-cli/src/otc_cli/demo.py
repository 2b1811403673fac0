"""A demo deal on the dev stack, driven only through the gateway's JSON-RPC API and the chains.

Alice sells 1.5 ETH on ETH, Bob sells 40,000 USDT on POLYGON; both are anvil accounts. The
demo fills both parties' details, funds both escrows with exactly what `otc.status` asks
for, and prints every stage as the gateway reports it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx

from otc_cli import contracts
from otc_common.money import parse_amount

log = logging.getLogger("otc.demo")

ALICE_ACCOUNT = 1
BOB_ACCOUNT = 2
POLL_SECONDS = 0.25
DEMO_TIMEOUT_SECONDS = 300


class DemoError(Exception):
    pass


class Gateway:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/rpc"
        self.client = httpx.Client(timeout=10, trust_env=False)
        self.ids = 0

    def call(self, method: str, params: dict[str, Any]) -> Any:
        self.ids += 1
        reply = self.client.post(self.url, json={"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})
        body = reply.json()
        if "error" in body:
            raise DemoError(f"{method}: {body['error']['message']} (code {body['error']['code']})")
        return body["result"]


def _fund(endpoints: dict[str, Any], instructions: dict[str, Any], account: int) -> str:
    chain = endpoints["chains"][instructions["chainId"]]
    asset = chain["assets"][instructions["asset"]]
    amount = parse_amount(instructions["amount"], int(asset["decimals"]))
    key = contracts.anvil_account(account).key.hex()
    if asset.get("native"):
        return contracts.send_native(chain["rpc"], instructions["to"], amount, key)
    return contracts.transfer(chain["rpc"], asset["contract"], instructions["to"], amount, key)


def run_demo(endpoints: dict[str, Any], stop: threading.Event) -> None:
    gateway = Gateway(endpoints["gateway"])
    alice = contracts.anvil_address(ALICE_ACCOUNT)
    bob = contracts.anvil_address(BOB_ACCOUNT)
    deal = gateway.call(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "1.5"},
            "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "40000"},
            "timeoutSeconds": 600,
            "name": "demo: 1.5 ETH for 40,000 USDT",
        },
    )
    deal_id = deal["dealId"]
    log.info("demo deal %s created; Alice's page: %s", deal_id, deal["linkA"])
    log.info("Bob's page: %s", deal["linkB"])
    for party, token, own in (("ALICE", deal["aliceToken"], alice), ("BOB", deal["bobToken"], bob)):
        # Each party is paid back where it sends from and receives on the other chain, with the same account.
        gateway.call(
            "otc.fillPartyDetails",
            {
                "dealId": deal_id,
                "party": party,
                "token": token,
                "paybackAddress": own,
                "recipientAddress": own,
            },
        )
    status = gateway.call("otc.status", {"dealId": deal_id})
    for party, account in (("alice", ALICE_ACCOUNT), ("bob", BOB_ACCOUNT)):
        instructions = status["instructions"][party]
        txid = _fund(endpoints, instructions, account)
        log.info(
            "%s deposited %s %s on %s into %s (tx %s)",
            party.capitalize(),
            instructions["amount"],
            instructions["asset"],
            instructions["chainId"],
            instructions["to"],
            txid,
        )
    seen: set[str] = set()
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
    while not stop.is_set() and time.monotonic() < deadline:
        status = gateway.call("otc.status", {"dealId": deal_id})
        stage = status["stage"]
        if stage not in seen:
            seen.add(stage)
            log.info("demo deal %s is %s%s", deal_id, stage, f" ({status['outcome']})" if status["outcome"] else "")
            for transfer in status.get("transfers", []):
                log.info("  transfer %s", transfer)
        if stage == "CLOSED":
            return
        stop.wait(POLL_SECONDS)


def start_demo(endpoints: dict[str, Any]) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()

    def target() -> None:
        try:
            run_demo(endpoints, stop)
        except (DemoError, httpx.HTTPError, contracts.ContractError) as exc:
            log.error("demo stopped: %s", exc)

    thread = threading.Thread(target=target, name="demo", daemon=True)
    thread.start()
    return thread, stop
