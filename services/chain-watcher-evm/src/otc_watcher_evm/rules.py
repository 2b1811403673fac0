"""What a block means for the watched escrows and followed transactions: pure functions, no I/O.

Addresses and hashes are compared in lowercase `0x` form; the shell maps escrow addresses back
to the form the engine assigned them in before publishing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from otc_common import chainwatch

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
#: `index` of a native deposit made by a transaction's own value.
NATIVE_INDEX = -1
#: `index` of native coin that arrived by internal transfers, found by the balance check.
INTERNAL_INDEX = -2
#: The balance reader packs balances into 16 bytes; this value means "too large to tell".
SATURATED = 2**128 - 1


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


def native_deposits(block: Block, watched: Iterable[str], native_symbol: str) -> list[Found]:
    """Transactions paying value straight to a watched escrow.

    An escrow is a key-derived account without code, so a mined transaction to it cannot revert:
    its value arrived, and no receipt is needed to know that.
    """
    targets = set(watched)
    return [
        Found(address=tx.to, txid=tx.hash, index=NATIVE_INDEX, amount=tx.value, asset=native_symbol)
        for tx in block.txs
        if tx.to is not None and tx.to in targets and tx.value > 0 and tx.sender != tx.to
    ]


def transfer_recipient(log: Log) -> str | None:
    """The `to` of an ERC-20 Transfer log; None for anything else (ERC-721 indexes a fourth topic)."""
    if log.removed or len(log.topics) != 3 or log.topics[0] != TRANSFER_TOPIC:
        return None
    topic = log.topics[2]
    if len(topic) != 66 or topic[2:26] != "0" * 24:
        return None
    return "0x" + topic[26:]


def token_deposits(logs: Iterable[Log], watched: Iterable[str], tokens: Mapping[str, str]) -> list[Found]:
    """ERC-20 Transfers to watched escrows; `tokens` maps registered contracts to their symbols."""
    targets = set(watched)
    found = []
    for log in logs:
        to = transfer_recipient(log)
        if to is None or to not in targets or len(log.data) != 66:
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
        if spent is None or baseline.balance == SATURATED or now == SATURATED:
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

BALANCE_BYTES = 16
#: EIP-3860 caps init code (with the appended addresses) at 49,152 bytes and EIP-170 caps the
#: returned bytes at 24,576; 1,500 addresses stay inside both.
BALANCE_BATCH = 1500


def balance_call_data(init_code: str, addresses: Sequence[str]) -> str:
    """The reader's init code followed by the ABI encoding of `address[]`."""
    words = [f"{32:064x}", f"{len(addresses):064x}"]
    words.extend(address[2:].rjust(64, "0") for address in addresses)
    return init_code + "".join(words)


def decode_balances(result: str, addresses: Sequence[str]) -> dict[str, int]:
    raw = bytes.fromhex(result[2:] if result.startswith("0x") else result)
    count = len(addresses)
    if len(raw) != 32 + BALANCE_BYTES * count or int.from_bytes(raw[:32], "big") != count:
        raise MalformedChainData("balance reader returned an unexpected length")
    return {
        address: int.from_bytes(raw[32 + BALANCE_BYTES * i : 32 + BALANCE_BYTES * (i + 1)], "big")
        for i, address in enumerate(addresses)
    }


def address_topic(address: str) -> str:
    return "0x" + address[2:].rjust(64, "0")
