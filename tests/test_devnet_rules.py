"""The devnet's rules without a server: scripts and signatures, mempool policy, indexes, reorgs, storage.

Each case is checked against the text bitcoind gives for it, or a published test vector.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from bitcoin.core import CBlock, CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CTxInWitness, CTxWitness
from bitcoin.core.script import (
    SIGHASH_ALL,
    SIGHASH_ANYONECANPAY,
    SIGVERSION_WITNESS_V0,
    CScript,
    CScriptWitness,
    SignatureHash,
)
from bitcoin.wallet import CKey
from hypothesis import given
from hypothesis import strategies as st

from otc_devnet import script as scripts
from otc_devnet.chain import Chain, ChainError
from otc_devnet.faucet import Faucet
from otc_devnet.merkle import merkle_branch, merkle_root, root_from_branch
from otc_devnet.params import ChainParams, format_money
from otc_devnet.server import PROTOCOL_MAX, RpcError, negotiate
from otc_devnet.store import BlockFile, read_records
from otc_devnet.tx import parse_tx
from otc_devnet.validation import Rejected
from tests.devnet_support import FINAL, Key, Utxo, build, electrum_status, hash160, sighash, txid_of

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def faucet() -> Faucet:
    return Faucet(CKey(hashlib.sha256(b"devnet rules faucet").digest(), compressed=True), "alpha")


@pytest.fixture
def chain(faucet: Faucet) -> Chain:
    """A chain whose faucet has mature coins: maturity 10, 12 blocks."""
    chain = Chain(ChainParams(coinbase_maturity=10), faucet.script, clock=Clock())
    chain.load([])
    chain.mine(12)
    chain.take_changes()
    return chain


def pay(chain: Chain, faucet: Faucet, key: Key, amount: int, *, mine: bool = True) -> Utxo:
    tx = faucet.pay(chain, key.script, amount)
    chain.accept(tx)
    if mine:
        chain.mine(1)
    return Utxo(tx.txid_hex, 0, amount, key)


def submit(chain: Chain, tx: CMutableTransaction) -> str:
    return chain.accept(parse_tx(tx.serialize())).tx.txid_hex


def refused(chain: Chain, tx: CMutableTransaction) -> str:
    with pytest.raises(Rejected) as caught:
        chain.accept(parse_tx(tx.serialize()))
    return str(caught.value)


def with_stack(tx: CMutableTransaction, *stack: bytes) -> CMutableTransaction:
    tx.wit = CTxWitness([CTxInWitness(CScriptWitness(list(stack)))])
    return tx


def der(r: int, s: int) -> bytes:
    def integer(value: int) -> bytes:
        body = value.to_bytes((value.bit_length() + 8) // 8, "big")
        return bytes([2, len(body)]) + body

    body = integer(r) + integer(s)
    return bytes([0x30, len(body)]) + body


def r_s(sig: bytes) -> tuple[int, int]:
    len_r = sig[3]
    return int.from_bytes(sig[4 : 4 + len_r], "big"), int.from_bytes(sig[6 + len_r : 6 + len_r + sig[5 + len_r]], "big")


# --- encodings ------------------------------------------------------------------------------


def test_format_money_matches_bitcoind() -> None:
    assert format_money(10_000) == "0.0001"
    assert format_money(100_000_000) == "1.00"
    assert format_money(150_000_000) == "1.50"
    assert format_money(100_000_001) == "1.00000001"
    assert format_money(0) == "0.00"


def test_descriptor_checksum_vector() -> None:
    # BIP380's example.
    assert scripts.descriptor_checksum("raw(deadbeef)") == "89f8spxm"


def test_addresses_bip173_and_bip350_vectors() -> None:
    assert (
        scripts.script_for_address("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "bc").hex()
        == "0014751e76e8199196d454941c45d1b3a323f1433bd6"
    )
    taproot = "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"
    script = scripts.script_for_address(taproot, "bc")
    assert script.hex() == "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    assert scripts.address_of(script, "bc") == taproot
    # A version 0 program with the bech32m checksum is not an address.
    with pytest.raises(scripts.AddressError):
        scripts.script_for_address(scripts._bech32_encode("bc", [0, *([0] * 32)], 0x2BC830A3), "bc")
    alpha = "alpha1qcr8te4kr609gcawutmrza0j4xv80jy8zn4smkh"
    assert scripts.address_of(scripts.script_for_address(alpha, "alpha"), "alpha") == alpha
    with pytest.raises(scripts.AddressError, match="prefix"):
        scripts.script_for_address(alpha, "bc")


def test_scripthash_example_from_the_protocol_documentation() -> None:
    p2pkh = bytes.fromhex("76a91462e907b15cbf27d5425399ebf6f0fb50ebb88f1888ac")
    assert scripts.scripthash(p2pkh) == "8b01df4e368ea28f8dc0423bcf7a4923e3a12d307c875e47a0cfbf90b5c39161"


def test_script_types_and_dust() -> None:
    p2wpkh = b"\x00\x14" + bytes(20)
    p2wsh = b"\x00\x20" + bytes(32)
    p2tr = b"\x51\x20" + bytes(32)
    p2pkh = b"\x76\xa9\x14" + bytes(20) + b"\x88\xac"
    data = b"\x6a\x04abcd"
    assert [scripts.script_type(s) for s in (p2wpkh, p2wsh, p2tr, p2pkh, data, b"\x51")] == [
        "witness_v0_keyhash",
        "witness_v0_scripthash",
        "witness_v1_taproot",
        "pubkeyhash",
        "nulldata",
        "nonstandard",
    ]
    assert [scripts.dust_threshold(s, 3000) for s in (p2wpkh, p2wsh, p2tr, p2pkh, data)] == [294, 330, 330, 546, 0]
    assert scripts.asm(p2pkh) == f"OP_DUP OP_HASH160 {bytes(20).hex()} OP_EQUALVERIFY OP_CHECKSIG"


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40), st.data())
def test_merkle_branches_lead_to_the_root(hashes: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(hashes) - 1))
    root = merkle_root(hashes)
    assert root == CBlock.build_merkle_tree_from_txids(hashes)[-1]
    assert root_from_branch(hashes[index], merkle_branch(hashes, index), index) == root


def test_version_negotiation_rules() -> None:
    assert negotiate("1.4") == (1, 4)
    assert negotiate(["1.4", "1.4.2"]) == PROTOCOL_MAX
    assert negotiate(["1.2", "2.0"]) == PROTOCOL_MAX
    for unsupported in ("1.3", "1.5", ["1.0", "1.3"], ["1.5", "1.6"], "x", ["1.4", "1.2"]):
        with pytest.raises(RpcError) as caught:
            negotiate(unsupported)
        assert caught.value.disconnect


# --- signatures -------------------------------------------------------------------------------


def test_signature_policy_and_consensus_failures(chain: Chain, faucet: Faucet) -> None:
    key, payee = Key(), Key()
    utxo = pay(chain, faucet, key, 100_000)
    good = build([utxo], [(payee.script, 99_000)])
    digest = sighash(good, 0, utxo)
    sig = key.sign(digest)
    r, s = r_s(sig[:-1])

    high_s = with_stack(build([utxo], [(payee.script, 99_000)]), der(r, N - s) + b"\x01", key.pub)
    assert refused(chain, high_s) == (
        "non-mandatory-script-verify-flag (Non-canonical signature: S value is unnecessarily high)"
    )
    high_s_bad = with_stack(build([utxo], [(payee.script, 99_000)]), der(r, N - s + 1) + b"\x01", key.pub)
    assert refused(chain, high_s_bad) == (
        "mandatory-script-verify-flag-failed (Non-canonical signature: S value is unnecessarily high)"
    )
    padded_sig = b"\x30" + bytes([sig[1] + 1]) + sig[2:-1] + b"\x00\x01"
    padded = with_stack(build([utxo], [(payee.script, 99_000)]), padded_sig, key.pub)
    assert refused(chain, padded).startswith("mandatory-script-verify-flag-failed (Non-canonical DER signature)")
    empty = with_stack(build([utxo], [(payee.script, 99_000)]), b"", key.pub)
    assert refused(chain, empty) == (
        "mandatory-script-verify-flag-failed "
        "(Script evaluated without error but finished with a false/empty top stack element)"
    )
    three = with_stack(build([utxo], [(payee.script, 99_000)]), sig, key.pub, b"")
    assert refused(chain, three) == "mandatory-script-verify-flag-failed (Witness program hash mismatch)"
    odd_hashtype = build([utxo], [(payee.script, 99_000)])
    with_stack(odd_hashtype, key.sign(sighash(odd_hashtype, 0, utxo, 4), 4), key.pub)
    assert refused(chain, odd_hashtype) == (
        "non-mandatory-script-verify-flag (Signature hash type missing or not understood)"
    )
    script_sig = build([utxo], [(payee.script, 99_000)])
    script_sig.vin[0].scriptSig = CScript(b"\x01\x01")
    assert refused(chain, script_sig) == "mandatory-script-verify-flag-failed (Witness requires empty scriptSig)"

    anyone_can_pay = build([utxo], [(payee.script, 99_000)])
    hashtype = SIGHASH_ALL | SIGHASH_ANYONECANPAY
    with_stack(anyone_can_pay, key.sign(sighash(anyone_can_pay, 0, utxo, hashtype), hashtype), key.pub)
    assert submit(chain, anyone_can_pay) == txid_of(anyone_can_pay)


def test_uncompressed_keys_are_refused_by_policy(chain: Chain, faucet: Faucet) -> None:
    secret = os.urandom(32)
    uncompressed = CKey(secret, compressed=False)
    pub = bytes(uncompressed.pub)
    program = hash160(pub)
    script = b"\x00\x14" + program
    funding = faucet.pay(chain, script, 50_000)
    chain.accept(funding)
    chain.mine(1)
    key = Key()  # only for its signing helper's shape; the signature below is by the uncompressed key
    utxo = Utxo(funding.txid_hex, 0, 50_000, key)
    tx = build([utxo], [(Key().script, 49_000)])
    code = CScript(b"\x76\xa9\x14" + program + b"\x88\xac")
    digest = SignatureHash(code, tx, 0, SIGHASH_ALL, amount=50_000, sigversion=SIGVERSION_WITNESS_V0)
    with_stack(tx, bytes(uncompressed.sign(digest)) + b"\x01", pub)
    assert refused(chain, tx) == "non-mandatory-script-verify-flag (Using non-compressed keys in segwit)"


# --- mempool policy -----------------------------------------------------------------------------


def test_standardness_and_context_rules(chain: Chain, faucet: Faucet) -> None:
    key, payee = Key(), Key()
    utxo = pay(chain, faucet, key, 100_000)
    assert refused(chain, build([utxo], [(payee.script, 99_000)], version=4)) == "version"
    long_data = b"\x6a\x4c\x51" + bytes(81)
    assert refused(chain, build([utxo], [(long_data, 0), (payee.script, 99_000)])) == "scriptpubkey"
    two_data = [(b"\x6a\x01\x01", 0), (b"\x6a\x01\x02", 0), (payee.script, 99_000)]
    assert refused(chain, build([utxo], two_data)) == "multi-op-return"
    assert refused(chain, build([utxo], [(b"\x6a", 99_000)])) == "tx-size-small"
    assert refused(chain, build([utxo, utxo], [(payee.script, 99_000)])) == "bad-txns-inputs-duplicate"
    big = pay(chain, faucet, key, 5_000_000)
    assert refused(chain, build([big], [(payee.script, 10_000)])).startswith("Fee exceeds maximum configured by user")
    fake_coinbase = CMutableTransaction(
        [CMutableTxIn(COutPoint(), CScript(b"\x01\x02"))], [CMutableTxOut(1000, key.script)]
    )
    assert refused(chain, fake_coinbase) == "coinbase"
    with pytest.raises(Rejected, match="already in utxo set"):
        chain.accept(chain.tip.txs[0])
    height = chain.height
    assert refused(chain, build([utxo], [(payee.script, 99_000)], locktime=height + 1)) == "non-final"
    # Anti-fee-sniping lock time (the current height) is final for the next block.
    first = build([utxo], [(payee.script, 99_000)], locktime=height)
    submit(chain, first)
    # The same transaction with another signature: same txid, different wtxid.
    resigned = build([utxo], [(payee.script, 99_000)], locktime=height)
    hashtype = SIGHASH_ALL | SIGHASH_ANYONECANPAY
    with_stack(resigned, key.sign(sighash(resigned, 0, utxo, hashtype), hashtype), key.pub)
    assert txid_of(resigned) == txid_of(first) and resigned.serialize() != first.serialize()
    assert refused(chain, resigned) == "txn-same-nonwitness-data-in-mempool"


def test_ancestor_limit(chain: Chain, faucet: Faucet) -> None:
    key = Key()
    utxo = pay(chain, faucet, key, 1_000_000, mine=False)  # the faucet transaction is the first ancestor
    value = utxo.value
    for _ in range(24):
        value -= 200
        tx = build([utxo], [(key.script, value)])
        utxo = Utxo(submit(chain, tx), 0, value, key)
    too_long = build([utxo], [(key.script, value - 200)])
    assert refused(chain, too_long) == "too-long-mempool-chain, too many unconfirmed ancestors [limit: 25]"
    chain.mine(1)
    assert submit(chain, too_long) == txid_of(too_long)


def test_replacement_rules(chain: Chain, faucet: Faucet) -> None:
    key, payee = Key(), Key()
    utxo = pay(chain, faucet, key, 100_000)
    unconfirmed = pay(chain, faucet, key, 30_000, mine=False)
    original = build([utxo], [(payee.script, 99_000)])
    original_txid = submit(chain, original)
    child = build([Utxo(original_txid, 0, 99_000, payee)], [(payee.script, 98_000)])
    child_txid = submit(chain, child)

    # Pays more than the original alone but less than original plus child: rule 3.
    cheaper = build([utxo], [(key.script, 98_500)])
    assert "less fees than conflicting txs" in refused(chain, cheaper)
    adds_unconfirmed = build([utxo, unconfirmed], [(key.script, 100_000)])
    assert refused(chain, adds_unconfirmed).startswith("replacement-adds-unconfirmed")
    spends_conflict = build([utxo, Utxo(original_txid, 0, 99_000, payee)], [(key.script, 150_000)])
    assert refused(chain, spends_conflict).startswith("bad-txns-spends-conflicting-tx")

    replacement = build([utxo], [(key.script, 95_000)])
    submit(chain, replacement)
    assert original_txid not in {entry.tx.txid_hex for entry in chain.mempool.values()}
    assert child_txid not in {entry.tx.txid_hex for entry in chain.mempool.values()}


def test_rebroadcast_of_the_same_bytes_is_accepted(chain: Chain, faucet: Faucet) -> None:
    key = Key()
    utxo = pay(chain, faucet, key, 100_000)
    tx = build([utxo], [(Key().script, 99_000)], sequence=FINAL)
    assert submit(chain, tx) == submit(chain, tx)
    assert len(chain.mempool) == 1


# --- Electrum indexes ---------------------------------------------------------------------------


def test_mempool_order_and_heights_in_history(chain: Chain, faucet: Faucet) -> None:
    key = Key()
    parent = pay(chain, faucet, key, 200_000, mine=False)
    other = pay(chain, faucet, key, 300_000, mine=False)
    child = build([parent], [(key.script, 199_000)])
    child_txid = submit(chain, child)
    entries = chain.mempool_history(key.scripthash)
    heights = [(entry.tx.txid_hex, entry.electrum_height) for entry in entries]
    zero = sorted([parent.txid, other.txid], key=lambda txid: bytes.fromhex(txid)[::-1])
    assert heights == [(zero[0], 0), (zero[1], 0), (child_txid, -1)]
    history = [{"tx_hash": txid, "height": height} for txid, height in heights]
    assert chain.status(key.scripthash) == electrum_status(history)
    # Once the parents confirm the child's height becomes 0 and the status changes with it.
    chain.take_changes()
    chain.mine(1)
    touched, tip_changed = chain.take_changes()
    assert tip_changed and key.scripthash in touched
    assert chain.status(key.scripthash) != electrum_status(history)


def test_reorg_drops_a_deep_transaction_and_its_confirmed_child(chain: Chain, faucet: Faucet) -> None:
    key, payee = Key(), Key()
    deposit = pay(chain, faucet, key, 100_000)
    child = build([deposit], [(payee.script, 99_000)])
    child_txid = submit(chain, child)
    chain.mine(1)
    height = chain.height
    with pytest.raises(ChainError):
        chain.reorg(height + 1)
    with pytest.raises(ChainError, match="not in the last 1 blocks"):
        chain.reorg(1, [bytes.fromhex(deposit.txid)[::-1]])
    new_blocks = chain.reorg(2, [bytes.fromhex(deposit.txid)[::-1]])
    assert len(new_blocks) == 3 and chain.height == height + 1
    assert chain.status(key.scripthash) is None and chain.status(payee.scripthash) is None
    assert child_txid not in {entry.tx.txid_hex for entry in chain.mempool.values()}
    # The faucet's own coins spent by the dropped payment are unspent again.
    assert chain.balance(key.scripthash) == (0, 0)


def test_reorg_keeps_the_mempool_topological(chain: Chain, faucet: Faucet) -> None:
    key = Key()
    deposit = pay(chain, faucet, key, 100_000)
    child = build([deposit], [(key.script, 99_000)])
    child_txid = submit(chain, child)  # waits in the mempool while its parent goes back there too
    chain.reorg(1)
    order = [entry.tx.txid_hex for entry in chain.mempool.values()]
    assert order.index(deposit.txid) < order.index(child_txid)
    [block] = chain.mine(1)
    mined = [tx.txid_hex for tx in block.txs]
    assert mined.index(deposit.txid) < mined.index(child_txid)


# --- storage --------------------------------------------------------------------------------


def test_block_file_survives_a_torn_write(tmp_path: Path, faucet: Faucet) -> None:
    path = tmp_path / "blocks.dat"
    blocks = BlockFile(path)
    chain = Chain(ChainParams(), faucet.script, sink=blocks)
    chain.load(blocks.loaded)
    chain.mine(5)
    tip = chain.tip.hash
    blocks.close()
    with path.open("ab") as handle:
        handle.write(b"ODNB\xff\xff\x00\x00partial")
    reopened = BlockFile(path)
    assert len(reopened.loaded) == 6
    again = Chain(ChainParams(), faucet.script, sink=reopened)
    again.load(reopened.loaded)
    assert again.tip.hash == tip
    again.mine(1)
    reopened.close()
    records, _offsets, end = read_records(path)
    assert len(records) == 7 and end == path.stat().st_size


def test_alpha_blocks_round_trip_through_the_block_file(tmp_path: Path, faucet: Faucet) -> None:
    path = tmp_path / "blocks.dat"
    blocks = BlockFile(path)
    params = ChainParams(alpha=True, coinbase_maturity=1)
    chain = Chain(params, faucet.script, sink=blocks)
    chain.load(blocks.loaded)
    chain.mine(3)
    chain.accept(faucet.pay(chain, Key().script, 10_000))
    chain.mine(1)
    assert [len(block.header) for block in chain.blocks] == [80, 112, 112, 112, 112]
    assert len(chain.tip.txs) == 2
    blocks.close()
    reopened = BlockFile(path)
    again = Chain(params, faucet.script, sink=reopened)
    again.load(reopened.loaded)
    assert again.tip.hash == chain.tip.hash and again.utxos == chain.utxos
    reopened.close()
    # A block whose RandomX field was tampered with is refused on load.
    records, _offsets, _end = read_records(path)
    tampered = records[1][:80] + bytes(32) + records[1][112:]
    with pytest.raises(ChainError, match="hashRandomX"):
        Chain(params, faucet.script).load([records[0], tampered])
