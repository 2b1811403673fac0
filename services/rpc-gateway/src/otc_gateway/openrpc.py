"""The OpenRPC document of the API, built from the msgspec types that validate each method's params.

Parameter schemas come from `RPC_PARAMS` through `msgspec.json.schema_components`, so the
document cannot drift from what the gateway actually accepts. Results are described by
hand (the engine returns plain objects), and each method lists the application errors it
can answer with.
"""

from __future__ import annotations

from typing import Any

import msgspec

from otc_common.errors import ErrorCode
from otc_common.messages import RPC_PARAMS

OPENRPC_VERSION = "1.3.2"
API_VERSION = "1.0.0"
REF = "#/components/schemas/{name}"

_ERROR_TEXT = {
    ErrorCode.PARSE_ERROR: "the body is not valid JSON",
    ErrorCode.INVALID_REQUEST: "not a JSON-RPC 2.0 request (or batch or body too large, or wrong content type)",
    ErrorCode.METHOD_NOT_FOUND: "no such method",
    ErrorCode.INVALID_PARAMS: "params do not match the method's schema; the message names the field",
    ErrorCode.INTERNAL_ERROR: "an unexpected failure; nothing was changed",
    ErrorCode.DEAL_NOT_FOUND: "no deal with this id",
    ErrorCode.INVALID_TOKEN: "the token is not valid for this deal (or party)",
    ErrorCode.WRONG_STAGE: "the deal's stage does not allow this",
    ErrorCode.UNKNOWN_CHAIN: "unknown chain id",
    ErrorCode.UNKNOWN_ASSET: "asset not traded on that chain",
    ErrorCode.INVALID_AMOUNT: "amount not accepted; the message says why",
    ErrorCode.INVALID_ADDRESS: "address not valid on that chain",
    ErrorCode.DETAILS_ALREADY_FILLED: "party details are immutable once filled",
    ErrorCode.INVALID_TIMEOUT: "timeout outside the chains' bounds",
    ErrorCode.TEMPORARILY_UNAVAILABLE: "the engine did not answer; retry shortly",
    ErrorCode.RATE_LIMITED: "too many calls; data.retryAfterSeconds says when to retry",
}
_EMAIL_OFF = ErrorCode.__members__.get("EMAIL_NOT_CONFIGURED")

_COMMON_ERRORS = (ErrorCode.INVALID_PARAMS, ErrorCode.RATE_LIMITED)
_ENGINE_ERRORS = (*_COMMON_ERRORS, ErrorCode.TEMPORARILY_UNAVAILABLE)

_AMOUNT = {"type": "string", "description": "decimal string in the asset's units, e.g. 1.5"}
_OBJECT = {"type": "object"}

