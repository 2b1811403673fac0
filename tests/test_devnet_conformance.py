"""The Unicity devnet against the Electrum protocol 1.4 documentation and bitcoind's mempool rules.

The devnet runs as a real process (started as the dev stack starts it); every check is made from
the client side, with keys, signatures, hashes and statuses computed here independently.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import pytest

from otc_cli.servers import ManagedServer, free_port
from otc_cli.unicity import start_unicity_devnet
from otc_devnet.client import ElectrumClient, ElectrumError
from tests.devnet_support import (
    FINAL,
    RBF,
    Key,
    Utxo,
    build,
    drain,
    electrum_status,
    next_notification,
    sha256d,
    txid_of,
    vsize_of,
)

REJECTED = "the transaction was rejected by network rules.\n\n"
SUBSIDY = 50 * 10**8


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    root = tmp_path_factory.mktemp("devnet")
    server = start_unicity_devnet(free_port(), root / "data", root / "devnet.log")
    yield server
    server.stop()


@pytest.fixture
async def electrum(devnet: ManagedServer) -> AsyncIterator[ElectrumClient]:
    client = await ElectrumClient.connect(devnet.url)
    yield client
    await client.close()


async def settled(client: ElectrumClient) -> list[tuple[str, list[Any]]]:
    """Every notification caused by earlier requests: the server sends them before answering the next one."""
    await client.request("server.ping")
    return drain(client.notifications)


async def tip_height(client: ElectrumClient) -> int:
    info = await client.request("devnet.info")
    return int(info["height"])


async def fund(client: ElectrumClient, key: Key, amount: int, *, confirm: bool = True) -> Utxo:
    """A faucet payment to key, mined unless confirm is False."""
    txid = await client.request("devnet.faucet", key.address, amount)
    if confirm:
        await client.request("devnet.mine", 1)
    verbose = await client.request("blockchain.transaction.get", txid, True)
    vout = next(out["n"] for out in verbose["vout"] if out["scriptPubKey"]["hex"] == key.script.hex())
    return Utxo(txid, vout, amount, key)


async def rejection(client: ElectrumClient, tx_hex: str) -> str:
    with pytest.raises(ElectrumError) as caught:
        await client.request("blockchain.transaction.broadcast", tx_hex)
    assert caught.value.code == 1
    assert caught.value.message.startswith(REJECTED) and caught.value.message.endswith("\n")
    return caught.value.message[len(REJECTED) : -1]


async def raw_exchange(url: str, lines: list[bytes], replies: int) -> list[Any]:
    """Send raw lines on a fresh connection and read replies (for what the client class cannot express)."""
    host, port = url.removeprefix("tcp://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for line in lines:
            writer.write(line)
        await writer.drain()
        return [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(replies)]
    finally:
        writer.close()


# --- server methods and version negotiation ---------------------------------------------------


async def test_version_negotiation(devnet: ManagedServer) -> None:
    async with await ElectrumClient.connect(devnet.url) as client:
        assert client.server_version[1] == "1.4"
        with pytest.raises(ElectrumError, match="already sent") as second:
            await client.request("server.version", "again", "1.4")
        assert second.value.code == 1
    async with await ElectrumClient.connect(devnet.url, protocol_version=["1.4", "1.9"]) as client:
        assert client.server_version[1] == "1.4.2"
    # No version in common: an error, then the server closes the connection.
    with pytest.raises(ElectrumError, match="Unsupported protocol version"):
        await ElectrumClient.connect(devnet.url, protocol_version=["1.0", "1.3"])
    # Named parameters use the documented names.
    named = (
        b'{"jsonrpc": "2.0", "id": 7, "method": "server.version",'
        b' "params": {"client_name": "x", "protocol_version": "1.4"}}\n'
    )
    [reply] = await raw_exchange(devnet.url, [named], 1)
    assert reply["id"] == 7 and reply["result"][1] == "1.4"


async def test_server_methods(electrum: ElectrumClient) -> None:
    assert await electrum.request("server.ping") is None
    assert "otc-devnet" in await electrum.request("server.banner")
    features = await electrum.request("server.features")
    genesis = await electrum.request("blockchain.block.header", 0)
    assert features["genesis_hash"] == sha256d(bytes.fromhex(genesis))[::-1].hex()
    assert features["hash_function"] == "sha256"
    assert (features["protocol_min"], features["protocol_max"]) == ("1.4", "1.4.2")
    assert features["server_version"] == electrum.server_version[0]
    # Coins per kilobyte: 1 satoshi per virtual byte.
    assert await electrum.request("blockchain.relayfee") == Decimal("0.00001")
    assert await electrum.request("blockchain.estimatefee", 2) == Decimal("0.00001")
    assert await electrum.request("server.peers.subscribe") == []


async def test_protocol_errors(devnet: ManagedServer, electrum: ElectrumClient) -> None:
    with pytest.raises(ElectrumError) as unknown:
        await electrum.request("blockchain.no_such_method")
    assert unknown.value.code == -32601
    with pytest.raises(ElectrumError) as params:
        await electrum.request("blockchain.scripthash.get_balance")
    assert params.value.code == -32602
    with pytest.raises(ElectrumError, match="Invalid scripthash"):
        await electrum.request("blockchain.scripthash.get_balance", "zz")
    with pytest.raises(ElectrumError, match="out of range"):
        await electrum.request("blockchain.block.header", 10**6)
    parse_error, batch = await raw_exchange(
        devnet.url,
        [
            b"{not json\n",
            b'[{"jsonrpc": "2.0", "id": 1, "method": "server.ping"}, '
            b'{"jsonrpc": "2.0", "id": 2, "method": "blockchain.relayfee"}]\n',
        ],
        2,
    )
    assert parse_error["error"]["code"] == -32700
    assert [item["id"] for item in batch] == [1, 2] and batch[0]["result"] is None


# --- headers ------------------------------------------------------------------------------


def header_fields(header: bytes) -> tuple[bytes, bytes, int]:
    """(previous block hash, merkle root, bits) of an 80-byte header."""
    return header[4:36], header[36:68], int.from_bytes(header[72:76], "little")


def target(bits: int) -> int:
    exponent, mantissa = bits >> 24, bits & 0x007FFFFF
    return mantissa << 8 * (exponent - 3)


async def test_headers_subscribe_notifies_the_new_tip(electrum: ElectrumClient) -> None:
    tip = await electrum.request("blockchain.headers.subscribe")
    assert tip["hex"] == await electrum.request("blockchain.block.header", tip["height"])
    await settled(electrum)
    [mined] = await electrum.request("devnet.mine", 1)
    [notified] = await next_notification(electrum.notifications, "blockchain.headers.subscribe")
    assert notified["height"] == tip["height"] + 1
    header = bytes.fromhex(notified["hex"])
    assert sha256d(header)[::-1].hex() == mined
    assert header_fields(header)[0] == sha256d(bytes.fromhex(tip["hex"]))


async def test_headers_hash_to_their_blocks_and_link(electrum: ElectrumClient) -> None:
    hashes = await electrum.request("devnet.mine", 3)
    height = await tip_height(electrum)
    chunk = await electrum.request("blockchain.block.headers", height - 5, 10)
    assert chunk["count"] == 6 and chunk["max"] >= 2016
    raw = bytes.fromhex(chunk["hex"])
    headers = [raw[i : i + 80] for i in range(0, len(raw), 80)]
    assert len(headers) == 6
    for previous, header in itertools.pairwise(headers):
        prev_hash, _root, bits = header_fields(header)
        assert prev_hash == sha256d(previous)
        assert int.from_bytes(sha256d(header), "little") <= target(bits)
    assert [sha256d(h)[::-1].hex() for h in headers[-3:]] == hashes
    for offset, header in enumerate(headers):
        assert await electrum.request("blockchain.block.header", height - 5 + offset) == header.hex()


async def test_header_checkpoint_proof(electrum: ElectrumClient) -> None:
    cp_height = await tip_height(electrum)
    chunk = await electrum.request("blockchain.block.headers", 0, cp_height + 1)
    assert chunk["count"] == cp_height + 1
    all_headers = bytes.fromhex(chunk["hex"])
    level = [sha256d(all_headers[i : i + 80]) for i in range(0, len(all_headers), 80)]
    while len(level) > 1:
        level = level + level[-1:] if len(level) % 2 else level
        level = [sha256d(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    proof = await electrum.request("blockchain.block.header", 5, cp_height)
    assert proof["root"] == level[0][::-1].hex()
    node, index = sha256d(bytes.fromhex(proof["header"])), 5
    for sibling in proof["branch"]:
        pair = bytes.fromhex(sibling)[::-1]
        node = sha256d(pair + node) if index & 1 else sha256d(node + pair)
        index //= 2
    assert node == level[0]


# --- scripthashes -------------------------------------------------------------------------


async def test_status_follows_history_through_mempool_and_confirmation(electrum: ElectrumClient) -> None:
    key, change = Key(), Key()
    assert await electrum.request("blockchain.scripthash.subscribe", key.scripthash) is None
    deposit = await fund(electrum, key, 100_000, confirm=False)
    _, status = await next_notification(electrum.notifications, "blockchain.scripthash.subscribe", key=key.scripthash)
    history = await electrum.request("blockchain.scripthash.get_history", key.scripthash)
    assert [(item["tx_hash"], item["height"]) for item in history] == [(deposit.txid, 0)]
    assert history[0]["fee"] > 0
    assert status == electrum_status(history)

    # A spend of the unconfirmed deposit has an unconfirmed parent: height -1, listed after height 0.
    spend = build([deposit], [(change.script, 99_000), (key.script, 800)])
    spend_txid = await electrum.request("blockchain.transaction.broadcast", spend.serialize().hex())
    _, status = await next_notification(electrum.notifications, "blockchain.scripthash.subscribe", key=key.scripthash)
    history = await electrum.request("blockchain.scripthash.get_history", key.scripthash)
    assert [(item["tx_hash"], item["height"]) for item in history] == [(deposit.txid, 0), (spend_txid, -1)]
    assert status == electrum_status(history)
    assert await electrum.request("blockchain.scripthash.get_mempool", key.scripthash) == history

    [block] = await electrum.request("devnet.mine", 1)
    height = await tip_height(electrum)
    _, status = await next_notification(electrum.notifications, "blockchain.scripthash.subscribe", key=key.scripthash)
    history = await electrum.request("blockchain.scripthash.get_history", key.scripthash)
    assert {item["tx_hash"] for item in history} == {deposit.txid, spend_txid}
    assert all(item["height"] == height and "fee" not in item for item in history)
    assert status == electrum_status(history)
    assert status == await electrum.request("blockchain.scripthash.subscribe", key.scripthash)
    assert block == (await electrum.request("devnet.info"))["tip"]


async def test_balance_and_unspent_before_and_after_confirmation(electrum: ElectrumClient) -> None:
    key, other = Key(), Key()
    deposit = await fund(electrum, key, 50_000, confirm=False)
    assert await electrum.request("blockchain.scripthash.get_balance", key.scripthash) == {
        "confirmed": 0,
        "unconfirmed": 50_000,
    }
    assert await electrum.request("blockchain.scripthash.listunspent", key.scripthash) == [
        {"tx_hash": deposit.txid, "tx_pos": deposit.vout, "height": 0, "value": 50_000}
    ]
    await electrum.request("devnet.mine", 1)
    height = await tip_height(electrum)
    assert await electrum.request("blockchain.scripthash.get_balance", key.scripthash) == {
        "confirmed": 50_000,
        "unconfirmed": 0,
    }
    assert await electrum.request("blockchain.scripthash.listunspent", key.scripthash) == [
        {"tx_hash": deposit.txid, "tx_pos": deposit.vout, "height": height, "value": 50_000}
    ]
    # Spent in the mempool: the confirmed balance stays until the spend is mined, the output is no longer listed.
    spend = build([deposit], [(other.script, 49_000)])
    await electrum.request("blockchain.transaction.broadcast", spend.serialize().hex())
    assert await electrum.request("blockchain.scripthash.get_balance", key.scripthash) == {
        "confirmed": 50_000,
        "unconfirmed": -50_000,
    }
    assert await electrum.request("blockchain.scripthash.listunspent", key.scripthash) == []
    await electrum.request("devnet.mine", 1)
    assert await electrum.request("blockchain.scripthash.get_balance", key.scripthash) == {
        "confirmed": 0,
        "unconfirmed": 0,
    }
    assert await electrum.request("blockchain.scripthash.get_balance", other.scripthash) == {
        "confirmed": 49_000,
        "unconfirmed": 0,
    }


async def test_unsubscribe_stops_notifications(electrum: ElectrumClient) -> None:
    key = Key()
    await electrum.request("blockchain.scripthash.subscribe", key.scripthash)
    assert await electrum.request("blockchain.scripthash.unsubscribe", key.scripthash) is True
    assert await electrum.request("blockchain.scripthash.unsubscribe", key.scripthash) is False
    await fund(electrum, key, 10_000)
    notified = [params[0] for method, params in await settled(electrum) if method == "blockchain.scripthash.subscribe"]
    assert key.scripthash not in notified


# --- transactions -------------------------------------------------------------------------


async def test_transaction_get_raw_and_verbose(electrum: ElectrumClient) -> None:
    key, payee = Key(), Key()
    deposit = await fund(electrum, key, 80_000)
    spend = build([deposit], [(payee.script, 70_000), (key.script, 9_000)])
    txid = await electrum.request("blockchain.transaction.broadcast", spend.serialize().hex())
    assert txid == txid_of(spend)
    assert await electrum.request("blockchain.transaction.get", txid) == spend.serialize().hex()

    pending = await electrum.request("blockchain.transaction.get", txid, True)
    assert "confirmations" not in pending and "blockhash" not in pending
    assert pending["txid"] == txid
    assert pending["hash"] == sha256d(spend.serialize())[::-1].hex()
    assert pending["hex"] == spend.serialize().hex()
    assert pending["vsize"] == vsize_of(spend) and pending["size"] == len(spend.serialize())
    [vin] = pending["vin"]
    assert (vin["txid"], vin["vout"], vin["sequence"]) == (deposit.txid, deposit.vout, RBF)
    assert vin["txinwitness"][1] == key.pub.hex()
    first, second = pending["vout"]
    assert first["value"] == Decimal("0.0007") and first["n"] == 0
    assert first["scriptPubKey"]["address"] == payee.address
    assert first["scriptPubKey"]["type"] == "witness_v0_keyhash"
    assert first["scriptPubKey"]["hex"] == payee.script.hex()
    assert second["value"] == Decimal("0.00009")

    blocks = await electrum.request("devnet.mine", 2)
    mined = await electrum.request("blockchain.transaction.get", txid, True)
    assert mined["confirmations"] == 2 and mined["blockhash"] == blocks[0]
    assert mined["time"] == mined["blocktime"] > 0

    with pytest.raises(ElectrumError) as missing:
        await electrum.request("blockchain.transaction.get", "11" * 32)
    assert missing.value.code == 2 and "No such mempool or blockchain transaction" in missing.value.message


async def test_merkle_proof_matches_the_header(electrum: ElectrumClient) -> None:
    keys = [Key() for _ in range(5)]
    txids = [await electrum.request("devnet.faucet", key.address, 20_000 + i) for i, key in enumerate(keys)]
    await electrum.request("devnet.mine", 1)
    height = await tip_height(electrum)
    merkle_root = bytes.fromhex(await electrum.request("blockchain.block.header", height))[36:68]
    positions = set()
    for txid in txids:
        proof = await electrum.request("blockchain.transaction.get_merkle", txid, height)
        assert proof["block_height"] == height
        node, index = bytes.fromhex(txid)[::-1], proof["pos"]
        positions.add(index)
        for sibling in proof["merkle"]:
            pair = bytes.fromhex(sibling)[::-1]
            node = sha256d(pair + node) if index & 1 else sha256d(node + pair)
            index //= 2
        assert node == merkle_root
        assert await electrum.request("blockchain.transaction.id_from_pos", height, proof["pos"]) == txid
    assert len(positions) == 5 and 0 not in positions  # the coinbase is at 0
    with pytest.raises(ElectrumError, match="No transaction matching"):
        await electrum.request("blockchain.transaction.get_merkle", txids[0], height - 1)


async def test_valid_p2wpkh_spend_is_accepted_and_rebroadcast_is_harmless(electrum: ElectrumClient) -> None:
    key, payee = Key(), Key()
    deposit = await fund(electrum, key, 60_000)
    spend = build([deposit], [(payee.script, 59_000)])
    txid = await electrum.request("blockchain.transaction.broadcast", spend.serialize().hex())
    assert txid == txid_of(spend)
    # The same bytes again are answered with the txid, as bitcoind does.
    assert await electrum.request("blockchain.transaction.broadcast", spend.serialize().hex()) == txid
    await electrum.request("devnet.mine", 1)
    assert await rejection(electrum, spend.serialize().hex()) == "Transaction outputs already in utxo set"


async def test_rejections(electrum: ElectrumClient) -> None:
    key, payee = Key(), Key()
    deposit = await fund(electrum, key, 100_000)

    wrong_amount = Utxo(deposit.txid, deposit.vout, deposit.value + 1, key)  # signs a different BIP143 digest
    bad_signature = build([wrong_amount], [(payee.script, 90_000)])
    assert await rejection(electrum, bad_signature.serialize().hex()) == (
        "mandatory-script-verify-flag-failed (Signature must be zero for failed CHECK(MULTI)SIG operation)"
    )
    stranger = Key()
    wrong_key = build([Utxo(deposit.txid, deposit.vout, deposit.value, stranger)], [(payee.script, 90_000)])
    assert await rejection(electrum, wrong_key.serialize().hex()) == (
        "mandatory-script-verify-flag-failed (Script failed an OP_EQUALVERIFY operation)"
    )

    missing = build([Utxo("ab" * 32, 0, 100_000, key)], [(payee.script, 90_000)])
    assert await rejection(electrum, missing.serialize().hex()) == "bad-txns-inputs-missingorspent"

    creates_value = build([deposit], [(payee.script, 100_001)])
    assert await rejection(electrum, creates_value.serialize().hex()) == (
        "bad-txns-in-belowout, value in (0.001) < value out (0.00100001)"
    )

    # Signatures vary in length by a byte, so stay two satoshis under 1 sat/vB.
    fee = vsize_of(build([deposit], [(payee.script, 1)])) - 2
    cheap = build([deposit], [(payee.script, 100_000 - fee)])
    assert await rejection(electrum, cheap.serialize().hex()) == f"min relay fee not met, {fee} < {vsize_of(cheap)}"

    dust = build([deposit], [(payee.script, 293), (key.script, 99_000)])
    assert await rejection(electrum, dust.serialize().hex()) == "dust"

    first = build([deposit], [(payee.script, 99_000)], sequence=FINAL)
    await electrum.request("blockchain.transaction.broadcast", first.serialize().hex())
    double = build([deposit], [(key.script, 98_000)], sequence=FINAL)
    assert await rejection(electrum, double.serialize().hex()) == "txn-mempool-conflict"
    await electrum.request("devnet.mine", 1)
    assert await rejection(electrum, double.serialize().hex()) == "bad-txns-inputs-missingorspent"

    garbage = await rejection(electrum, "0200")
    assert garbage.startswith("TX decode failed")


async def test_bip125_replacement(electrum: ElectrumClient) -> None:
    key, payee = Key(), Key()
    deposit = await fund(electrum, key, 100_000)
    original = build([deposit], [(payee.script, 99_000)])  # fee 1000, signals RBF
    original_txid = await electrum.request("blockchain.transaction.broadcast", original.serialize().hex())

    same_fee = build([deposit], [(key.script, 99_000)])
    assert (await rejection(electrum, same_fee.serialize().hex())).startswith("insufficient fee, rejecting replacement")
    # A higher rate, but 50 more satoshis do not pay the incremental relay fee for its ~110 vbytes.
    tiny_bump = build([deposit], [(payee.script, 98_950)])
    assert "not enough additional fees to relay" in await rejection(electrum, tiny_bump.serialize().hex())

    await electrum.request("blockchain.scripthash.subscribe", payee.scripthash)
    replacement = build([deposit], [(payee.script, 97_000)])
    txid = await electrum.request("blockchain.transaction.broadcast", replacement.serialize().hex())
    mempool = await electrum.request("blockchain.scripthash.get_mempool", payee.scripthash)
    assert [(item["tx_hash"], item["fee"]) for item in mempool] == [(txid, 3_000)]
    with pytest.raises(ElectrumError):
        await electrum.request("blockchain.transaction.get", original_txid)

    # Without the BIP125 signal the first spend stays.
    other = await fund(electrum, key, 50_000)
    final = build([other], [(payee.script, 49_000)], sequence=FINAL)
    await electrum.request("blockchain.transaction.broadcast", final.serialize().hex())
    richer = build([other], [(payee.script, 40_000)])
    assert await rejection(electrum, richer.serialize().hex()) == "txn-mempool-conflict"


async def test_coinbase_maturity(electrum: ElectrumClient) -> None:
    miner, payee = Key(), Key()
    await electrum.request("devnet.mine", 1, miner.address)
    [coinbase] = await electrum.request("blockchain.scripthash.listunspent", miner.scripthash)
    assert coinbase["value"] >= SUBSIDY
    utxo = Utxo(coinbase["tx_hash"], coinbase["tx_pos"], coinbase["value"], miner)
    spend = build([utxo], [(payee.script, coinbase["value"] - 1_000)])
    assert await rejection(electrum, spend.serialize().hex()) == (
        "bad-txns-premature-spend-of-coinbase, tried to spend coinbase at depth 1"
    )
    await electrum.request("devnet.mine", 98)
    assert await rejection(electrum, spend.serialize().hex()) == (
        "bad-txns-premature-spend-of-coinbase, tried to spend coinbase at depth 99"
    )
    await electrum.request("devnet.mine", 1)
    assert await electrum.request("blockchain.transaction.broadcast", spend.serialize().hex()) == txid_of(spend)


# --- reorgs -------------------------------------------------------------------------------


async def test_reorg_returns_a_deposit_to_the_mempool(electrum: ElectrumClient) -> None:
    key = Key()
    await electrum.request("blockchain.headers.subscribe")
    await electrum.request("blockchain.scripthash.subscribe", key.scripthash)
    deposit = await fund(electrum, key, 40_000)
    height = await tip_height(electrum)
    confirmed = await electrum.request("blockchain.scripthash.get_history", key.scripthash)
    assert confirmed == [{"tx_hash": deposit.txid, "height": height}]
    await settled(electrum)

    new_blocks = await electrum.request("devnet.reorg", 1)
    assert len(new_blocks) == 2
    [tip] = await next_notification(electrum.notifications, "blockchain.headers.subscribe")
    assert tip["height"] == height + 1
    assert sha256d(bytes.fromhex(tip["hex"]))[::-1].hex() == new_blocks[-1]
    _, status = await next_notification(electrum.notifications, "blockchain.scripthash.subscribe", key=key.scripthash)
    history = await electrum.request("blockchain.scripthash.get_history", key.scripthash)
    assert [(item["tx_hash"], item["height"]) for item in history] == [(deposit.txid, 0)]
    assert status == electrum_status(history) != electrum_status(confirmed)
    assert "confirmations" not in await electrum.request("blockchain.transaction.get", deposit.txid, True)
    assert await electrum.request("blockchain.scripthash.get_balance", key.scripthash) == {
        "confirmed": 0,
        "unconfirmed": 40_000,
    }

    await electrum.request("devnet.mine", 1)
    _, status = await next_notification(electrum.notifications, "blockchain.scripthash.subscribe", key=key.scripthash)
    history = await electrum.request("blockchain.scripthash.get_history", key.scripthash)
    assert history == [{"tx_hash": deposit.txid, "height": height + 2}]
    assert status == electrum_status(history)


async def test_reorg_can_drop_a_deposit_and_what_spends_it(electrum: ElectrumClient) -> None:
    key, payee = Key(), Key()
    deposit = await fund(electrum, key, 40_000)
    child = build([deposit], [(payee.script, 39_000)])
    await electrum.request("blockchain.transaction.broadcast", child.serialize().hex())
    await electrum.request("blockchain.scripthash.subscribe", key.scripthash)
    await electrum.request("blockchain.scripthash.subscribe", payee.scripthash)
    await settled(electrum)

    await electrum.request("devnet.reorg", 1, [deposit.txid])
    notified = dict(n[1] for n in await settled(electrum) if n[0] == "blockchain.scripthash.subscribe")
    assert notified == {key.scripthash: None, payee.scripthash: None}
    assert await electrum.request("blockchain.scripthash.get_history", key.scripthash) == []
    for txid in (deposit.txid, txid_of(child)):
        with pytest.raises(ElectrumError) as gone:
            await electrum.request("blockchain.transaction.get", txid)
        assert gone.value.code == 2
    with pytest.raises(ElectrumError, match="not in the last 1 blocks"):
        await electrum.request("devnet.reorg", 1, [deposit.txid])


async def test_reorg_including_the_mempool_reconfirms_at_the_same_height(electrum: ElectrumClient) -> None:
    key = Key()
    deposit = await fund(electrum, key, 30_000)
    height = await tip_height(electrum)
    old_block = (await electrum.request("blockchain.transaction.get", deposit.txid, True))["blockhash"]
    new_blocks = await electrum.request("devnet.reorg", 1, [], True)
    verbose = await electrum.request("blockchain.transaction.get", deposit.txid, True)
    assert verbose["blockhash"] == new_blocks[0] != old_block
    assert verbose["confirmations"] == 2
    proof = await electrum.request("blockchain.transaction.get_merkle", deposit.txid, height)
    assert proof["block_height"] == height
    assert await electrum.request("blockchain.scripthash.get_history", key.scripthash) == [
        {"tx_hash": deposit.txid, "height": height}
    ]


# --- devnet control -------------------------------------------------------------------------


async def test_faucet_and_info(electrum: ElectrumClient) -> None:
    info = await electrum.request("devnet.info")
    assert info["hrp"] == "alpha" and info["coinbase_maturity"] == 100
    assert info["faucet_address"].startswith("alpha1q")
    assert info["faucet_balance"] >= SUBSIDY
    with pytest.raises(ElectrumError, match="invalid address"):
        await electrum.request("devnet.faucet", "bc1qcr8te4kr609gcawutmrza0j4xv80jy8zn4smkh", 1000)
    with pytest.raises(ElectrumError, match="positive whole number"):
        await electrum.request("devnet.faucet", Key().address, 0)
    with pytest.raises(ElectrumError, match="dust"):
        await electrum.request("devnet.faucet", Key().address, 100)
    # The faucet's payment is a real signed transaction whose input is the faucet's own output.
    key = Key()
    txid = await electrum.request("devnet.faucet", key.address, 12_345)
    verbose = await electrum.request("blockchain.transaction.get", txid, True)
    funding = await electrum.request("blockchain.transaction.get", verbose["vin"][0]["txid"], True)
    spent = funding["vout"][verbose["vin"][0]["vout"]]
    assert spent["scriptPubKey"]["address"] == info["faucet_address"]
    assert len(verbose["vin"][0]["txinwitness"]) == 2


async def test_autominer(electrum: ElectrumClient) -> None:
    start = await electrum.request("blockchain.headers.subscribe")
    key = Key()
    txid = await electrum.request("devnet.faucet", key.address, 10_000)
    assert await electrum.request("devnet.autominer", 0.2) == {"seconds": Decimal("0.2")}
    try:
        [tip] = await next_notification(electrum.notifications, "blockchain.headers.subscribe", timeout=10)
        assert tip["height"] > start["height"]
    finally:
        await electrum.request("devnet.autominer", 0)
    # The autominer includes the mempool.
    assert (await electrum.request("blockchain.transaction.get", txid, True))["confirmations"] >= 1


# --- the production Alpha chain's rules ------------------------------------------------------


@pytest.fixture(scope="module")
def alpha_devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    root = tmp_path_factory.mktemp("alpha-devnet")
    server = start_unicity_devnet(free_port(), root / "data", root / "devnet.log", alpha=True)
    yield server
    server.stop()


def split_headers(raw: bytes) -> list[bytes]:
    """Concatenated headers, each 80 bytes or, with version bit 1 (RandomX), 112 bytes."""
    headers, pos = [], 0
    while pos < len(raw):
        size = 112 if int.from_bytes(raw[pos : pos + 4], "little") & 2 else 80
        headers.append(raw[pos : pos + size])
        pos += size
    return headers


async def test_alpha_headers_are_112_bytes_and_hash_whole(alpha_devnet: ManagedServer) -> None:
    async with await ElectrumClient.connect(alpha_devnet.url) as client:
        assert (await client.request("devnet.info"))["alpha_rules"] is True
        tip = await client.request("blockchain.headers.subscribe")
        [mined] = await client.request("devnet.mine", 1)
        [notified] = await next_notification(client.notifications, "blockchain.headers.subscribe")
        header = bytes.fromhex(notified["hex"])
        assert len(header) == 112 and int.from_bytes(header[:4], "little") == 0x20000002
        assert sha256d(header)[::-1].hex() == mined
        assert header[4:36] == sha256d(bytes.fromhex(tip["hex"]))
        # The work is checked on hashRandomX (here sha256d of the first 80 bytes stands in for RandomX).
        assert header[80:] == sha256d(header[:80])
        assert int.from_bytes(header[80:], "little") <= target(header_fields(header)[2])
        # The genesis header is a plain 80-byte one, as on the real chain before RandomX.
        chunk = await client.request("blockchain.block.headers", 0, 3)
        headers = split_headers(bytes.fromhex(chunk["hex"]))
        assert [len(h) for h in headers] == [80, 112, 112] and chunk["count"] == 3
        for previous, current in itertools.pairwise(headers):
            assert current[4:36] == sha256d(previous)


async def test_alpha_allows_exactly_one_input(alpha_devnet: ManagedServer) -> None:
    async with await ElectrumClient.connect(alpha_devnet.url) as client:
        key, payee = Key(), Key()
        first = await fund(client, key, 60_000)
        second = await fund(client, key, 40_000)
        funding = await client.request("blockchain.transaction.get", first.txid, True)
        assert len(funding["vin"]) == 1
        both = build([first, second], [(payee.script, 99_000)])
        assert await rejection(client, both.serialize().hex()) == (
            "bad-txns-too-many-inputs, Alpha Transactions must have exactly one input"
        )
        one = build([first], [(payee.script, 59_000)])
        txid = await client.request("blockchain.transaction.broadcast", one.serialize().hex())
        await client.request("devnet.mine", 1)
        height = await tip_height(client)
        proof = await client.request("blockchain.transaction.get_merkle", txid, height)
        header = bytes.fromhex(await client.request("blockchain.block.header", height))
        node, index = bytes.fromhex(txid)[::-1], proof["pos"]
        for sibling in proof["merkle"]:
            pair = bytes.fromhex(sibling)[::-1]
            node = sha256d(pair + node) if index & 1 else sha256d(node + pair)
            index //= 2
        assert node == header[36:68]
        with pytest.raises(ElectrumError, match="one input"):
            await client.request("devnet.faucet", key.address, 10**12)
