"""Every message that crosses the bus, and the envelope that carries it.

JSON on the wire because wei amounts exceed msgpack's 64-bit integers. New fields
always get defaults so that older consumers keep decoding newer producers'
messages; consumers skip types they do not know.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec


class Party(StrEnum):
    ALICE = "ALICE"
    BOB = "BOB"


class Stage(StrEnum):
    CREATED = "CREATED"
    COLLECTION = "COLLECTION"
    WAITING = "WAITING"
    SWAP = "SWAP"
    REVERTED = "REVERTED"
    CLOSED = "CLOSED"


class Outcome(StrEnum):
    SWAPPED = "SWAPPED"
    REFUNDED = "REFUNDED"
    CANCELLED = "CANCELLED"


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every payload; `TYPE` names it in the envelope."""

    TYPE: ClassVar[str] = ""


_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def message(type_name: str) -> Any:
    """Class decorator registering a payload type under its wire name."""

    def register(cls: M) -> M:
        if type_name in _REGISTRY:
            raise ValueError(f"message type {type_name} registered twice")
        cls.TYPE = type_name
        _REGISTRY[type_name] = cls
        return cls

    return register


def message_type(type_name: str) -> type[Message] | None:
    return _REGISTRY.get(type_name)


class Envelope(msgspec.Struct, frozen=True):
    event_id: str
    type: str
    occurred_at: datetime
    payload: msgspec.Raw


class UnknownMessageType(Exception):
    """A well-formed envelope whose type this build does not know: skipped, not an error."""


_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(Envelope)


def new_event_id() -> str:
    return str(uuid.uuid4())


def stable_event_id(*parts: object) -> str:
    """Same facts → same id, so replicas publishing the same observation are deduplicated."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "otc:" + "/".join(str(p) for p in parts)))


def encode_envelope(msg: Message, event_id: str | None = None, occurred_at: datetime | None = None) -> bytes:
    envelope = Envelope(
        event_id=event_id or new_event_id(),
        type=msg.TYPE,
        occurred_at=occurred_at or datetime.now(UTC),
        payload=msgspec.Raw(_encoder.encode(msg)),
    )
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> tuple[Envelope, Message]:
    """Raises msgspec errors for malformed data, UnknownMessageType for a type we do not know."""
    envelope = _envelope_decoder.decode(data)
    cls = _REGISTRY.get(envelope.type)
    if cls is None:
        raise UnknownMessageType(envelope.type)
    return envelope, msgspec.json.decode(envelope.payload, type=cls)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


# --------------------------------------------------------------------------- deals


class DealSide(msgspec.Struct, frozen=True, kw_only=True):
    chain: str
    asset: str
    amount: int


@message("deal.created")
class DealCreated(Message, frozen=True, kw_only=True):
    deal_id: str
    name: str
    alice: DealSide
    bob: DealSide
    timeout_seconds: int


@message("deal.escrow_assigned")
class EscrowAssigned(Message, frozen=True, kw_only=True):
    """Tells watchers to watch an address; sent when the escrow is allocated."""

    deal_id: str
    party: Party
    chain: str
    asset: str
    address: str
    escrow_index: int


@message("deal.party_filled")
class PartyDetailsFilled(Message, frozen=True, kw_only=True):
    """Carries the addresses so the signer can check destinations against the deal itself."""

    deal_id: str
    party: Party
    payback_address: str = ""
    recipient_address: str = ""


@message("deal.stage_changed")
class StageChanged(Message, frozen=True, kw_only=True):
    deal_id: str
    stage: Stage
    previous: Stage | None
    outcome: Outcome | None = None
    expires_at: datetime | None = None
    reason: str = ""


@message("deal.side_funded")
class SideFunded(Message, frozen=True, kw_only=True):
    """A side's mined deposits reached its required amount (told once per side)."""

    deal_id: str
    party: Party
    amount: int