_METHODS: dict[str, dict[str, Any]] = {
    "otc.createDeal": {
        "summary": "Create a deal; returns its id and both parties' secret tokens and personal links.",
        "result": {
            "type": "object",
            "properties": {
                "dealId": {"type": "string"},
                "name": {"type": "string"},
                "aliceToken": {"type": "string"},
                "bobToken": {"type": "string"},
                "linkA": {"type": "string", "format": "uri"},
                "linkB": {"type": "string", "format": "uri"},
            },
            "required": ["dealId", "name", "aliceToken", "bobToken", "linkA", "linkB"],
        },
        "errors": (
            *_ENGINE_ERRORS,
            ErrorCode.UNKNOWN_CHAIN,
            ErrorCode.UNKNOWN_ASSET,
            ErrorCode.INVALID_AMOUNT,
            ErrorCode.INVALID_TIMEOUT,
        ),
    },
    "otc.fillPartyDetails": {
        "summary": "Set a party's payback and recipient addresses, once (immutable afterwards).",
        "result": {"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"]},
        "errors": (
            *_ENGINE_ERRORS,
            ErrorCode.DEAL_NOT_FOUND,
            ErrorCode.INVALID_TOKEN,
            ErrorCode.WRONG_STAGE,
            ErrorCode.INVALID_ADDRESS,
            ErrorCode.DETAILS_ALREADY_FILLED,
        ),
    },
    "otc.status": {
        "summary": "A deal's stage, deadline, deposit instructions, collection progress, transfers and events.",
        "result": {
            "type": "object",
            "properties": {
                "dealId": {"type": "string"},
                "name": {"type": "string"},
                "stage": {"enum": ["CREATED", "COLLECTION", "WAITING", "SWAP", "REVERTED", "CLOSED"]},
                "outcome": {"enum": ["SWAPPED", "REFUNDED", "CANCELLED", None]},
                "timeoutSeconds": {"type": "integer"},
                "expiresAt": {"type": ["string", "null"], "format": "date-time"},
                "remainingSeconds": {"type": ["integer", "null"]},
                "alice": _OBJECT,
                "bob": _OBJECT,
                "instructions": {
                    "type": "object",
                    "description": "per party, once it filled its details: chainId, asset, to, amount, breakdown",
                },
                "collection": {
                    "type": "object",
                    "description": "per party: deposited, confirmed, locked, deposits",
                },
                "transfers": {"type": "array", "items": _OBJECT},
                "events": {"type": "array", "items": _OBJECT},
            },
        },
        "errors": (*_ENGINE_ERRORS, ErrorCode.DEAL_NOT_FOUND, ErrorCode.INVALID_TOKEN),
    },
    "otc.cancelDeal": {
        "summary": "Cancel a deal while it is CREATED (anything already received is refunded).",
        "result": {"type": "object", "properties": {"ok": {"const": True}, "stage": {"type": "string"}}},
        "errors": (*_ENGINE_ERRORS, ErrorCode.DEAL_NOT_FOUND, ErrorCode.INVALID_TOKEN, ErrorCode.WRONG_STAGE),
    },
    "otc.sendInvite": {
        "summary": "E-mail a party its personal link; the token is that party's own.",
        "result": _OBJECT,
        "errors": (
            *_ENGINE_ERRORS,
            ErrorCode.DEAL_NOT_FOUND,
            ErrorCode.INVALID_TOKEN,
            ErrorCode.WRONG_STAGE,
            *((_EMAIL_OFF,) if _EMAIL_OFF is not None else ()),
        ),
    },
    "otc.getChainConfig": {
        "summary": "The chains this broker trades on: kind, confirmations, timeouts, explorer URL template.",
        "result": {"type": "object", "properties": {"chains": {"type": "array", "items": _OBJECT}}},
        "errors": (*_COMMON_ERRORS, ErrorCode.UNKNOWN_CHAIN),
    },
    "otc.listAssets": {
        "summary": "The assets traded per chain: decimals, commission, fixed fee, fee reserve, maximum amount.",
        "result": {
            "type": "object",
            "properties": {
                "assets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "chainId": {"type": "string"},
                            "symbol": {"type": "string"},
                            "decimals": {"type": "integer"},
                            "native": {"type": "boolean"},
                            "contract": {"type": ["string", "null"]},
                            "commissionBps": {"type": "integer"},
                            "fixedFee": _AMOUNT,
                            "networkFeeReserve": _AMOUNT,
                            "maxAmount": _AMOUNT,
                        },
                    },
                }
            },
        },
        "errors": (*_COMMON_ERRORS, ErrorCode.UNKNOWN_CHAIN),
    },
}

DISCOVER = "rpc.discover"


def _error(code: ErrorCode) -> dict[str, Any]:
    return {"code": int(code), "message": _ERROR_TEXT.get(code, code.name.lower().replace("_", " "))}


def _params(schema: dict[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", ()))
    return [
        {"name": name, "required": name in required, "schema": field}
        for name, field in schema.get("properties", {}).items()
    ]


def build_document(public_base_url: str) -> dict[str, Any]:
    names = sorted(RPC_PARAMS)
    types = list(dict.fromkeys(RPC_PARAMS[name] for name in names))
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    ref_of = {cls: ref for cls, ref in zip(types, refs, strict=True)}
    methods = []
    for name in names:
        cls = RPC_PARAMS[name]
        schema = components[ref_of[cls]["$ref"].rsplit("/", 1)[1]]
        spec = _METHODS.get(name, {"summary": name, "result": _OBJECT, "errors": _ENGINE_ERRORS})
        methods.append(
            {
                "name": name,
                "summary": spec["summary"],
                "paramStructure": "by-name",
                "params": _params(schema),
                "result": {"name": "result", "schema": spec["result"]},
                "errors": [_error(code) for code in dict.fromkeys(spec["errors"])],
            }
        )
    methods.append(
        {
            "name": DISCOVER,
            "summary": "This document.",
            "paramStructure": "by-name",
            "params": [],
            "result": {"name": "OpenRPC document", "schema": {"type": "object"}},
        }
    )
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "otc-broker",
            "version": API_VERSION,
            "description": (
                "Cross-chain OTC escrow broker. Amounts are decimal strings in the asset's units. "
                "Every application error carries a code of 1000 or more and a message meant for a trader."
            ),
        },
        "servers": [{"name": "gateway", "url": f"{public_base_url.rstrip('/')}/rpc"}],
        "methods": methods,
        "components": {
            "schemas": components,
            "errors": {code.name: _error(code) for code in ErrorCode},
        },
    }
