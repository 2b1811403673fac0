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
    deal_id: str
    party: Party


@message("deal.stage_changed")
class StageChanged(Message, frozen=True, kw_only=True):
    deal_id: str
    stage: Stage
    previous: Stage | None
    outcome: Outcome | None = None
    expires_at: datetime | None = None
    reason: str = ""


@message("deal.unwatch")
class EscrowUnwatch(Message, frozen=True, kw_only=True):
    """The post-close window is over: watchers may forget the address."""

    deal_id: str
    chain: str
    address: str


# --------------------------------------------------------------------------- alerts


@message("alert.raised")
class AlertRaised(Message, frozen=True, kw_only=True):
    source: str
    kind: str
    detail: str
    chain: str | None = None
    deal_id: str | None = None


# --------------------------------------------------------------------------- gateway ⇄ engine

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Token = Annotated[str, msgspec.Meta(min_length=16, max_length=128)]
DealId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
AmountText = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
AddressText = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Email = Annotated[str, msgspec.Meta(max_length=254, pattern=r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")]


class Params(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """Base of JSON-RPC parameter objects: camelCase names, unknown fields refused."""


class SideParams(Params, frozen=True, kw_only=True):
    chain_id: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    asset: Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
    amount: AmountText


class CreateDealParams(Params, frozen=True, kw_only=True):
    alice: SideParams
    bob: SideParams
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=30 * 24 * 3600)]
    name: Annotated[str, msgspec.Meta(max_length=100)] | None = None


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


class ChainFilterParams(Params, frozen=True, kw_only=True):
    chain_id: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] | None = None


RPC_PARAMS: dict[str, type[Params]] = {
    "otc.createDeal": CreateDealParams,
    "otc.fillPartyDetails": FillPartyDetailsParams,
    "otc.status": StatusParams,
    "otc.cancelDeal": CancelDealParams,
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
