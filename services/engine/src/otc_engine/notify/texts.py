"""The e-mails a trader receives: plain, short, and free of anything secret but the invitee's own link."""

from __future__ import annotations

import msgspec

from otc_common.messages import Outcome, Party
from otc_common.money import format_amount


class SideView(msgspec.Struct, frozen=True, kw_only=True):
    party: Party
    chain: str
    asset: str
    amount: int
    decimals: int
    payback_address: str | None = None
    recipient_address: str | None = None

    def money(self, amount: int | None = None) -> str:
        return f"{format_amount(self.amount if amount is None else amount, self.decimals)} {self.asset} on {self.chain}"


class DealView(msgspec.Struct, frozen=True, kw_only=True):
    deal_id: str
    name: str
    alice: SideView
    bob: SideView

    def side(self, party: Party) -> SideView:
        return self.alice if party is Party.ALICE else self.bob

    def other(self, party: Party) -> SideView:
        return self.bob if party is Party.ALICE else self.alice


class Mail(msgspec.Struct, frozen=True):
    subject: str
    body: str


def one_line(text: str, limit: int = 100) -> str:
    """Deal names are chosen by users: no line breaks or control characters may reach a header."""
    cleaned = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return cleaned[:limit] or "OTC deal"


def party_link(base_url: str, deal_id: str, party: Party, token: str) -> str:
    return f"{base_url.rstrip('/')}/d/{deal_id}/{'a' if party is Party.ALICE else 'b'}/{token}"


def _footer(deal: DealView) -> str:
    return f"\n\nDeal ID: {deal.deal_id}\nThis is an automatic message from the OTC broker; replies are not read.\n"


def _trade(deal: DealView, party: Party) -> str:
    return f"You send:    {deal.side(party).money()}\nYou receive: {deal.other(party).money()}"


def invite(deal: DealView, party: Party, link: str) -> Mail:
    name = one_line(deal.name)
    body = (
        f"Hello,\n\nyou are invited to an OTC trade: {name}.\n\n{_trade(deal, party)}\n\n"
        "Open your personal link to enter your addresses and see where to deposit:\n"
        f"{link}\n\n"
        "Keep this link private: anyone who has it can act for you in this deal.\n"
        "If you did not expect this e-mail, ignore it; nothing happens unless you open the link."
    )
    return Mail(f"Your OTC deal link: {name}", body + _footer(deal))


def side_funded(deal: DealView, party: Party, funded: int) -> Mail:
    name = one_line(deal.name)
    own = deal.side(party)
    body = (
        f"Hello,\n\nyour deposits for {name} now add up to the required amount "
        f"({own.money(funded)} seen on chain).\n\n"
        "We now wait for enough confirmations and for the other party's deposit. "
        "The swap then runs by itself; you do not need to do anything."
    )
    return Mail(f"Deposit received: {name}", body + _footer(deal))


def closed(deal: DealView, party: Party, outcome: Outcome) -> Mail:
    name = one_line(deal.name)
    own = deal.side(party)
    payback = own.payback_address or "your payback address"
    if outcome is Outcome.SWAPPED:
        recipient = own.recipient_address or "your recipient address"
        body = (
            f"Hello,\n\nthe swap of {name} is complete.\n\n"
            f"{deal.other(party).money()} went to {recipient}.\n"
            f"Anything you deposited beyond the required amount went back to {payback}."
        )
        return Mail(f"Deal completed: {name}", body + _footer(deal))
    if outcome is Outcome.REFUNDED:
        body = (
            f"Hello,\n\n{name} did not complete and no swap took place.\n\n"
            f"Everything you deposited has been returned to {payback} "
            "(for the chain's own coin, less the network fee)."
        )
        return Mail(f"Deal refunded: {name}", body + _footer(deal))
    body = (
        f"Hello,\n\n{name} was cancelled before it started; no swap took place.\n\n"
        f"If you sent anything to its escrow address, it has been returned to {payback} "
        "(for the chain's own coin, less the network fee)."
    )
    return Mail(f"Deal cancelled: {name}", body + _footer(deal))
