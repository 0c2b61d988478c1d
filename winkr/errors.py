"""The one error type that crosses the protocol boundary.

Everything a client did wrong becomes a :class:`ProtocolError`; the connection turns it into
an ``error`` event (with ``request_event`` and ``ref``) and keeps serving.
"""
from __future__ import annotations

import math
from typing import Any

VALIDATION_ERROR = "VALIDATION_ERROR"
UNAUTHORIZED = "UNAUTHORIZED"
FORBIDDEN = "FORBIDDEN"
NOT_FOUND = "NOT_FOUND"
RATE_LIMITED = "RATE_LIMITED"
INTERNAL_ERROR = "INTERNAL_ERROR"
CONNECTION_ERROR = "CONNECTION_ERROR"
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
INVALID_MESSAGE_TYPE = "INVALID_MESSAGE_TYPE"
CONVERSATION_FULL = "CONVERSATION_FULL"


class ProtocolError(Exception):
    """A request the server refuses: carries the protocol error code and details.

    ``field`` is a dotted path from ``data`` (``"metadata.url"``); it lands in
    ``details.field``. Extra ``details`` (``retry_after``, ``limit``) are merged in.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details)
        if field is not None:
            self.details["field"] = field

    @property
    def field(self) -> str | None:
        return self.details.get("field")

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, details={self.details!r})"


def retry_after_seconds(seconds: float) -> float:
    """``details.retry_after``: a positive number of seconds, to the millisecond (contract §11.17)."""
    return max(0.001, round(seconds, 3))


def retry_after_header(seconds: float) -> str:
    """An HTTP ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
