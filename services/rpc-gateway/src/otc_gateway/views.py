"""What a party's page shows, decided from the engine's `otc.status` answer: no I/O here.

The page and its live updates render the same view, so whatever the page says after an
update is exactly what it would say after a reload.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from otc_common.messages import Outcome, Party, Stage
from otc_common.registry import Registry

#: Deal ids and tokens as the engine makes them (hex, url-safe base64): anything else is not a link of ours.
DEAL_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}", re.ASCII)

SIDES = {"a": Party.ALICE, "b": Party.BOB}

#: Stages in which the engine's view changes with every block (deposits, confirmations, payouts).
BLOCK_DRIVEN = frozenset({Stage.CREATED, Stage.COLLECTION, Stage.WAITING, Stage.SWAP, Stage.REVERTED})

_PURPOSE = {
    "SWAP_PAYOUT": "trade payout",
    "COMMISSION": "broker commission",
    "SURPLUS": "surplus returned",
    "REFUND": "refund",
    "GAS_RETURN": "unused gas returned",
    "LATE_RETURN": "late deposit returned",
}

_TRANSFER_STATUS = {
    "PLANNED": "waiting to be sent",
    "COMMANDED": "being sent",
    "SUBMITTED": "sent, waiting for confirmations",
    "CONFIRMED": "confirmed",
    "SKIPPED": "not sent (too small to pay its network fee)",
    "FAILED": "failed; the operator has been alerted",
}


def other(party: Party) -> Party:
    return Party.BOB if party is Party.ALICE else Party.ALICE


def valid_link(deal_id: str, token: str) -> bool:
    return DEAL_ID_RE.fullmatch(deal_id) is not None and TOKEN_RE.fullmatch(token) is not None


def explorer_link(registry: Registry, chain_id: str, txid: str | None) -> str | None:
    """The explorer page of a transaction, or None where the chain has no explorer (dev chains)."""
    chain = registry.chains.get(chain_id)
    if chain is None or not chain.explorer_tx_url or not txid or txid.startswith("internal:"):
        return None
    return chain.explorer_tx_url.replace("{txid}", txid)


def countdown(status: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The deadline as the page shows it: not started (CREATED), running (COLLECTION), paused (WAITING)."""
    stage = Stage(status["stage"])
    if stage is Stage.CREATED:
        return {"state": "not_started", "seconds": int(status["timeoutSeconds"])}
    if stage is Stage.COLLECTION and status.get("expiresAt"):
        remaining = (datetime.fromisoformat(status["expiresAt"]) - now).total_seconds()
        return {"state": "running", "seconds": max(0, int(remaining))}
    if stage is Stage.WAITING and status.get("remainingSeconds") is not None:
        return {"state": "paused", "seconds": max(0, int(status["remainingSeconds"]))}
    return {"state": "none", "seconds": 0}


def format_duration(seconds: int) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def outcome_banner(status: dict[str, Any]) -> dict[str, str] | None:
    if status["stage"] != Stage.CLOSED.value or status.get("outcome") is None:
        return None
    outcome = Outcome(status["outcome"])
    if outcome is Outcome.SWAPPED:
        return {
            "kind": "swapped",
            "title": "SWAPPED — the trade is complete",
            "text": "Both payouts are confirmed on chain. Any surplus was returned to the payback addresses.",
        }
    if outcome is Outcome.REFUNDED:
        return {
            "kind": "refunded",
            "title": "REFUNDED — the trade did not happen",
            "text": "Every deposit received was sent back to its payback address. No swap took place.",
        }
    return {
        "kind": "cancelled",
        "title": "CANCELLED — the trade did not happen",
        "text": "The deal was cancelled before it started. Anything already received was refunded.",
    }


def stage_text(status: dict[str, Any], me: Party) -> tuple[str, str]:
    """(headline, explanation) of the stage, in plain words, from this party's point of view."""
    stage = Stage(status["stage"])
    mine = status[me.value.lower()]
    theirs = status[other(me).value.lower()]
    receive = f"{theirs['amount']} {theirs['asset']} on {theirs['chainId']}"
    if stage is Stage.CREATED:
        if not mine["filled"]:
            return (
                "Enter your addresses",
                "Enter where refunds and your payout should go. The deposit address appears once you confirm. "
                "The clock starts when both parties have entered their addresses.",
            )
        if not theirs["filled"]:
            return (
                "Waiting for the other party",
                "Your addresses are saved. The clock starts when the other party has entered theirs; "
                "you may already send your deposit.",
            )
        return ("Starting", "Both parties have entered their addresses.")
    if stage is Stage.COLLECTION:
        return (
            "Send your deposit",
            "Send the exact amount below to the deposit address before the time runs out. Once both deposits are "
            "in blocks the clock pauses; once they are confirmed the swap starts. If time runs out first, "
            "everything received is refunded.",
        )
    if stage is Stage.WAITING:
        return (
            "Both deposits seen — waiting for confirmations",
            "Both deposits are in blocks. The clock is paused while they gather the confirmations each chain "
            "requires. If a chain reorganisation removes a deposit, the clock resumes.",
        )
    if stage is Stage.SWAP:
        return (
            "Swapping",
            f"Both deposits are confirmed and locked. The broker is paying out: you receive {receive}. "
            "Nothing more to do.",
        )
    if stage is Stage.REVERTED:
        return (
            "Refunding",
            "The deal did not go ahead. Every deposit received is being sent back to its payback address.",
        )
    return (
        "Closed",
        "This deal is finished. Send nothing more to its deposit address: a late deposit is returned to its "
        "payback address for some days after closing, but not forever.",
    )