@message("deal.unwatch")
class EscrowUnwatch(Message, frozen=True, kw_only=True):
    """The post-close window is over: watchers may forget the address."""

    deal_id: str
    chain: str
    address: str


# --------------------------------------------------------------------------- chain watchers
# Published by a watcher through its outbox with ids derived from the facts (stable_event_id),
# so replicas of the same watcher publish identical events that JetStream deduplicates.


@message("chain.deposit")
class DepositObserved(Message, frozen=True, kw_only=True):
    """Value arrived at a watched escrow in a mined block.

    `index` is the log index of an ERC-20 Transfer, the output index of a UTXO, -1 for a
    native EVM transaction's value, and -2 for native coin that arrived by an internal
    transfer (found by the balance check; `txid` is then `internal:<block hash>:<address>`).
    """

    chain: str
    address: str
    asset: str
    txid: str
    index: int
    amount: int
    block_number: int
    block_hash: str
    block_time: int
    #: How many reorgs the watcher had followed on this chain when it saw the deposit (`ChainReorg.sequence`).
    reorgs: int = 0


@message("chain.tip")
class ChainTip(Message, frozen=True, kw_only=True):
    """The watcher's new tip, after `reorgs` reorgs on this chain: it counts only once they all have."""

    chain: str
    height: int
    hash: str
    time: int
    reorgs: int = 0


@message("chain.reorg")
class ChainReorg(Message, frozen=True, kw_only=True):
    """Blocks above `ancestor_height` were replaced; what they held is unmined until seen again."""

    chain: str
    ancestor_height: int
    ancestor_hash: str
    depth: int
    removed_hashes: list[str]
    new_tip_height: int
    new_tip_hash: str
    #: This reorg's number on its chain, counted by the watchers from 1 (0: not counted).
    sequence: int = 0


@message("chain.tx_confirmation")
class TxConfirmation(Message, frozen=True, kw_only=True):
    """A followed transaction's standing: confirmations = 0 means it is not (or no longer) mined."""

    chain: str
    txid: str
    confirmations: int
    block_number: int | None = None
    block_hash: str | None = None
    success: bool = True
    fee_paid: int = 0


@message("chain.token_ignored")
class UnregisteredTokenDeposit(Message, frozen=True, kw_only=True):
    """A token this broker does not trade arrived at an escrow: reported, never counted."""

    chain: str
    address: str
    contract: str
    txid: str
    index: int
    amount: int
    block_number: int


# --------------------------------------------------------------------------- payouts


class TransferPurpose(StrEnum):
    SWAP_PAYOUT = "SWAP_PAYOUT"
    COMMISSION = "COMMISSION"
    SURPLUS = "SURPLUS"
    REFUND = "REFUND"
    GAS_RETURN = "GAS_RETURN"
    LATE_RETURN = "LATE_RETURN"


@message("queue.payout")
class PayoutCommand(Message, frozen=True, kw_only=True):
    """Engine → queue processor: move `amount` of `asset` out of an escrow.

    With `fee_from_amount` the network fee comes out of the amount (native refunds and
    surplus: the receiver gets amount - fee); otherwise the escrow pays the fee on top
    (from its fee reserve, or from tank-funded gas for tokens).
    """

    transfer_id: str
    deal_id: str
    chain: str
    asset: str
    escrow_address: str
    escrow_index: int
    to: str
    amount: int
    purpose: TransferPurpose
    fee_from_amount: bool = False
    phase: int = 1


@message("queue.submitted")
class TransferSubmitted(Message, frozen=True, kw_only=True):
    transfer_id: str
    deal_id: str
    chain: str
    txid: str
    #: Every candidate hash broadcast so far (fee bumps replace at the same nonce or inputs).
    candidates: list[str] = []


@message("queue.progress")
class TransferProgress(Message, frozen=True, kw_only=True):
    transfer_id: str
    deal_id: str
    chain: str
    txid: str
    confirmations: int


