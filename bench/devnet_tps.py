"""How many signed P2WPKH transactions per second the Unicity devnet validates and admits.

    uv run python bench/devnet_tps.py [--count 2000]

Starts a devnet, funds a fresh key with COUNT confirmed outputs, signs COUNT independent
one-input transactions here, then broadcasts them over Electrum: once one at a time (each
waiting for its answer) and once pipelined, and prints transactions per second for both.
Every broadcast must be accepted; the figure covers parsing, the policy checks, the BIP143
signature check and the mempool and index updates, plus the JSON-RPC round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CTxInWitness, CTxWitness, lx
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash
from bitcoin.segwit_addr import encode as segwit_encode
from bitcoin.wallet import CKey

from otc_cli.servers import free_port
from otc_cli.unicity import start_unicity_devnet
from otc_devnet.chain import Chain
from otc_devnet.client import ElectrumClient
from otc_devnet.faucet import Faucet
from otc_devnet.params import ChainParams
from otc_devnet.tx import parse_tx

OUTPUT_VALUE = 10_000
BATCH = 100
FAN_OUT = 1_000  # outputs per funding transaction, well inside the standard size


class Signer:
    def __init__(self) -> None:
        self.key = CKey(os.urandom(32), compressed=True)
        self.program = hashlib.new("ripemd160", hashlib.sha256(self.key.pub).digest()).digest()
        self.script = b"\x00\x14" + self.program
        self.address = segwit_encode("alpha", 0, self.program)
        self.code = CScript(b"\x76\xa9\x14" + self.program + b"\x88\xac")

    def spend(self, inputs: list[tuple[str, int, int]], outputs: list[tuple[bytes, int]]) -> CMutableTransaction:
        tx = CMutableTransaction(
            [CMutableTxIn(COutPoint(lx(txid), n)) for txid, n, _value in inputs],
            [CMutableTxOut(value, CScript(script)) for script, value in outputs],
            nVersion=2,
        )
        witnesses = []
        for index, (_txid, _n, value) in enumerate(inputs):
            digest = SignatureHash(self.code, tx, index, SIGHASH_ALL, amount=value, sigversion=SIGVERSION_WITNESS_V0)
            witnesses.append(CTxInWitness(CScriptWitness([self.key.sign(digest) + b"\x01", self.key.pub])))
        tx.wit = CTxWitness(witnesses)
        return tx


async def prepare(client: ElectrumClient, signer: Signer, count: int) -> list[str]:
    """count signed, independent transactions, each spending one confirmed output of signer's."""
    fee_per_fan_out = 40 * FAN_OUT + 200
    fundings = []
    for start in range(0, count, FAN_OUT):
        outputs = min(FAN_OUT, count - start)
        amount = outputs * OUTPUT_VALUE + fee_per_fan_out
        txid = await client.request("devnet.faucet", signer.address, amount)
        fundings.append((txid, amount, outputs))
    await client.request("devnet.mine", 1)
    coins: list[tuple[str, int]] = []
    for txid, amount, outputs in fundings:
        verbose = await client.request("blockchain.transaction.get", txid, True)
        vout = next(out["n"] for out in verbose["vout"] if out["scriptPubKey"]["hex"] == signer.script.hex())
        fan_out = signer.spend([(txid, vout, amount)], [(signer.script, OUTPUT_VALUE)] * outputs)
        fan_txid = await client.request("blockchain.transaction.broadcast", fan_out.serialize().hex())
        coins += [(fan_txid, n) for n in range(outputs)]
    await client.request("devnet.mine", 1)
    sink = Signer().script
    spends = [signer.spend([(txid, n, OUTPUT_VALUE)], [(sink, OUTPUT_VALUE - 200)]) for txid, n in coins]
    return [tx.serialize().hex() for tx in spends]


