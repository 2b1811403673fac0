"""The UTXO watcher's pure rules, and what both watchers share (otc_common.chainwatch).

Headers, transactions and merkle branches are made with the devnet's own code and python-bitcoinlib,
independently of the rules under test.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from otc_common import chainwatch
from otc_common.messages import TransferSubmitted
from otc_devnet.block import ALPHA_VERSION, BITCOIN_VERSION, block_hash, make_header
from otc_devnet.merkle import merkle_branch
from otc_devnet.merkle import merkle_root as devnet_merkle_root
from otc_watcher_utxo import rules
from otc_watcher_utxo.rules import Header, HistoryItem, MalformedChainData, Tx, TxIn, TxOut
from tests.devnet_support import Key, Utxo, build, electrum_status, txid_of

BITS = 0x207FFFFF


def chain_of_headers(versions: list[int]) -> list[bytes]:
    headers: list[bytes] = []
    previous = b"\x00" * 32
    for number, version in enumerate(versions):
        header = make_header(version, previous, os.urandom(32), 1_700_000_000 + number, BITS, number)
        headers.append(header)
        previous = block_hash(header)
    return headers


# --------------------------------------------------------------------------- headers


def test_headers_of_both_sizes_are_told_apart_by_their_version() -> None:
    raw = chain_of_headers([1, BITCOIN_VERSION, ALPHA_VERSION, ALPHA_VERSION, BITCOIN_VERSION | 4, ALPHA_VERSION])
    assert [len(h) for h in raw] == [80, 80, 112, 112, 80, 112]
    parsed = rules.parse_headers(b"".join(raw).hex(), 10, len(raw))
    assert [h.height for h in parsed] == list(range(10, 16))
    for header, data in zip(parsed, raw, strict=True):
        # The block hash covers all the bytes, hashRandomX included.
        assert header.hash == block_hash(data)[::-1].hex() == rules.sha256d(data)[::-1].hex()
        assert header.merkle_root == data[36:68][::-1].hex()
        assert header.time == struct.unpack_from("<I", data, 68)[0]
    assert parsed[0].prev_hash == "00" * 32
    assert [h.prev_hash for h in parsed[1:]] == [h.hash for h in parsed[:-1]]


def test_broken_header_answers_are_refused() -> None:
    raw = chain_of_headers([ALPHA_VERSION, ALPHA_VERSION, ALPHA_VERSION])
    joined = b"".join(raw)
    with pytest.raises(MalformedChainData, match="truncated"):
        rules.parse_headers(joined[:-1].hex(), 0, 3)
    with pytest.raises(MalformedChainData, match="trailing"):
        rules.parse_headers((joined + b"\x00").hex(), 0, 3)
    with pytest.raises(MalformedChainData, match="does not extend"):
        rules.parse_headers((raw[0] + raw[2]).hex(), 0, 2)
    with pytest.raises(MalformedChainData, match="not hex"):
        rules.parse_headers("zz", 0, 1)
    with pytest.raises(MalformedChainData, match="too many"):
        rules.parse_header((raw[0] + b"\x00").hex(), 0)
    # An Alpha header cut to Bitcoin's 80 bytes is not taken for one.
    with pytest.raises(MalformedChainData, match="truncated"):
        rules.parse_header(raw[0][:80].hex(), 0)
    with pytest.raises(MalformedChainData):
        rules.parse_block_headers({"hex": joined.hex()}, 0)


def test_the_tip_of_a_subscription() -> None:
    [raw] = chain_of_headers([ALPHA_VERSION])
    tip = rules.parse_tip({"height": 7, "hex": raw.hex()})
    assert (tip.height, tip.hash) == (7, block_hash(raw)[::-1].hex())
    for bad in (None, {"height": -1, "hex": raw.hex()}, {"height": "7", "hex": raw.hex()}, {"height": 7}):
        with pytest.raises(MalformedChainData):
            rules.parse_tip(bad)


# --------------------------------------------------------------------------- transactions


def signed_payment() -> tuple[str, str, Key, Key]:
    payer, payee = Key(), Key()
    funding = "11" * 32
    tx = build([Utxo(funding, 1, 50_000, payer)], [(payee.script, 30_000), (payer.script, 19_000)])
    return tx.serialize().hex(), txid_of(tx), payer, payee


def test_a_transaction_must_hash_to_the_txid_asked_for() -> None:
    raw, txid, payer, payee = signed_payment()
    tx = rules.parse_tx(raw, txid)
    assert tx.txid == txid
    assert tx.inputs == (TxIn("11" * 32, 1),)
    assert tx.outputs == (TxOut(30_000, payee.script), TxOut(19_000, payer.script))
    with pytest.raises(MalformedChainData, match="answered for"):
        rules.parse_tx(raw, "22" * 32)
    with pytest.raises(MalformedChainData, match="does not decode"):
        rules.parse_tx(raw[:-2], txid)
    with pytest.raises(MalformedChainData, match="not hex"):
        rules.parse_tx(None, txid)


def test_deposits_change_and_fees() -> None:
    escrow, other = b"\x00\x14" + b"\x01" * 20, b"\x00\x14" + b"\x02" * 20
    funding = Tx("aa" * 32, (TxIn("00" * 32, 0),), (TxOut(700, other), TxOut(1_000, escrow), TxOut(500, escrow)))
    assert rules.deposit_outputs(funding, escrow, rules.spends_script(funding, escrow, {})) == [(1, 1_000), (2, 500)]
    assert rules.deposit_outputs(funding, other, False) == [(0, 700)]
    # A payout spends the escrow's own coin; what it sends back to the escrow is change.
    payout = Tx("bb" * 32, (TxIn("aa" * 32, 1),), (TxOut(600, other), TxOut(390, escrow)))
    assert rules.spends_script(payout, escrow, {funding.txid: funding})
    assert not rules.spends_script(payout, other, {funding.txid: funding})
    assert not rules.spends_script(payout, escrow, {}), "only known coins count"
    assert rules.deposit_outputs(payout, escrow, True) == []
    assert rules.fee_paid(payout, {funding.txid: funding}) == 10
    with pytest.raises(MalformedChainData, match="does not exist"):
        rules.fee_paid(payout, {})
    greedy = Tx("cc" * 32, (TxIn("aa" * 32, 2),), (TxOut(501, other),))
    with pytest.raises(MalformedChainData, match="more than it spends"):
        rules.fee_paid(greedy, {funding.txid: funding})
    zero = Tx("dd" * 32, (), (TxOut(0, escrow),))
    assert rules.deposit_outputs(zero, escrow, False) == []


def test_txids_are_64_lowercase_hex_digits() -> None:
    assert rules.normalise_txid(" 0x" + "AB" * 32 + " ") == "ab" * 32
    for bad in ("", "ab" * 31, "zz" * 32, "ab" * 33):
        assert rules.normalise_txid(bad) is None


# --------------------------------------------------------------------------- histories and proofs


def test_histories_and_their_status() -> None:
    raw = [{"tx_hash": "aa" * 32, "height": 5}, {"tx_hash": "bb" * 32, "height": 0, "fee": 10}]
    history = rules.parse_history(raw)
    assert history == [HistoryItem("aa" * 32, 5), HistoryItem("bb" * 32, 0)]
    assert [item.mined for item in history] == [True, False]
    assert rules.electrum_status(history) == electrum_status(raw)
    assert rules.electrum_status([]) is None
    bad: Any
    for bad in ({}, [{"tx_hash": "aa" * 32}], [{"tx_hash": "nope", "height": 1}], ["x"]):
        with pytest.raises(MalformedChainData):
            rules.parse_history(bad)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 8])
def test_merkle_branches_prove_inclusion_in_one_block_only(count: int) -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(count)]
    root = devnet_merkle_root(leaves)
    header = Header(height=9, hash="00" * 32, prev_hash="00" * 32, merkle_root=root[::-1].hex(), time=0)
    other = Header(height=9, hash="00" * 32, prev_hash="00" * 32, merkle_root="00" * 32, time=0)
    for position, leaf in enumerate(leaves):
        txid = leaf[::-1].hex()
        proof: dict[str, Any] = {
            "block_height": 9,
            "pos": position,
            "merkle": [h[::-1].hex() for h in merkle_branch(leaves, position)],
        }
        assert rules.proves_inclusion(proof, txid, header)
        assert not rules.proves_inclusion(proof, txid, other)
        if count > 1 and proof["merkle"][0] != txid:  # (the odd last leaf is paired with itself)
            assert not rules.proves_inclusion({**proof, "pos": position ^ 1}, txid, header)
            assert not rules.proves_inclusion({**proof, "merkle": ["00" * 32, *proof["merkle"][1:]]}, txid, header)
    for bad in (None, {"pos": -1, "merkle": []}, {"pos": 0, "merkle": "x"}, {"pos": 0, "merkle": ["zz" * 32]}):
        assert not rules.proves_inclusion(bad, "00" * 32, header)


# --------------------------------------------------------------------------- shared by both watchers


def test_confirmations_count_from_the_block_of_a_transaction() -> None:
    mined = chainwatch.Followed(txid="a", transfer_id="t", block_number=10, block_hash="h")
    pending = chainwatch.Followed(txid="b", transfer_id="t")
    ahead = chainwatch.Followed(txid="c", transfer_id="t", block_number=12, block_hash="i")
    assert chainwatch.confirmations_at([mined, pending, ahead], 11) == [(mined, 2)]
    assert chainwatch.confirmations_at([mined, ahead], 12) == [(mined, 3), (ahead, 1)]
    assert chainwatch.stop_at(2) == 4


async def test_the_common_ancestor_is_the_highest_stored_block_the_chain_still_has() -> None:
    stored = [(10, "a10"), (11, "a11"), (12, "a12"), (13, "a13")]
    asked: list[int] = []

    def fetcher(chain: dict[int, str]) -> Callable[[int], Awaitable[tuple[int, str]]]:
        async def fetch(number: int) -> tuple[int, str]:
            asked.append(number)
            return number, chain[number]

        return fetch

    replaced_two = {10: "a10", 11: "a11", 12: "b12", 13: "b13"}
    assert await chainwatch.find_common_ancestor(stored, fetcher(replaced_two), lambda b: b[1]) == (11, "a11")
    assert asked == [13, 12, 11], "walks down from the top and stops at the first match"
    all_replaced = {n: f"c{n}" for n in range(10, 14)}
    assert await chainwatch.find_common_ancestor(stored, fetcher(all_replaced), lambda b: b[1]) is None
    assert await chainwatch.find_common_ancestor([], fetcher({}), lambda b: b[1]) is None


def test_every_candidate_of_a_transfer_is_followed_once_in_the_chains_form() -> None:
    message = TransferSubmitted(
        transfer_id="t", deal_id="d", chain="UNICITY", txid="AB" * 32, candidates=["ab" * 32, "cd" * 32, "bad", ""]
    )
    assert chainwatch.followed_txids(message, rules.normalise_txid) == ["ab" * 32, "cd" * 32]