def side_progress(status: dict[str, Any], party: Party, registry: Registry) -> dict[str, Any]:
    key = party.value.lower()
    side = status[key]
    chain = registry.chains.get(side["chainId"])
    needed = chain.confirmations if chain else None
    collection = status["collection"][key]
    instructions = status["instructions"][key]
    return {
        "party": party.value,
        "label": "Alice" if party is Party.ALICE else "Bob",
        "chainId": side["chainId"],
        "asset": side["asset"],
        "amount": side["amount"],
        "filled": side["filled"],
        "required": instructions["amount"] if instructions else None,
        "deposited": collection["deposited"],
        "confirmed": collection["confirmed"],
        "locked": collection["locked"],
        "confirmationsNeeded": needed,
        "deposits": [
            {
                **deposit,
                "explorer": explorer_link(registry, side["chainId"], deposit["txid"]),
                "done": needed is not None and deposit["confirmations"] >= needed,
            }
            for deposit in collection["deposits"]
        ],
    }


def _name(party: Any) -> str:
    return {"ALICE": "Alice", "BOB": "Bob"}.get(str(party), str(party))


def describe_event(event: dict[str, Any]) -> str:
    """One line of the deal's history, in words."""
    raw = event.get("detail")
    detail: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind = event.get("type", "")
    if kind == "deal.created":
        return "Deal created"
    if kind == "deal.party_filled":
        return f"{_name(detail.get('party'))} entered their addresses"
    if kind == "deal.side_funded":
        return f"{_name(detail.get('party'))}'s deposit is complete"
    if kind == "deal.stage_changed":
        text = f"Stage {detail.get('from', '?')} → {detail.get('to', '?')}"
        if detail.get("outcome"):
            text += f" ({detail['outcome']})"
        if detail.get("reason"):
            text += f": {detail['reason']}"
        return text
    return str(kind)


def party_view(status: dict[str, Any], me: Party, registry: Registry, now: datetime) -> dict[str, Any]:
    """Everything the party page template needs."""
    stage = Stage(status["stage"])
    mine = status[me.value.lower()]
    theirs = status[other(me).value.lower()]
    headline, explanation = stage_text(status, me)
    chain = registry.chains.get(mine["chainId"])
    transfers = [
        {
            **transfer,
            "purposeText": _PURPOSE.get(transfer["purpose"], transfer["purpose"].lower()),
            "statusText": _TRANSFER_STATUS.get(transfer["status"], transfer["status"].lower()),
            "explorer": explorer_link(registry, transfer["chainId"], transfer.get("txid")),
            "confirmationsNeeded": registry.chains[transfer["chainId"]].confirmations
            if transfer["chainId"] in registry.chains
            else None,
        }
        for transfer in status["transfers"]
    ]
    clock = countdown(status, now)
    return {
        "dealId": status["dealId"],
        "name": status["name"],
        "stage": stage.value,
        "outcome": status.get("outcome"),
        "me": me.value,
        "meLabel": "Alice" if me is Party.ALICE else "Bob",
        "otherLabel": "Bob" if me is Party.ALICE else "Alice",
        "send": {"chainId": mine["chainId"], "asset": mine["asset"], "amount": mine["amount"]},
        "receive": {"chainId": theirs["chainId"], "asset": theirs["asset"], "amount": theirs["amount"]},
        "filled": mine["filled"],
        "paybackAddress": mine.get("paybackAddress"),
        "recipientAddress": mine.get("recipientAddress"),
        "otherFilled": theirs["filled"],
        "instructions": status["instructions"][me.value.lower()],
        "showDeposit": status["instructions"][me.value.lower()] is not None
        and stage in (Stage.CREATED, Stage.COLLECTION, Stage.WAITING),
        "confirmationsNeeded": chain.confirmations if chain else None,
        "headline": headline,
        "explanation": explanation,
        "countdown": {**clock, "text": format_duration(clock["seconds"])},
        "banner": outcome_banner(status),
        "progress": [side_progress(status, party, registry) for party in (me, other(me))],
        "transfers": transfers,
        "canCancel": stage is Stage.CREATED,
        "showForm": stage is Stage.CREATED and not mine["filled"],
        "events": [{"at": e["at"], "text": describe_event(e)} for e in reversed(status["events"])][:20],
    }
