"""The EVM watcher's pure rules: what a block, its logs and the balance check mean."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otc_watcher_evm import rules
from otc_watcher_evm.rules import Baseline, Block, Followed, Log, Receipt, Tx

ESCROW = "0x" + "e1" * 20
OTHER_ESCROW = "0x" + "e2" * 20
STRANGER = "0x" + "5a" * 20
USDT = "0x" + "70" * 20
SPAM = "0x" + "99" * 20


def tx(sender: str, to: str | None, value: int, txid: str = "0x" + "01" * 32) -> Tx:
    return Tx(hash=txid, sender=sender, to=to, value=value, gas_price=10**9)


def block(number: int, *txs: Tx) -> Block:
    return Block(
        number=number, hash=f"0x{number:064x}", parent_hash=f"0x{number - 1:064x}", time=1000 + number, txs=txs
    )


def transfer_log(contract: str, to: str, amount: int, index: int = 0, **changes: Any) -> Log:
    fields: dict[str, Any] = {
        "address": contract,
        "topics": (rules.TRANSFER_TOPIC, rules.address_topic(STRANGER), rules.address_topic(to)),
        "data": f"0x{amount:064x}",
        "block_number": 5,
        "block_hash": f"0x{5:064x}",
        "tx_hash": "0x" + "0f" * 32,
        "log_index": index,
        **changes,
    }
    return Log(**fields)


# --------------------------------------------------------------------------- parsing


def test_parse_block_lowercases_and_reads_quantities() -> None:
    raw = {
        "number": "0x10",
        "hash": "0xABCD",
        "parentHash": "0xAB",
        "timestamp": "0x5f5e100",
        "transactions": [
            {"hash": "0x01", "from": "0xAA", "to": "0xBB", "value": "0xde0b6b3a7640000", "gasPrice": "0x3b9aca00"},
            {"hash": "0x02", "from": "0xAA", "to": None, "value": "0x0"},
        ],
    }
    parsed = rules.parse_block(raw)
    assert (parsed.number, parsed.hash, parsed.parent_hash, parsed.time) == (16, "0xabcd", "0xab", 100_000_000)
    assert parsed.txs[0] == Tx(hash="0x01", sender="0xaa", to="0xbb", value=10**18, gas_price=10**9)
    assert parsed.txs[1].to is None


def test_malformed_quantities_are_refused() -> None:
    with pytest.raises(rules.MalformedChainData):
        rules.parse_block({"number": 16, "hash": "0x1", "parentHash": "0x0", "timestamp": "0x1"})


def test_receipt_fee_is_gas_used_times_effective_price() -> None:
    receipt = rules.parse_receipt(
        {
            "transactionHash": "0x01",
            "blockNumber": "0x7",
            "blockHash": "0x77",
            "status": "0x0",
            "gasUsed": "0x5208",
            "effectiveGasPrice": "0x3b9aca00",
        }
    )
    assert receipt == Receipt(tx_hash="0x01", block_number=7, block_hash="0x77", success=False, fee_paid=21_000 * 10**9)
    legacy = rules.parse_receipt(
        {"transactionHash": "0x01", "blockNumber": "0x7", "blockHash": "0x77", "status": "0x1", "gasUsed": "0x2"},
        tx_gas_price=5,
    )
    assert legacy.fee_paid == 10 and legacy.success


# --------------------------------------------------------------------------- deposits


def test_native_deposits_are_value_transfers_to_watched_escrows() -> None:
    b = block(
        3,
        tx(STRANGER, ESCROW, 5, "0x" + "01" * 32),
        tx(STRANGER, ESCROW, 0, "0x" + "02" * 32),  # no value
        tx(STRANGER, SPAM, 9, "0x" + "03" * 32),  # not watched
        tx(ESCROW, ESCROW, 4, "0x" + "04" * 32),  # to itself: nothing arrives
        tx(STRANGER, None, 8, "0x" + "05" * 32),  # contract creation
    )
    found = rules.native_deposits(b, {ESCROW, OTHER_ESCROW}, "ETH")
    assert found == [rules.Found(address=ESCROW, txid="0x" + "01" * 32, index=-1, amount=5, asset="ETH")]


def test_token_transfers_split_into_registered_and_unregistered() -> None:
    logs = [
        transfer_log(USDT, ESCROW, 250, index=0),
        transfer_log(SPAM, ESCROW, 7, index=1),
        transfer_log(USDT, STRANGER, 1, index=2),  # not watched
        transfer_log(USDT, ESCROW, 0, index=3),  # nothing moved
        transfer_log(USDT, ESCROW, 3, index=4, removed=True),
        transfer_log(USDT, ESCROW, 3, index=5, data="0x"),  # not ERC-20 data
    ]
    nft = transfer_log(USDT, ESCROW, 1, index=6)
    logs.append(Log(**{**nft.__dict__, "topics": (*nft.topics, "0x" + "00" * 32)}))  # ERC-721: tokenId indexed
    dirty = transfer_log(USDT, ESCROW, 1, index=7)
    logs.append(Log(**{**dirty.__dict__, "topics": (*dirty.topics[:2], "0x" + "ff" * 12 + ESCROW[2:])}))

    found = rules.token_deposits(logs, {ESCROW}, {USDT: "USDT"})
    assert [(f.index, f.asset, f.contract, f.amount, f.counted) for f in found] == [
        (0, "USDT", USDT, 250, True),
        (1, None, SPAM, 7, False),
    ]


# --------------------------------------------------------------------------- balance check


def test_a_rise_beyond_direct_deposits_is_an_internal_credit() -> None:
    verdict = rules.judge_balances(
        baselines={ESCROW: Baseline(100), OTHER_ESCROW: Baseline(50)},
        measured={ESCROW: 175, OTHER_ESCROW: 50},
        direct={ESCROW: 25},
        outflows={},
    )
    assert verdict.credits == {ESCROW: 50}
    assert verdict.shortfalls == {}
    assert verdict.baselines == {ESCROW: Baseline(175)}, "only changed baselines are stored"


def test_drops_and_fully_explained_rises_are_not_credits() -> None:
    verdict = rules.judge_balances(
        baselines={ESCROW: Baseline(100), OTHER_ESCROW: Baseline(10)},
        measured={ESCROW: 130, OTHER_ESCROW: 4},
        direct={ESCROW: 30},
        outflows={OTHER_ESCROW: 6},
    )
    assert verdict.credits == {} and verdict.shortfalls == {}


def test_an_escrow_with_unaccounted_sends_is_remeasured_without_judging() -> None:
    verdict = rules.judge_balances({ESCROW: Baseline(100)}, {ESCROW: 500}, {}, {ESCROW: None})
    assert verdict.credits == {} and verdict.baselines == {ESCROW: Baseline(500)}


def test_known_payouts_are_added_back_before_judging_the_rise() -> None:
    b = block(9, tx(ESCROW, STRANGER, 40, "0x" + "aa" * 32), tx(ESCROW, STRANGER, 70, "0x" + "bb" * 32))
    receipts = {
        "0x" + "aa" * 32: Receipt("0x" + "aa" * 32, 9, b.hash, success=True, fee_paid=3),
        "0x" + "bb" * 32: Receipt("0x" + "bb" * 32, 9, b.hash, success=False, fee_paid=2),  # reverted: fee only
    }
    outflows = rules.known_outflows(b, receipts)
    assert outflows == {ESCROW: 45}
    # 100 - 45 spent + 20 arriving from a contract
    verdict = rules.judge_balances({ESCROW: Baseline(100)}, {ESCROW: 75}, {}, outflows)
    assert verdict.credits == {ESCROW: 20}
    assert rules.known_outflows(b, {"0x" + "aa" * 32: receipts["0x" + "aa" * 32]}) == {ESCROW: None}


def test_escrows_without_a_baseline_are_not_judged_and_huge_balances_are() -> None:
    verdict = rules.judge_balances(
        {OTHER_ESCROW: Baseline(2**130)}, {ESCROW: 10, OTHER_ESCROW: 2**130 + 5}, direct={}, outflows={}
    )
    assert verdict.credits == {OTHER_ESCROW: 5} and verdict.shortfalls == {}
    assert verdict.baselines == {OTHER_ESCROW: Baseline(2**130 + 5)}


def test_a_balance_below_its_direct_deposits_is_flagged() -> None:
    verdict = rules.judge_balances({ESCROW: Baseline(10)}, {ESCROW: 12}, {ESCROW: 5}, {})
    assert verdict.shortfalls == {ESCROW: 3} and verdict.credits == {}


def test_unmeasurable_blocks_carry_their_movements_to_the_next_measurement() -> None:
    start = {ESCROW: Baseline(100), OTHER_ESCROW: Baseline(7)}
    first = rules.judge_balances(start, None, {ESCROW: 30}, {OTHER_ESCROW: 2})
    assert first.credits == {}
    assert first.baselines == {ESCROW: Baseline(100, 30, 0), OTHER_ESCROW: Baseline(7, 0, 2)}
    carried = {**start, **first.baselines}
    second = rules.judge_balances(carried, None, {}, {ESCROW: None})
    assert second.baselines == {ESCROW: Baseline(100, 30, None)}
    # Measured again: OTHER_ESCROW rose by 10 beyond what it spent; ESCROW's unknown spending blocks judging.
    third = rules.judge_balances({**carried, **second.baselines}, {ESCROW: 120, OTHER_ESCROW: 15}, {}, {})
    assert third.credits == {OTHER_ESCROW: 10}
    assert third.baselines == {ESCROW: Baseline(120), OTHER_ESCROW: Baseline(15)}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=10**20),
    st.lists(st.tuples(st.integers(0, 10**19), st.integers(0, 10**19), st.booleans()), min_size=1, max_size=10),
)
def test_balance_judging_credits_every_internal_wei_once(base: int, blocks: list[tuple[int, int, bool]]) -> None:
    """Measured or not, block by block: direct deposits plus credits add up to the rise once measured."""
    baselines = {ESCROW: Baseline(base)}
    balance, credited, direct_total = base, 0, 0
    for direct, internal, readable in blocks:
        balance += direct + internal
        direct_total += direct
        verdict = rules.judge_balances(baselines, {ESCROW: balance} if readable else None, {ESCROW: direct}, {})
        credited += sum(verdict.credits.values())
        baselines = {**baselines, **verdict.baselines}
    final = rules.judge_balances(baselines, {ESCROW: balance}, {}, {})
    credited += sum(final.credits.values())
    assert credited + direct_total == balance - base
    assert final.shortfalls == {}


def words_of(balances: list[int]) -> bytes:
    return b"".join(balance.to_bytes(32, "big") for balance in balances)


def test_changed_positions_finds_every_moved_word() -> None:
    before = [5] * 300
    after = list(before)
    for position in (0, 63, 64, 200, 299):
        after[position] += 1
    assert rules.changed_positions(words_of(before), words_of(after)) == [0, 63, 64, 200, 299]
    assert rules.changed_positions(words_of(before), words_of(before)) == []


NOT_SENDING, UNKNOWN_SPENDING = -1, -2


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10**20),  # settled balance
            st.integers(-(10**18), 10**18),  # change in this block
            st.integers(0, 10**18),  # direct deposits in this block
            st.sampled_from([NOT_SENDING, UNKNOWN_SPENDING, 0, 21_000, 10**18]),  # what the escrow spent
        ),
        min_size=1,
        max_size=80,
    )
)
def test_judging_only_what_moved_or_was_touched_is_judging_everything(
    escrows: list[tuple[int, int, int, int]],
) -> None:
    known = sorted(f"0x{i:040x}" for i in range(len(escrows)))
    settled = [balance for balance, _, _, _ in escrows]
    now = [max(balance + change, 0) for balance, change, _, _ in escrows]
    baselines = {address: Baseline(balance) for address, balance in zip(known, settled, strict=True)}
    direct = {a: amount for a, (_, _, amount, _) in zip(known, escrows, strict=True) if amount}
    outflows: dict[str, int | None] = {
        a: None if spent == UNKNOWN_SPENDING else spent
        for a, (_, _, _, spent) in zip(known, escrows, strict=True)
        if spent != NOT_SENDING
    }
    everything = rules.judge_balances(baselines, dict(zip(known, now, strict=True)), direct, outflows)
    subset = rules.balances_to_judge(known, words_of(now), words_of(settled), direct, outflows)
    assert rules.judge_balances(baselines, subset, direct, outflows) == everything
    untouched = {a for a, old, new in zip(known, settled, now, strict=True) if old == new} - set(direct) - set(outflows)
    assert not untouched & set(subset), "an escrow nothing happened to is not judged"
    assert rules.balances_to_judge(known, words_of(now), None, direct, outflows) == dict(zip(known, now, strict=True))


# --------------------------------------------------------------------------- re-check of a newly watched escrow


def test_window_attribution_splits_direct_and_internal_per_block() -> None:
    direct = tx(STRANGER, ESCROW, 30, "0x" + "d1" * 32)
    blocks = [block(10), block(11, direct), block(12), block(13, tx(ESCROW, STRANGER, 5, "0x" + "5e" * 32))]
    balances = {
        blocks[0].hash: {ESCROW: 7},  # internal +7
        blocks[1].hash: {ESCROW: 47},  # direct 30 + internal 10
        blocks[2].hash: {ESCROW: 47},
        blocks[3].hash: {ESCROW: 99},  # the escrow sent too: not guessed at
    }
    found = rules.attribute_window([ESCROW], {ESCROW: 0}, blocks, balances, "ETH")
    assert [(b.number, f.index, f.amount, f.txid) for b, f in found] == [
        (10, -2, 7, rules.internal_txid(blocks[0].hash, ESCROW)),
        (11, -1, 30, direct.hash),
        (11, -2, 10, rules.internal_txid(blocks[1].hash, ESCROW)),
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=10**20),
    st.lists(
        st.tuples(st.lists(st.integers(min_value=1, max_value=10**19), max_size=3), st.integers(0, 10**19)),
        min_size=1,
        max_size=8,
    ),
)
def test_window_attribution_accounts_for_every_wei_once(base: int, history: list[tuple[list[int], int]]) -> None:
    """Whatever mix of direct and internal arrivals, what is found adds up to the rise, no more, no less."""
    blocks: list[Block] = []
    balances: dict[str, dict[str, int]] = {}
    balance = base
    for number, (directs, internal) in enumerate(history, start=20):
        txs = [tx(STRANGER, ESCROW, value, f"0x{number:032x}{i:032x}") for i, value in enumerate(directs)]
        blocks.append(block(number, *txs))
        balance += sum(directs) + internal
        balances[blocks[-1].hash] = {ESCROW: balance}
    found = rules.attribute_window([ESCROW], {ESCROW: base}, blocks, balances, "ETH")
    assert sum(f.amount for _, f in found) == balance - base
    keys = [(f.txid, f.index, b.hash) for b, f in found]
    assert len(keys) == len(set(keys))
    assert all(f.amount > 0 for _, f in found)


# --------------------------------------------------------------------------- followed transactions


def test_confirmations_count_from_the_mining_block() -> None:
    mined = Followed(txid="0x01", transfer_id="t", block_number=10, block_hash="0xaa")
    pending = Followed(txid="0x02", transfer_id="t")
    ahead = Followed(txid="0x03", transfer_id="t", block_number=12, block_hash="0xbb")
    assert rules.confirmations_at([mined, pending, ahead], 11) == [(mined, 2)]
    assert rules.stop_at(2) == 4


# --------------------------------------------------------------------------- balance reader


def test_balance_call_packs_the_addresses_for_the_reader_placed_by_override() -> None:
    call = rules.balance_call([ESCROW, OTHER_ESCROW])
    assert call == {
        "to": rules.BALANCE_READER_ADDRESS,
        "data": "0x" + ESCROW[2:] + OTHER_ESCROW[2:],
        "gas": hex(rules.balance_call_gas(2)),
    }
    assert rules.BALANCE_READER_OVERRIDE == {rules.BALANCE_READER_ADDRESS: {"code": rules.BALANCE_READER_CODE}}


def test_decode_balances_reads_whole_words_and_checks_the_length() -> None:
    raw = "0x" + f"{5:064x}" + f"{2**200:064x}"
    assert rules.decode_balances(raw, [ESCROW, OTHER_ESCROW]) == {ESCROW: 5, OTHER_ESCROW: 2**200}
    for malformed, addresses in ((raw, [ESCROW]), ("0xzz", []), (None, [])):
        with pytest.raises(rules.MalformedChainData):
            rules.decode_balances(malformed, addresses)


def test_a_default_balance_call_stays_inside_the_common_eth_call_gas_cap() -> None:
    assert rules.balance_call_gas(rules.BALANCE_CALL_ADDRESSES) <= 50_000_000
    assert rules.balance_call_gas(10_000) > 30_000_000  # so the gas is named: above a 30M block gas limit


# --------------------------------------------------------------------------- settings


def test_the_websocket_url_is_the_setting_or_else_the_rpc_url_as_ws() -> None:
    from otc_watcher_evm.heads import websocket_url

    assert websocket_url("", "http://127.0.0.1:8545") == "ws://127.0.0.1:8545"
    assert websocket_url("", "https://eth.example/v2/key?x=1") == "wss://eth.example/v2/key?x=1"
    assert websocket_url("wss://ws.example/key", "https://eth.example/v2/key") == "wss://ws.example/key"
    assert websocket_url("off", "http://127.0.0.1:8545") is None
    assert websocket_url("", "ipc:///var/run/geth.ipc") is None


def test_websocket_and_balance_call_settings_are_checked() -> None:
    from otc_common.settings import ConfigError, load_settings
    from otc_watcher_evm.settings import WatcherSettings

    base = {"OTC_DATABASE_URL": "postgresql://x", "OTC_NATS_URL": "nats://x", "OTC_REGISTRY_FILE": "r.toml"}
    defaults = load_settings(WatcherSettings, base)
    assert (defaults.ws_url, defaults.balance_call_addresses) == ("", rules.BALANCE_CALL_ADDRESSES)
    chosen = load_settings(WatcherSettings, {**base, "OTC_WS_URL": "off", "OTC_BALANCE_CALL_ADDRESSES": "5000"})
    assert (chosen.ws_url, chosen.balance_call_addresses) == ("off", 5000)
    for variable, value in (("OTC_WS_URL", "http://node:8545"), ("OTC_BALANCE_CALL_ADDRESSES", "0")):
        with pytest.raises(ConfigError, match=variable):
            load_settings(WatcherSettings, {**base, variable: value})
