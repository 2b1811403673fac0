"""UTXO chains over Electrum: reading an escrow's outputs and fee rates, signing one-input P2WPKH
transactions with the escrow's key, broadcasting them and looking at where they stand.

The key of escrow `index` is derived from the seed on first use and kept in memory (never logged,
never in an error message). Every Electrum request is counted per chain and method.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import msgspec

from otc_common import metrics as common_metrics
from otc_common.addresses import electrum_scripthash, utxo_script_pubkey
from otc_common.electrum import ElectrumClient, ElectrumError, ElectrumTimeout, ElectrumUnavailable
from otc_common.registry import Chain
from otc_common.signing_keys import Seed, escrow_private_key
from otc_queue.backend import Sent
from otc_queue.rpc import RpcUnavailable
from otc_queue.rules import TransferOrder
from otc_queue.settings import QueueSettings
from otc_queue.utxo_rules import Coin, Leg, Seen, Terms, coins_to_sats, fee_rate
from otc_queue.utxo_tx import EscrowKey, SignedTx, sign_spend

KEY_CACHE_SIZE = 4096
#: Reads of an escrow's history, each between two reads of the tip, before a look gives up for now.
LOOK_ATTEMPTS = 3
_TXID_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)


def classify(message: str) -> Sent:
    """A broadcast refusal in the words bitcoind uses (Fulcrum passes them on inside its own text)."""
    text = message.lower()
    if (
        "txn-already-in-mempool" in text
        or "txn-already-known" in text
        or "already in block chain" in text
        or "outputs already in utxo set" in text
        or "txn-same-nonwitness-data-in-mempool" in text
    ):
        return Sent.KNOWN
    if "missingorspent" in text or "missing-inputs" in text or "txn-mempool-conflict" in text:
        return Sent.SPENT
    if "insufficient fee" in text or "min relay fee not met" in text or "mempool min fee not met" in text:
        return Sent.UNDERPRICED
    if "in-belowout" in text:
        return Sent.NO_FUNDS
    return Sent.REJECTED


def _words(message: str) -> str:
    return " ".join(message.split())


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RpcUnavailable(f"{what}: unexpected answer")
    return value


def _txid(value: Any, what: str) -> str:
    if not isinstance(value, str) or _TXID_RE.fullmatch(value) is None:
        raise RpcUnavailable(f"{what}: unexpected answer")
    return value


def _coin(item: Any) -> Coin:
    if not isinstance(item, dict):
        raise RpcUnavailable("blockchain.scripthash.listunspent: unexpected answer")
    return Coin(
        txid=_txid(item.get("tx_hash"), "listunspent tx_hash"),
        vout=_int(item.get("tx_pos"), "listunspent tx_pos"),
        value=_int(item.get("value"), "listunspent value"),
        height=_int(item.get("height"), "listunspent height"),
    )


def _rate(value: Any, what: str) -> int | None:
    """A fee rate in coins per kB as sat per 1000 vB; None when the server has no estimate (-1)."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise RpcUnavailable(f"{what}: unexpected answer")
    if value <= 0:
        return None
    return coins_to_sats(Decimal(value))


class UtxoReading(msgspec.Struct, frozen=True, kw_only=True):
    """What signing needs: the tip, the escrow's unspent outputs and the fee rates."""

    tip: int
    coins: list[Coin]
    rate: int
    relay: int


