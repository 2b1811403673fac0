"""EVM chains: reading an escrow's standing, EIP-1559 transactions signed with the escrow's key, broadcasts.

The key of escrow `index` is derived from the seed on first use and kept in memory (never logged,
never in an error message). The signing path reads the chain in two JSON-RPC batches for all of a
sender's queued transfers: the latest block (base fee), the suggested tip and the token transfers'
gas estimates, then the escrow's balances and nonces at the latest block and at the newest block
with the chain's threshold of confirmations; it broadcasts what it signed in one more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
from eth_account import Account
from eth_account.signers.local import LocalAccount

from otc_common.addresses import evm_checksum_address
from otc_common.registry import Chain
from otc_common.signing_keys import Seed, escrow_private_key
from otc_queue.backend import Sent, Signed
from otc_queue.rpc import JsonRpc, RpcError, RpcUnavailable, as_int
from otc_queue.rules import (
    NATIVE_TRANSFER_GAS,
    AccountAt,
    Market,
    Outflow,
    Receipt,
    Refused,
    Seen,
    TransferOrder,
    TxPlan,
    Wait,
    confirmed_block,
    plan_bump,
    plan_payment,
    spendable,
)
from otc_queue.store import InFlight

TRANSFER_SELECTOR = bytes.fromhex("a9059cbb")
BALANCE_OF_SELECTOR = "0x70a08231"
#: JSON-RPC "method not found": nodes without eth_maxPriorityFeePerGas.
METHOD_NOT_FOUND = -32601
KEY_CACHE_SIZE = 4096


def token_transfer_data(to: str, amount: int) -> bytes:
    return TRANSFER_SELECTOR + bytes.fromhex(to[2:].lower().rjust(64, "0")) + amount.to_bytes(32, "big")


def with_margin(gas: int) -> int:
    """An estimate plus 20 %: the recipient's storage slot or a token's hooks may cost a little more."""
    return gas * 6 // 5


def classify(message: str) -> Sent:
    """A broadcast error in the words geth, erigon, nethermind and anvil use."""
    text = message.lower()
    if "already known" in text or "already imported" in text or "known transaction" in text:
        return Sent.KNOWN
    if "nonce too low" in text or "nonce is too low" in text or "oldnonce" in text:
        return Sent.SPENT
    if "underpriced" in text or "fee too low" in text or "less than block base fee" in text or "tip too low" in text:
        return Sent.UNDERPRICED
    if "insufficient funds" in text:
        return Sent.NO_FUNDS
    return Sent.REJECTED


class EvmReading(msgspec.Struct, frozen=True, kw_only=True):
    tip: int
    market: Market
    states: list[AccountAt]
    gas_limit: int


class EvmBackend:
    def __init__(self, chain: Chain, seed: Seed, rpc: JsonRpc) -> None:
        assert chain.chain_id is not None
        self.chain = chain
        self.chain_id = chain.chain_id
        self._seed = seed
        self.rpc = rpc
        self._keys: OrderedDict[int, LocalAccount] = OrderedDict()
        #: The tip the last read saw.
        self._tip: int | None = None

    def __repr__(self) -> str:
        return f"EvmBackend({self.chain.id})"

    # ----------------------------------------------------------------- keys

    def _account(self, index: int) -> LocalAccount:
        account = self._keys.get(index)
        if account is None:
            account = Account.from_key(escrow_private_key(self._seed, self.chain.derivation_path, index))
            self._keys[index] = account
            if len(self._keys) > KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(index)
        return account

    def escrow_address(self, index: int) -> str:
        return str(self._account(index).address)

    # ----------------------------------------------------------------- reading

    def _token(self, order: TransferOrder) -> str | None:
        asset = self.chain.assets[order.asset]
        return None if asset.native else asset.contract

    async def read(self, order: TransferOrder, *, estimate: bool) -> EvmReading | Wait:
        return (await self.read_many([order], estimate=estimate))[0]

    async def read_many(self, orders: Sequence[TransferOrder], *, estimate: bool) -> list[EvmReading | Wait]:
        """What signing each of one sender's transfers needs, read for all of them at once.

        The escrow's standing is read at the latest block and at the newest block with the threshold of
        confirmations. That block is reckoned from the tip this backend last saw, so that one request reads it all
        while the tip stays where it was; once the tip has moved, a second request reads at the block the tip read
        now gives (an older block would not count a deposit that has just reached the threshold, and the payout
        would wait for the next sweep).
        """
        sender = orders[0].escrow_address
        tokens = sorted({token for order in orders if (token := self._token(order)) is not None})
        calls: list[tuple[str, list[Any]]] = [
            ("eth_getBlockByNumber", ["latest", False]),
            ("eth_maxPriorityFeePerGas", []),
        ]
        estimated: dict[int, int] = {}
        for i, order in enumerate(orders):
            token = self._token(order)
            if token is not None and estimate:
                call = {"from": sender, "to": token, "data": "0x" + token_transfer_data(order.to, order.amount).hex()}
                estimated[i] = len(calls)
                calls.append(("eth_estimateGas", [call, "latest"]))
        reckoned = None if self._tip is None else confirmed_block(self._tip, self.chain.confirmations)
        standing_at = len(calls)
        if reckoned is not None and reckoned >= 0:
            calls += self._standing_calls(sender, tokens, ["latest", hex(reckoned)])
        heads = await self.rpc.batch(calls)
        block = heads[0]
        if not isinstance(block, dict):
            raise RpcUnavailable("eth_getBlockByNumber: no latest block")
        tip = as_int(block.get("number"), "block number")
        self._tip = tip
        base_fee = as_int(block.get("baseFeePerGas") or "0x0", "base fee")
        market = Market(base_fee=base_fee, priority_fee=await self._priority_fee(heads[1], base_fee))
        confirmed = confirmed_block(tip, self.chain.confirmations)
        if confirmed < 0:
            return [Wait("the chain is shorter than its confirmation threshold")] * len(orders)
        if reckoned == confirmed:
            blocks, answers = [tip, confirmed], heads[standing_at:]
        else:
            blocks = [tip, confirmed]
            answers = await self.rpc.batch(self._standing_calls(sender, tokens, [hex(tip), hex(confirmed)]))
        per_block = 2 + len(tokens)
        # Per token (None: the native coin), the escrow's standing at each block.
        states: dict[str | None, list[AccountAt]] = {None: []}
        for i, number in enumerate(blocks):
            part = answers[i * per_block : (i + 1) * per_block]
            native = as_int(part[0], "eth_getBalance")
            nonce = as_int(part[1], "eth_getTransactionCount")
            states[None].append(AccountAt(block=number, native=native, nonce=nonce))
            for j, token in enumerate(tokens):
                at = AccountAt(block=number, native=native, nonce=nonce, token=as_int(part[2 + j], "balanceOf"))
                states.setdefault(token, []).append(at)
        readings: list[EvmReading | Wait] = []
        for i, order in enumerate(orders):
            gas_limit = NATIVE_TRANSFER_GAS
            if i in estimated:
                gas = heads[estimated[i]]
                if isinstance(gas, RpcError):
                    readings.append(Wait(f"the token transfer cannot be estimated yet: {gas.message}"))
                    continue
                gas_limit = with_margin(as_int(gas, "gas estimate"))
            readings.append(EvmReading(tip=tip, market=market, states=states[self._token(order)], gas_limit=gas_limit))
        return readings

    @staticmethod
    def _standing_calls(sender: str, tokens: Sequence[str], tags: Sequence[str]) -> list[tuple[str, list[Any]]]:
        """The escrow's balance and nonce, and its balance of each token, at each of `tags`."""
        calls: list[tuple[str, list[Any]]] = []
        data = BALANCE_OF_SELECTOR + sender[2:].lower().rjust(64, "0")
        for tag in tags:
            calls += [("eth_getBalance", [sender, tag]), ("eth_getTransactionCount", [sender, tag])]
            calls += [("eth_call", [{"to": token, "data": data}, tag]) for token in tokens]
        return calls

    async def _priority_fee(self, answer: Any, base_fee: int) -> int:
        if not isinstance(answer, RpcError):
            return as_int(answer, "eth_maxPriorityFeePerGas")
        if answer.code != METHOD_NOT_FOUND:
            raise answer
        return max(0, as_int(await self.rpc.call("eth_gasPrice"), "eth_gasPrice") - base_fee)

    # ----------------------------------------------------------------- signing

    def _sign(self, order: TransferOrder, nonce: int, plan: TxPlan) -> Signed:
        token = self._token(order)
        if token is None:
            to, data = evm_checksum_address(order.to), b""
        else:
            to, data = token, token_transfer_data(order.to, order.amount)
        transaction: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "to": to,
            "value": plan.value,
            "gas": plan.gas_limit,
            "maxFeePerGas": plan.max_fee,
            "maxPriorityFeePerGas": plan.priority_fee,
            "data": data,
            "accessList": [],
        }
        signed = self._account(order.escrow_index).sign_transaction(transaction)
        return Signed(txid="0x" + bytes(signed.hash).hex(), raw=bytes(signed.raw_transaction), nonce=nonce, plan=plan)

    def sign_first(
        self, order: TransferOrder, reading: EvmReading, outflows: Sequence[Outflow], next_nonce: int
    ) -> Signed | Wait | Refused:
        room_native, room_token = spendable(reading.states, outflows)
        plan = plan_payment(
            amount=order.amount,
            native=self._token(order) is None,
            fee_from_amount=order.fee_from_amount,
            gas_limit=reading.gas_limit,
            market=reading.market,
            room_native=room_native,
            room_token=room_token,
        )
        if not isinstance(plan, TxPlan):
            return plan
        # A nonce the chain has already passed was used by a transaction that is not ours; never reuse it.
        latest_nonce = max(state.nonce for state in reading.states)
        return self._sign(order, max(next_nonce, latest_nonce), plan)

    def sign_replacement(
        self, order: TransferOrder, nonce: int, last: TxPlan, reading: EvmReading, outflows: Sequence[Outflow]
    ) -> Signed | Wait:
        room_native, _ = spendable(reading.states, outflows)
        plan = plan_bump(
            last=last,
            amount=order.amount,
            native=self._token(order) is None,
            fee_from_amount=order.fee_from_amount,
            market=reading.market,
            room_native=room_native,
        )
        if not isinstance(plan, TxPlan):
            return plan
        return self._sign(order, nonce, plan)

    def amount_sent(self, order: TransferOrder, plan: TxPlan) -> int:
        return plan.value if self._token(order) is None else order.amount

    # ----------------------------------------------------------------- the network

    async def send(self, raw: bytes) -> tuple[Sent, str]:
        try:
            await self.rpc.call("eth_sendRawTransaction", "0x" + raw.hex())
        except RpcError as exc:
            return classify(exc.message), exc.message
        return Sent.ACCEPTED, ""

    async def send_many(self, raws: Sequence[bytes]) -> list[tuple[Sent, str]]:
        """Broadcasts a sender's transactions, in nonce order, with one request."""
        if len(raws) == 1:
            return [await self.send(raws[0])]
        answers = await self.rpc.batch([("eth_sendRawTransaction", ["0x" + raw.hex()]) for raw in raws])
        return [
            (classify(answer.message), answer.message) if isinstance(answer, RpcError) else (Sent.ACCEPTED, "")
            for answer in answers
        ]

    async def look(self, sender: str, transfers: Sequence[InFlight]) -> Seen:
        txids = [c.txid for t in transfers for c in t.candidates]
        calls: list[tuple[str, list[Any]]] = []
        for txid in txids:
            calls += [("eth_getTransactionReceipt", [txid]), ("eth_getTransactionByHash", [txid])]
        # Last, so that the tip is never older than a receipt read before it.
        calls += [("eth_getTransactionCount", [sender, "latest"]), ("eth_blockNumber", [])]
        answers = await self.rpc.batch(calls)
        receipts: dict[str, Receipt] = {}
        known: set[str] = set()
        for i, txid in enumerate(txids):
            receipt, found = answers[2 * i], answers[2 * i + 1]
            if isinstance(found, RpcError):
                raise RpcUnavailable(f"looking up {txid}: {found}")
            if isinstance(found, dict):
                known.add(txid)
            mined = _receipt(txid, receipt)
            if mined is not None:
                receipts[txid] = mined
        return Seen(
            tip=as_int(answers[-1], "eth_blockNumber"),
            account_nonce=as_int(answers[-2], "eth_getTransactionCount"),
            receipts=receipts,
            known=frozenset(known),
        )

    async def receipts(self, txids: Sequence[str]) -> tuple[int, dict[str, Receipt]]:
        """The tip and the receipts of those of `txids` that are mined, with one request (the tip read last, so it
        is never older than a receipt)."""
        calls: list[tuple[str, list[Any]]] = [("eth_getTransactionReceipt", [txid]) for txid in txids]
        answers = await self.rpc.batch([*calls, ("eth_blockNumber", [])])
        found = {txid: mined for txid, answer in zip(txids, answers, strict=False) if (mined := _receipt(txid, answer))}
        return as_int(answers[-1], "eth_blockNumber"), found

    def is_native(self, asset: str) -> bool:
        return self.chain.assets[asset].native

    async def close(self) -> None:
        await self.rpc.close()


def _receipt(txid: str, answer: Any) -> Receipt | None:
    """A transaction's receipt if it is mined; a failed read raises rather than pass for "not mined"."""
    if isinstance(answer, RpcError):
        raise RpcUnavailable(f"looking up {txid}: {answer}")
    if not isinstance(answer, dict) or answer.get("blockNumber") is None:
        return None
    return Receipt(
        txid=txid,
        block_number=as_int(answer["blockNumber"], "receipt block"),
        block_hash=str(answer.get("blockHash") or ""),
        success=answer.get("status") == "0x1",
        gas_used=as_int(answer.get("gasUsed"), "gasUsed"),
        effective_gas_price=as_int(answer.get("effectiveGasPrice"), "effectiveGasPrice"),
    )
