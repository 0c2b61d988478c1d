"""Frames in, frames out: the envelope of contract §3.

``parse_envelope`` turns one WebSocket message into an :class:`Envelope` or raises
:class:`EnvelopeError` carrying whatever could be read (``request_event``, ``ref``) so the
error reply can still echo them. ``encode`` builds a server frame once; broadcasts reuse it.
"""
from __future__ import annotations

from typing import Any

import attrs
import orjson

from winkr.errors import MESSAGE_TOO_LARGE, VALIDATION_ERROR, ProtocolError

MAX_REF_CHARS = 64


@attrs.frozen
class Envelope:
    event: str
    data: dict[str, Any]
    ref: str | None


class EnvelopeError(ProtocolError):
    """A frame that could not be read as a request; knows what it could read of it."""

    def __init__(self, code: str, message: str, *, request_event: str | None = None,
                 ref: str | None = None, field: str | None = None) -> None:
        super().__init__(code, message, field=field)
        self.request_event = request_event
        self.ref = ref


def frame_too_large(frame: str | bytes, max_bytes: int) -> bool:
    """Whether a reassembled message exceeds the frame limit (in bytes on the wire)."""
    if not max_bytes:
        return False
    if isinstance(frame, bytes):
        return len(frame) > max_bytes
    # A code point is at most 4 UTF-8 bytes: skip the encode for the common small frame.
    return len(frame) * 4 > max_bytes and len(frame.encode("utf-8", "surrogatepass")) > max_bytes


def parse_envelope(frame: str | bytes, max_bytes: int = 0) -> Envelope:
    """Decode and check the envelope; ``data`` may be absent (treated as ``{}``)."""
    if frame_too_large(frame, max_bytes):
        raise EnvelopeError(MESSAGE_TOO_LARGE, f"frame exceeds {max_bytes} bytes")
    if isinstance(frame, bytes):
        raise EnvelopeError(VALIDATION_ERROR, "binary frames are not supported; send JSON text")
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise EnvelopeError(VALIDATION_ERROR, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise EnvelopeError(VALIDATION_ERROR, "frame must be a JSON object")
    event = obj.get("event")
    ref = obj.get("ref")
    if ref is not None and (not isinstance(ref, str) or len(ref) > MAX_REF_CHARS):
        raise EnvelopeError(VALIDATION_ERROR, f"ref must be a string of at most {MAX_REF_CHARS} characters",
                            request_event=event if isinstance(event, str) else None, field="ref")
    if not isinstance(event, str) or not event:
        raise EnvelopeError(VALIDATION_ERROR, "frame has no event name", ref=ref, field="event")
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EnvelopeError(VALIDATION_ERROR, "data must be a JSON object", request_event=event,
                            ref=ref, field="data")
    return Envelope(event, data, ref)


def encode(event: str, data: dict[str, Any], timestamp: str, ref: str | None = None) -> str:
    """One server frame: ``{"event", "data", "timestamp"[, "ref"]}`` as text."""
    if ref is None:
        return orjson.dumps({"event": event, "data": data, "timestamp": timestamp}).decode()
    return orjson.dumps({"event": event, "data": data, "timestamp": timestamp, "ref": ref}).decode()


def error_data(exc: ProtocolError, request_event: str | None) -> dict[str, Any]:
    """The ``data`` of an ``error`` event."""
    return {"code": exc.code, "message": exc.message, "details": exc.details,
            "request_event": request_event}


def refusal_body(exc: ProtocolError) -> bytes:
    """The JSON body of a refused handshake (contract §2): ``{"event": "error", "data":
    {code, message[, details]}}`` — no ``ref``, ``request_event`` or ``timestamp``."""
    data: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.details:
        data["details"] = exc.details
    return orjson.dumps({"event": "error", "data": data})