class UtxoBackend:
    def __init__(self, chain: Chain, seed: Seed, client: ElectrumClient, settings: QueueSettings) -> None:
        assert chain.hrp is not None
        self.chain = chain
        self.hrp = chain.hrp
        self.client = client
        self.settings = settings
        self._seed = seed
        self._keys: OrderedDict[int, EscrowKey] = OrderedDict()

    def __repr__(self) -> str:
        return f"UtxoBackend({self.chain.id})"

    # ----------------------------------------------------------------- keys

    def _key(self, index: int) -> EscrowKey:
        key = self._keys.get(index)
        if key is None:
            key = EscrowKey(escrow_private_key(self._seed, self.chain.derivation_path, index))
            self._keys[index] = key
            if len(self._keys) > KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(index)
        return key

    def escrow_address(self, index: int) -> str:
        return self._key(index).address(self.hrp)

    def scripthash(self, address: str) -> str:
        return electrum_scripthash(utxo_script_pubkey(address, self.hrp))

    # ----------------------------------------------------------------- reading

    async def _call(self, method: str, *params: Any) -> Any:
        try:
            return await self.client.request(method, *params)
        except ElectrumError as exc:
            common_metrics.RPC_ERRORS.labels(self.chain.id).inc()
            raise RpcUnavailable(f"{method}: {_words(exc.message)}") from None
        except (ElectrumUnavailable, ElectrumTimeout):
            common_metrics.RPC_ERRORS.labels(self.chain.id).inc()
            raise

    async def _tip(self) -> int:
        return (await self._tip_block())[0]

    async def _tip_block(self) -> tuple[int, str]:
        """The tip's height and header."""
        header = await self._call("blockchain.headers.subscribe")
        if not isinstance(header, dict):
            raise RpcUnavailable("blockchain.headers.subscribe: unexpected answer")
        return _int(header.get("height"), "tip height"), str(header.get("hex"))

    async def rates(self) -> tuple[int, int]:
        """(the rate to pay, the relay fee), both in sat per 1000 vB."""
        estimate, relay = await asyncio.gather(
            self._call("blockchain.estimatefee", self.settings.utxo_fee_target_blocks),
            self._call("blockchain.relayfee"),
        )
        relay_rate = _rate(relay, "blockchain.relayfee") or 0
        rate = fee_rate(
            _rate(estimate, "blockchain.estimatefee"),
            relay_rate,
            self.settings.utxo_min_fee_per_kvb,
            self.settings.utxo_max_fee_per_kvb,
        )
        return rate, relay_rate

    async def read(self, address: str) -> UtxoReading:
        # The tip first: an output mined after it counts as unconfirmed, never the other way round.
        tip = await self._tip()
        unspent, (rate, relay) = await asyncio.gather(
            self._call("blockchain.scripthash.listunspent", self.scripthash(address)), self.rates()
        )
        if not isinstance(unspent, list):
            raise RpcUnavailable("blockchain.scripthash.listunspent: unexpected answer")
        return UtxoReading(tip=tip, coins=[_coin(item) for item in unspent], rate=rate, relay=relay)

    async def look(self, address: str) -> Seen:
        """The escrow's history (every leg spends an escrow output, so every candidate is in it), as of one tip."""
        tip, heights = await self.look_many([address])
        return Seen(tip=tip, heights=heights)

    async def look_many(self, addresses: Sequence[str]) -> tuple[int, dict[str, int]]:
        """The histories of escrows as of one tip: the tip, and the height of each transaction in them.

        The same tip must be there before and after the histories are read. A reorg in between would leave the
        height of a transaction it dropped next to the new branch's higher tip, and the dropped payout would count as
        confirmed, for good. A tip that moved only means reading again (with blocks a second apart and a busy
        server, one in five looks saw a new block; giving up until the next look kept payouts 10 s longer).
        """
        for _ in range(LOOK_ATTEMPTS):
            before = await self._tip_block()
            histories = await asyncio.gather(
                *(self._call("blockchain.scripthash.get_history", self.scripthash(address)) for address in addresses)
            )
            tip, header = await self._tip_block()
            if (tip, header) == before:
                break
        else:
            raise RpcUnavailable("the tip moved while the escrows' histories were read; they are read again")
        heights: dict[str, int] = {}
        for history in histories:
            if not isinstance(history, list):
                raise RpcUnavailable("blockchain.scripthash.get_history: unexpected answer")
            for item in history:
                if not isinstance(item, dict):
                    raise RpcUnavailable("blockchain.scripthash.get_history: unexpected answer")
                heights[_txid(item.get("tx_hash"), "history tx_hash")] = _int(item.get("height"), "history height")
        return tip, heights

    # ----------------------------------------------------------------- signing

    def terms(self, order: TransferOrder, rate: int, relay: int) -> Terms:
        return Terms(
            rate=rate,
            relay=relay,
            cap=max(self.settings.utxo_max_fee_per_kvb, relay),
            to_script=utxo_script_pubkey(order.to.lower(), self.hrp),
            change_script=self._key(order.escrow_index).script_pubkey,
        )

    def sign(self, order: TransferOrder, leg: Leg) -> SignedTx:
        key = self._key(order.escrow_index)
        outputs = [(utxo_script_pubkey(order.to.lower(), self.hrp), leg.to_value)]
        if leg.change > 0:
            outputs.append((key.script_pubkey, leg.change))
        return sign_spend(key, leg.coin.txid, leg.coin.vout, leg.coin.value, outputs)

    # ----------------------------------------------------------------- the network

    async def send(self, raw: bytes) -> tuple[Sent, str]:
        try:
            answer = await self.client.request("blockchain.transaction.broadcast", raw.hex())
        except ElectrumError as exc:
            return classify(exc.message), _words(exc.message)
        if not isinstance(answer, str) or _TXID_RE.fullmatch(answer) is None:
            return Sent.REJECTED, f"unexpected answer to the broadcast: {str(answer)[:100]}"
        return Sent.ACCEPTED, ""

    async def close(self) -> None:
        await self.client.close()