@message("queue.confirmed")
class TransferConfirmed(Message, frozen=True, kw_only=True):
    """The transfer reached the chain's confirmation threshold."""

    transfer_id: str
    deal_id: str
    chain: str
    txid: str
    block_number: int
    confirmations: int
    amount_sent: int
    fee_paid: int


@message("queue.failed")
class TransferFailed(Message, frozen=True, kw_only=True):
    transfer_id: str
    deal_id: str
    chain: str
    reason: str
    #: False when the queue refused the command (destination or amount check): never retried.
    retryable: bool = True


# --------------------------------------------------------------------------- tank


@message("tank.fund_request")
class GasFundingRequest(Message, frozen=True, kw_only=True):
    """Engine → tank: give this escrow the native gas for `transfers` token transfers."""

    request_id: str
    deal_id: str
    chain: str
    escrow_address: str
    transfers: int
    gas_per_transfer: int


@message("tank.funded")
class GasFunded(Message, frozen=True, kw_only=True):
    """The funding transaction is confirmed; `amount` wei now sit in the escrow for gas."""

    request_id: str
    deal_id: str
    chain: str
    escrow_address: str
    amount: int
    txid: str


@message("tank.low_balance")
class TankLowBalance(Message, frozen=True, kw_only=True):
    chain: str
    address: str
    balance: int
    threshold: int


# --------------------------------------------------------------------------- alerts


@message("alert.raised")
class AlertRaised(Message, frozen=True, kw_only=True):
    source: str
    kind: str
    detail: str
    chain: str | None = None
    deal_id: str | None = None


# --------------------------------------------------------------------------- gateway ⇄ engine

# PostgreSQL text cannot hold NUL, and no valid value contains a control character.
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=_PRINTABLE)]
Token = Annotated[str, msgspec.Meta(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
DealId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
AmountText = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=_PRINTABLE)]
AddressText = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_PRINTABLE)]
Email = Annotated[str, msgspec.Meta(max_length=254, pattern=r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")]


class Params(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """Base of JSON-RPC parameter objects: camelCase names, unknown fields refused."""


class SideParams(Params, frozen=True, kw_only=True):
    chain_id: Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=_PRINTABLE)]
    asset: Annotated[str, msgspec.Meta(min_length=1, max_length=80, pattern=_PRINTABLE)]
    amount: AmountText


class CreateDealParams(Params, frozen=True, kw_only=True):
    alice: SideParams
    bob: SideParams
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=30 * 24 * 3600)]
    name: Annotated[str, msgspec.Meta(max_length=100, pattern=_PRINTABLE)] | None = None


class FillPartyDetailsParams(Params, frozen=True, kw_only=True):
    deal_id: DealId
    party: Party
    payback_address: AddressText
    recipient_address: AddressText
    token: Token
    email: Email | None = None


class StatusParams(Params, frozen=True, kw_only=True):
    deal_id: DealId
    token: Token | None = None


class CancelDealParams(Params, frozen=True, kw_only=True):
    deal_id: DealId
    token: Token


class SendInviteParams(Params, frozen=True, kw_only=True):
    """Mails `party` its personal link; `token` is that party's own token, which the link carries."""

    deal_id: DealId
    party: Party
    email: Email
    token: Token


class ChainFilterParams(Params, frozen=True, kw_only=True):
    chain_id: Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=_PRINTABLE)] | None = None


RPC_PARAMS: dict[str, type[Params]] = {
    "otc.createDeal": CreateDealParams,
    "otc.fillPartyDetails": FillPartyDetailsParams,
    "otc.status": StatusParams,
    "otc.cancelDeal": CancelDealParams,
    "otc.sendInvite": SendInviteParams,
    "otc.getChainConfig": ChainFilterParams,
    "otc.listAssets": ChainFilterParams,
}


class EngineRequest(msgspec.Struct, frozen=True):
    method: str
    params: msgspec.Raw


class RpcErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class EngineReply(msgspec.Struct, frozen=True, omit_defaults=True):
    result: Any = None
    error: RpcErrorBody | None = None
