"""Frames in, frames out: the envelope of contract §3.

``parse_envelope`` turns one WebSocket message into an :class:`Envelope` or raises
:class:`EnvelopeError` carrying whatever could be read (``request_event``, ``ref``) so the
error reply can still echo them. ``encode`` builds a server frame once; broadcasts reuse it.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

import orjson

from winkr.errors import MESSAGE_TOO_LARGE, VALIDATION_ERROR, ProtocolError

MAX_REF_CHARS = 64


class Envelope(NamedTuple):
    """A client frame's envelope (a NamedTuple: one per message, cheaper to build than a
    frozen attrs class)."""

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
        _refuse_unreadable(frame)
        raise  # unreachable: _refuse_unreadable always raises
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


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _first_surrogate(value: Any, path: list[str]) -> str | None:
    """The dotted path (from ``data``) of the first key or string with an unpaired surrogate."""
    if isinstance(value, str):
        return ".".join(path) if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _has_surrogate(key):
                return ".".join([*path, key.encode("utf-8", "replace").decode()])
            if (found := _first_surrogate(item, [*path, key])) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := _first_surrogate(item, [*path, str(index)])) is not None:
                return found
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_unreadable(frame: str) -> None:
    """Raise the ``EnvelopeError`` for a frame orjson refused. JSON may spell an unpaired
    surrogate (``"\ud800"``), which orjson (rightly) refuses to decode: such a frame is read
    again by the standard library so the error can still name the field and echo the ``ref``."""
    try:
        obj = json.loads(frame, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise EnvelopeError(VALIDATION_ERROR, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise EnvelopeError(VALIDATION_ERROR, "frame must be a JSON object")
    event, ref = obj.get("event"), obj.get("ref")
    event = event if isinstance(event, str) and not _has_surrogate(event) else None
    ref = ref if isinstance(ref, str) and len(ref) <= MAX_REF_CHARS and not _has_surrogate(ref) else None
    field = _first_surrogate(obj.get("data"), [])
    if field is None:
        field = "event" if event is None and isinstance(obj.get("event"), str) else "ref" \
            if ref is None and isinstance(obj.get("ref"), str) else None
    if field is None:  # readable, yet not for orjson: integers past 64 bits, say
        raise EnvelopeError(VALIDATION_ERROR, "frame is not valid JSON for this server (integers must fit in "
                            "64 bits)", request_event=event, ref=ref)
    raise EnvelopeError(VALIDATION_ERROR, f"{field or 'data'} contains an unpaired surrogate (\\ud800-\\udfff): "
                        "send valid Unicode text", request_event=event, ref=ref, field=field or "data")


def encode(event: str, data: dict[str, Any], timestamp: str, ref: str | None = None) -> str:
    """One server frame: ``{"event", "data", "timestamp"[, "ref"]}`` as text."""
    if ref is None:
        return orjson.dumps({"event": event, "data": data, "timestamp": timestamp}).decode()
    return orjson.dumps({"event": event, "data": data, "timestamp": timestamp, "ref": ref}).decode()


def with_ref(frame: str, ref: str | None) -> str:
    """``frame`` (from :func:`encode` without a ref) as the reply to ``ref``: the same text
    ``encode`` gives with that ref (``ref`` is the envelope's last key), without encoding
    ``data`` again."""
    if ref is None:
        return frame
    return f'{frame[:-1]},"ref":{orjson.dumps(ref).decode()}}}'


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