async def broadcast_batches(url: str, raws: list[str]) -> None:
    """Broadcast as JSON-RPC batches on a raw connection: the client does next to no work per transaction."""
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), limit=64 * 1024 * 1024)
    try:
        for start in range(0, len(raws), BATCH):
            chunk = raws[start : start + BATCH]
            calls = [
                {"jsonrpc": "2.0", "id": start + i, "method": "blockchain.transaction.broadcast", "params": [raw]}
                for i, raw in enumerate(chunk)
            ]
            writer.write(json.dumps(calls).encode() + b"\n")
        await writer.drain()
        for _ in range(0, len(raws), BATCH):
            replies = json.loads(await reader.readline())
            failed = [reply for reply in replies if "error" in reply]
            assert not failed, failed[:3]
    finally:
        writer.close()


def in_process(count: int) -> float:
    """Transactions per second through parsing and mempool admission alone, without the protocol."""
    faucet = Faucet(CKey(os.urandom(32), compressed=True), "alpha")
    chain = Chain(ChainParams(coinbase_maturity=1), faucet.script)
    chain.load([])
    chain.mine(2 + count // FAN_OUT)
    signer, sink = Signer(), Signer().script
    raws = []
    for start in range(0, count, FAN_OUT):
        outputs = min(FAN_OUT, count - start)
        amount = outputs * OUTPUT_VALUE + 40 * outputs + 200
        funding = faucet.pay(chain, signer.script, amount)
        chain.accept(funding)
        fan_out = parse_tx(
            signer.spend([(funding.txid_hex, 0, amount)], [(signer.script, OUTPUT_VALUE)] * outputs).serialize()
        )
        chain.accept(fan_out)
        chain.mine(1)
        raws += [
            signer.spend([(fan_out.txid_hex, n, OUTPUT_VALUE)], [(sink, OUTPUT_VALUE - 200)]).serialize()
            for n in range(outputs)
        ]
    started = time.perf_counter()
    for raw in raws:
        chain.accept(parse_tx(raw))
    return count / (time.perf_counter() - started)


async def run(count: int, url: str | None) -> None:
    server = None
    if url is None:
        workdir = Path(tempfile.mkdtemp(prefix="devnet-bench-"))
        server = start_unicity_devnet(free_port(), workdir / "data", workdir / "devnet.log")
        url = server.url
    try:
        async with await ElectrumClient.connect(url) as client:
            signer = Signer()
            started = time.perf_counter()
            sequential = await prepare(client, signer, count)
            pipelined = await prepare(client, signer, count)
            batched = await prepare(client, signer, count)
            print(f"signed {3 * count} transactions in {time.perf_counter() - started:.1f}s", file=sys.stderr)

            started = time.perf_counter()
            for raw in sequential:
                await client.request("blockchain.transaction.broadcast", raw)
            one_by_one = time.perf_counter() - started

            started = time.perf_counter()
            await asyncio.gather(*(client.request("blockchain.transaction.broadcast", raw) for raw in pipelined))
            concurrent = time.perf_counter() - started

            started = time.perf_counter()
            await broadcast_batches(url, batched)
            in_batches = time.perf_counter() - started

            info = await client.request("devnet.info")
            assert info["mempool_size"] == 3 * count, info
            started = time.perf_counter()
            await client.request("devnet.mine", 1)
            mined = time.perf_counter() - started
        print(f"one at a time: {count / one_by_one:8.0f} tx/s  ({count} in {one_by_one:.2f}s)")
        print(f"pipelined:     {count / concurrent:8.0f} tx/s  ({count} in {concurrent:.2f}s)")
        print(f"JSON-RPC batches of {BATCH}: {count / in_batches:8.0f} tx/s  ({count} in {in_batches:.2f}s)")
        print(f"mining a block of {3 * count} transactions: {mined:.2f}s")
        print(f"in process (parse + mempool admission only): {in_process(count):8.0f} tx/s")
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="transactions per run (default 2000)")
    parser.add_argument("--url", help="a running devnet (tcp://host:port) instead of a fresh one")
    args = parser.parse_args()
    asyncio.run(run(args.count, args.url))


if __name__ == "__main__":
    main()
