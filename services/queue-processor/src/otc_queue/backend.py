"""What the shell needs from an EVM chain; `evm.py` implements it.

UTXO chains do not fit it (a transfer there may be several one-input transactions, each replaced
on its own): `utxo_flow.py` signs and follows them over `utxo.py`, with the same shell around it.

The shell owns the order of work (per sender, in arrival order), the database (candidates stored
before broadcast, one transaction per state change with its events) and the events; a backend owns
how a chain is read, how a transaction is built and signed, and what a node's answer means.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Protocol

import msgspec

from otc_common.registry import Chain
from otc_queue.rules import Outflow, Receipt, Refused, Seen, TransferOrder, TxPlan, Wait
from otc_queue.store import InFlight


class Sent(StrEnum):
    """A node's answer to a broadcast."""

    ACCEPTED = "accepted"
    #: The node already has these bytes (in its pool, or mined).
    KNOWN = "known"
    #: Its nonce is used: one of the candidates (or something else) was mined; receipts will tell.
    SPENT = "spent"
    #: The node wants a higher fee: replace it at the same nonce.
    UNDERPRICED = "underpriced"
    NO_FUNDS = "no_funds"
    REJECTED = "rejected"


class Signed(msgspec.Struct, frozen=True, kw_only=True):
    txid: str
    raw: bytes
    nonce: int
    plan: TxPlan


class ChainBackend(Protocol):
    chain: Chain

    def escrow_address(self, index: int) -> str:
        """The address of the key the seed gives at `index` (what the command's escrow must be)."""
        ...

    async def read(self, order: TransferOrder, *, estimate: bool) -> Any | Wait:
        """What signing needs from the chain (balances, fees), read before the signing transaction."""
        ...

    async def read_many(self, orders: Sequence[TransferOrder], *, estimate: bool) -> list[Any | Wait]:
        """`read` for several transfers of one sender, with the round trips of one."""
        ...

    def sign_first(
        self, order: TransferOrder, reading: Any, outflows: Sequence[Outflow], next_nonce: int
    ) -> Signed | Wait | Refused:
        """The transfer's first transaction, if the escrow can pay it; pure apart from signing."""
        ...

    def sign_replacement(
        self, order: TransferOrder, nonce: int, last: TxPlan, reading: Any, outflows: Sequence[Outflow]
    ) -> Signed | Wait:
        """A replacement of `last` at the same nonce with higher fees."""
        ...

    async def send(self, raw: bytes) -> tuple[Sent, str]:
        """Broadcasts stored bytes; the outcome and the node's words."""
        ...

    async def send_many(self, raws: Sequence[bytes]) -> list[tuple[Sent, str]]:
        """`send` for several of one sender's transactions, in nonce order, with one request."""
        ...

    async def look(self, sender: str, transfers: Sequence[InFlight]) -> Seen:
        """One look at the chain for a sender's signed transfers."""
        ...

    async def receipts(self, txids: Sequence[str]) -> tuple[int, dict[str, Receipt]]:
        """The tip and the receipts of the mined ones of `txids`, with one request."""
        ...

    def is_native(self, asset: str) -> bool:
        """Whether `asset` is the chain's own coin (a transaction's value) rather than a token."""
        ...

    def amount_sent(self, order: TransferOrder, plan: TxPlan) -> int:
        """What the receiver got from the mined candidate."""
        ...

    async def close(self) -> None: ...
