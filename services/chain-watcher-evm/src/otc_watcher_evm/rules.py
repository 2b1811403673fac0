"""What a block means for the watched escrows and followed transactions: pure functions, no I/O.

Addresses and hashes are compared in lowercase `0x` form; the shell maps escrow addresses back
to the form the engine assigned them in before publishing.
"""

from __future__ import annotations

import bisect
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from otc_common import chainwatch

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
#: `index` of a native deposit made by a transaction's own value.
NATIVE_INDEX = -1
#: `index` of native coin that arrived by internal transfers, found by the balance check.
INTERNAL_INDEX = -2


class MalformedChainData(ValueError):
    """The node answered with something that is not a block, log or receipt."""


def quantity(value: Any, what: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise MalformedChainData(f"{what} is not a hex quantity")
    try:
        return int(value, 16)
    except ValueError:
        raise MalformedChainData(f"{what} is not a hex quantity") from None


def lower_hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise MalformedChainData(f"{what} is not hex")
    return value.lower()


def internal_txid(block_hash: str, address: str) -> str:
    return f"internal:{block_hash}:{address}"


@dataclass(frozen=True)
class Tx:
    hash: str
    sender: str
    to: str | None
    value: int
    gas_price: int


@dataclass(frozen=True)
class Block:
    number: int
    hash: str
    parent_hash: str
    time: int
    txs: tuple[Tx, ...] = ()


@dataclass(frozen=True)
class Log:
    address: str
    topics: tuple[str, ...]
    data: str
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    removed: bool = False


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    block_number: int
    block_hash: str
    success: bool
    fee_paid: int


def parse_block(raw: Mapping[str, Any]) -> Block:
    txs: list[Tx] = []
    for item in raw.get("transactions") or ():
        if not isinstance(item, Mapping):
            continue  # a block fetched without full transactions
        to = item.get("to")
        txs.append(
            Tx(
                hash=lower_hex(item.get("hash"), "tx hash"),
                sender=lower_hex(item.get("from"), "tx sender"),
                to=lower_hex(to, "tx recipient") if to else None,
                value=quantity(item.get("value", "0x0"), "tx value"),
                gas_price=quantity(item.get("gasPrice", "0x0"), "tx gas price"),
            )
        )
    return Block(
        number=quantity(raw.get("number"), "block number"),
        hash=lower_hex(raw.get("hash"), "block hash"),
        parent_hash=lower_hex(raw.get("parentHash"), "parent hash"),
        time=quantity(raw.get("timestamp"), "block timestamp"),
        txs=tuple(txs),
    )


def parse_log(raw: Mapping[str, Any]) -> Log:
    topics = raw.get("topics") or []
    return Log(
        address=lower_hex(raw.get("address"), "log address"),
        topics=tuple(lower_hex(topic, "log topic") for topic in topics),
        data=lower_hex(raw.get("data", "0x"), "log data"),
        block_number=quantity(raw.get("blockNumber"), "log block number"),
        block_hash=lower_hex(raw.get("blockHash"), "log block hash"),
        tx_hash=lower_hex(raw.get("transactionHash"), "log tx hash"),
        log_index=quantity(raw.get("logIndex"), "log index"),
        removed=bool(raw.get("removed", False)),
    )


def parse_receipt(raw: Mapping[str, Any], tx_gas_price: int = 0) -> Receipt:
    # Nodes from before EIP-1559 leave out effectiveGasPrice; the transaction's gas price is the same.
    price = raw.get("effectiveGasPrice")
    gas_price = quantity(price, "effective gas price") if price is not None else tx_gas_price
    return Receipt(
        tx_hash=lower_hex(raw.get("transactionHash"), "receipt tx hash"),
        block_number=quantity(raw.get("blockNumber"), "receipt block number"),
        block_hash=lower_hex(raw.get("blockHash"), "receipt block hash"),
        success=quantity(raw.get("status", "0x1"), "receipt status") == 1,
        fee_paid=quantity(raw.get("gasUsed"), "gas used") * gas_price,
    )


# --------------------------------------------------------------------------- deposits


@dataclass(frozen=True)
class Found:
    """Value that reached a watched escrow. `contract` is set for tokens, `asset` only when registered."""

    address: str
    txid: str
    index: int
    amount: int
    asset: str | None
    contract: str | None = None

    @property
    def counted(self) -> bool:
        return self.asset is not None


def native_deposits(block: Block, watched: Container[str], native_symbol: str) -> list[Found]:
    """Transactions paying value straight to a watched escrow.

    An escrow is a key-derived account without code, so a mined transaction to it cannot revert:
    its value arrived, and no receipt is needed to know that.
    """
    return [
        Found(address=tx.to, txid=tx.hash, index=NATIVE_INDEX, amount=tx.value, asset=native_symbol)
        for tx in block.txs
        if tx.to is not None and tx.to in watched and tx.value > 0 and tx.sender != tx.to
    ]


def transfer_recipient(log: Log) -> str | None:
    """The `to` of an ERC-20 Transfer log; None for anything else (ERC-721 indexes a fourth topic)."""
    if log.removed or len(log.topics) != 3 or log.topics[0] != TRANSFER_TOPIC:
        return None
    topic = log.topics[2]
    if len(topic) != 66 or topic[2:26] != "0" * 24:
        return None
    return "0x" + topic[26:]


def token_deposits(logs: Iterable[Log], watched: Container[str], tokens: Mapping[str, str]) -> list[Found]:
    """ERC-20 Transfers to watched escrows; `tokens` maps registered contracts to their symbols."""
    found = []
    for log in logs:
        to = transfer_recipient(log)
        if to is None or to not in watched or len(log.data) != 66:
            continue
        amount = int(log.data, 16)
        if amount == 0:
            continue
        found.append(
            Found(
                address=to,
                txid=log.tx_hash,
                index=log.log_index,
                amount=amount,
                asset=tokens.get(log.address),
                contract=log.address,
            )
        )
    return found


def senders(block: Block) -> set[str]:
    return {tx.sender for tx in block.txs}


def known_outflows(block: Block, receipts: Mapping[str, Receipt]) -> dict[str, int | None]:
    """Native coin each sender spent in the block: value of successful sends plus fees.

    None for a sender with a transaction whose receipt we do not have (not a followed payout):
    its outflow is unknown, so nothing can be concluded from its balance in this block.
    """
    spent: dict[str, int | None] = {}
    for tx in block.txs:
        receipt = receipts.get(tx.hash)
        previous = spent.get(tx.sender, 0)
        if receipt is None or previous is None:
            spent[tx.sender] = None
            continue
        spent[tx.sender] = previous + (tx.value if receipt.success else 0) + receipt.fee_paid
    return spent


@dataclass(frozen=True)
class Baseline:
    """An escrow's last measured native balance, and what changed it since by our own account.

    Normally measured at the end of every block, so the two running sums are zero. When a node
    no longer has a block's state (a pruned node while catching up), the measurement is
    deferred and the block's direct deposits and known spending are carried forward instead.
    """

    balance: int
    direct_since: int = 0
    #: None when the escrow sent a transaction whose cost we do not know.
    spent_since: int | None = 0


@dataclass
class BalanceVerdict:
    credits: dict[str, int] = field(default_factory=dict)
    #: Escrows whose balance rose less than their direct deposits: must never happen, so it is alerted.
    shortfalls: dict[str, int] = field(default_factory=dict)
    #: The baselines to store (only those that changed).
    baselines: dict[str, Baseline] = field(default_factory=dict)


def _add(spent: int | None, more: int | None) -> int | None:
    return None if spent is None or more is None else spent + more


def judge_balances(
    baselines: Mapping[str, Baseline],
    measured: Mapping[str, int] | None,
    direct: Mapping[str, int],
    outflows: Mapping[str, int | None],
) -> BalanceVerdict:
    """Native coin that arrived without a transaction to the escrow (contract wallets, withdrawals).

    The expected balance is the baseline plus the direct deposits, minus what the escrow itself
    spent when that is known exactly (followed payouts). A rise beyond it is an internal transfer;
    a drop is a payout and ignored. An escrow that sent a transaction we cannot account for is
    re-measured without judging rather than guessed at. `measured` is None when the block's state
    could not be read: nothing is judged and the block's movements are carried forward.
    """
    verdict = BalanceVerdict()
    if measured is None:
        for address, baseline in baselines.items():
            arrived, spent = direct.get(address, 0), outflows.get(address, 0)
            if arrived or spent != 0:
                verdict.baselines[address] = Baseline(
                    baseline.balance, baseline.direct_since + arrived, _add(baseline.spent_since, spent)
                )
        return verdict
    for address, now in measured.items():
        if address not in baselines:
            continue  # not re-checked yet: the re-check sets its first baseline
        baseline = baselines[address]
        if baseline.balance != now or baseline.direct_since != 0 or baseline.spent_since != 0:
            verdict.baselines[address] = Baseline(now)
        spent = _add(baseline.spent_since, outflows.get(address, 0))
        if spent is None:
            continue
        expected = baseline.balance + baseline.direct_since + direct.get(address, 0) - spent
        if now > expected:
            verdict.credits[address] = now - expected
        elif now < expected and spent == 0 and address not in outflows:
            verdict.shortfalls[address] = expected - now
    return verdict


def sum_by_address(found: Iterable[Found]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for item in found:
        totals[item.address] = totals.get(item.address, 0) + item.amount
    return totals


def attribute_window(
    addresses: Sequence[str],
    base: Mapping[str, int],
    blocks: Sequence[Block],
    balances: Mapping[str, Mapping[str, int]],
    native_symbol: str,
) -> list[tuple[Block, Found]]:
    """Native deposits of newly watched escrows over the recent window, block by block.

    `balances[block hash][address]` is the balance at the end of each block; `blocks` are the
    window's blocks in order, with full transactions wherever a balance changed. Each block's rise
    is split into direct deposits (transactions to the escrow) and an internal credit for the rest.
    """
    found: list[tuple[Block, Found]] = []
    wanted = set(addresses)
    running = {address: base.get(address, 0) for address in addresses}
    for block in blocks:
        after = balances[block.hash]
        direct = native_deposits(block, wanted, native_symbol)
        found.extend((block, item) for item in direct)
        verdict = judge_balances(
            {a: Baseline(running[a]) for a in addresses},
            {a: after[a] for a in addresses},
            sum_by_address(direct),
            {sender: None for sender in senders(block) if sender in wanted},
        )
        for address, amount in sorted(verdict.credits.items()):
            found.append(
                (
                    block,
                    Found(
                        address=address,
                        txid=internal_txid(block.hash, address),
                        index=INTERNAL_INDEX,
                        amount=amount,
                        asset=native_symbol,
                    ),
                )
            )
        running = {a: after[a] for a in addresses}
    return found


# --------------------------------------------------------------------------- followed transactions
# Counted the same way for every chain kind (otc_common.chainwatch); named here for this package's users.

Followed = chainwatch.Followed
stop_at = chainwatch.stop_at
confirmations_at = chainwatch.confirmations_at


# --------------------------------------------------------------------------- balance reader calls

#: Where the reader's code is placed for the duration of one `eth_call` (its state override, the
#: call's third parameter); nothing is ever deployed, here or anywhere.
BALANCE_READER_ADDRESS = "0x" + "ba1a" * 10

#: The reader. Its calldata is the addresses packed 20 bytes each; it returns each one's native
#: balance as a 32-byte word, in the same order:
#:     out = 0; for (in = 0; in < calldatasize; in += 20) { mstore(out, balance(calldataload(in) >> 96)); out += 32 }
#:     return(0, out)
BALANCE_READER_CODE = "0x" + "".join(
    (
        "6000",  # 0x00 PUSH1 0       out
        "6000",  # 0x02 PUSH1 0       in
        "5b",  # 0x04 JUMPDEST        loop:
        "36",  # 0x05 CALLDATASIZE
        "81",  # 0x06 DUP2            in
        "10",  # 0x07 LT              in < calldatasize
        "15",  # 0x08 ISZERO
        "601f",  # 0x09 PUSH1 0x1f    done
        "57",  # 0x0b JUMPI
        "80",  # 0x0c DUP1            in
        "35",  # 0x0d CALLDATALOAD
        "6060",  # 0x0e PUSH1 96
        "1c",  # 0x10 SHR             the 20-byte address at `in`
        "31",  # 0x11 BALANCE
        "82",  # 0x12 DUP3            out
        "52",  # 0x13 MSTORE
        "6014",  # 0x14 PUSH1 20
        "01",  # 0x16 ADD             in += 20
        "90",  # 0x17 SWAP1
        "6020",  # 0x18 PUSH1 32
        "01",  # 0x1a ADD             out += 32
        "90",  # 0x1b SWAP1
        "6004",  # 0x1c PUSH1 0x04    loop
        "56",  # 0x1e JUMP
        "5b",  # 0x1f JUMPDEST        done:
        "50",  # 0x20 POP             in
        "6000",  # 0x21 PUSH1 0
        "f3",  # 0x23 RETURN          memory[0:out]
    )
)
BALANCE_READER_OVERRIDE = {BALANCE_READER_ADDRESS: {"code": BALANCE_READER_CODE}}

#: Gas one address costs the reader, at most: a cold BALANCE (2,600, EIP-2929), its 20 calldata bytes
#: (320), the loop and its memory word (75); memory's quadratic term and the call's 21,000 come on top.
BALANCE_GAS_PER_ADDRESS = 2_995
#: Addresses one balance call reads by default. 10,000 addresses need about 30.2M gas, 15,000 about
#: 45.4M: above the common 30M block gas limit, so the call names its gas (`balance_call_gas`), and
#: inside the 50M eth_call gas cap geth, erigon and reth apply by default (anvil has none). A node
#: with a lower cap, or one that holds eth_call to its block gas limit, needs a lower bound
#: (OTC_BALANCE_CALL_ADDRESSES); past the bound the addresses are split over several calls.
BALANCE_CALL_ADDRESSES = 15_000


def balance_call_gas(count: int) -> int:
    """The gas to give a balance call of `count` addresses: what it needs, and 5% to spare."""
    needed = 21_000 + BALANCE_GAS_PER_ADDRESS * count + count * count // 512 + 100
    return needed * 21 // 20


def balance_call(addresses: Sequence[str]) -> dict[str, str]:
    """The `eth_call` transaction reading the native balances of `addresses` (lowercase `0x` hex)."""
    return {
        "to": BALANCE_READER_ADDRESS,
        "data": "0x" + "".join(address[2:] for address in addresses),
        "gas": hex(balance_call_gas(len(addresses))),
    }


def balance_words(result: Any, count: int) -> bytes:
    """The reader's answer for `count` addresses: one 32-byte big-endian balance each, in order."""
    if not isinstance(result, str) or not result.startswith("0x"):
        raise MalformedChainData("balance reader returned no hex data")
    try:
        words = bytes.fromhex(result[2:])
    except ValueError:
        raise MalformedChainData("balance reader returned no hex data") from None
    if len(words) != 32 * count:
        raise MalformedChainData("balance reader returned an unexpected length")
    return words


def word_at(words: bytes, position: int) -> int:
    return int.from_bytes(words[32 * position : 32 * position + 32], "big")


def balances_from_words(addresses: Sequence[str], words: bytes) -> dict[str, int]:
    view = memoryview(words)
    return {address: int.from_bytes(view[32 * i : 32 * i + 32], "big") for i, address in enumerate(addresses)}


def decode_balances(result: Any, addresses: Sequence[str]) -> dict[str, int]:
    return balances_from_words(addresses, balance_words(result, len(addresses)))


#: Words compared at once when looking for the balances that moved between two reads.
_CHUNK_WORDS = 64


def changed_positions(before: bytes, after: bytes) -> list[int]:
    """Positions of the words that differ between two reads of the same addresses."""
    if before == after:
        return []
    old, new = memoryview(before), memoryview(after)
    width = 32 * _CHUNK_WORDS
    changed = []
    for start in range(0, len(new), width):
        if old[start : start + width] != new[start : start + width]:
            for at in range(start, min(start + width, len(new)), 32):
                if old[at : at + 32] != new[at : at + 32]:
                    changed.append(at // 32)
    return changed


def balances_to_judge(
    known: Sequence[str],
    words: bytes,
    settled: bytes | None,
    direct: Mapping[str, int],
    outflows: Mapping[str, int | None],
) -> dict[str, int]:
    """The measured balances `judge_balances` needs to see, from one read (`words`) of the sorted `known`.

    `settled` is the previous read when every baseline still equals it (none carries deposits or
    spending forward); then an escrow whose balance did not move and that no transaction of the
    block paid or spent from is left out, as judging it finds nothing. Otherwise all are judged.
    """
    if settled is None or len(settled) != len(words):
        return balances_from_words(known, words)
    positions = set(changed_positions(settled, words))
    for address in (*direct, *outflows):
        at = bisect.bisect_left(known, address)
        if at < len(known) and known[at] == address:
            positions.add(at)
    return {known[at]: word_at(words, at) for at in sorted(positions)}


def address_topic(address: str) -> str:
    return "0x" + address[2:].rjust(64, "0")
