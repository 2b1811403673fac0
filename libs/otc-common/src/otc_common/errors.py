"""Application error codes of the JSON-RPC API (≥ 1000), each with a message a trader understands."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    # JSON-RPC 2.0's own codes.
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    # Application codes.
    DEAL_NOT_FOUND = 1001
    INVALID_TOKEN = 1002
    WRONG_STAGE = 1003
    UNKNOWN_CHAIN = 1004
    UNKNOWN_ASSET = 1005
    INVALID_AMOUNT = 1006
    INVALID_ADDRESS = 1007
    DETAILS_ALREADY_FILLED = 1008
    INVALID_TIMEOUT = 1009
    TEMPORARILY_UNAVAILABLE = 1010
    RATE_LIMITED = 1011
    EMAIL_NOT_CONFIGURED = 1012


class AppError(Exception):
    """An error the caller caused or should know about; never carries secrets."""

    def __init__(self, code: ErrorCode, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
