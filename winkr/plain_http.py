"""Plain HTTP on the WebSocket port (issue 13): health checks for load balancers and uptime
checkers, and a short answer that says what to do to anything that is not a WebSocket upgrade.

Why before trio-websocket: its handshake (wsproto) answers a request without
``Upgrade: websocket`` with a bare ``400`` and no body, and ``wrap_server_stream`` then waits
for a handshake that never comes until our handshake timeout. So the server reads the request
head here first, answers plain requests itself (parsed with h11, which wsproto uses too), and
hands upgrade requests to trio-websocket on a stream that replays the bytes already read.

Answers (``Connection: close``, JSON bodies):

- ``GET|HEAD /health`` and ``/healthz``: ``200 {"status": "ok"}`` (the server is accepting).
- ``GET|HEAD /readyz``: ``200 {"status": "ready"}``, or ``503 {"status": "unavailable",
  "reason": ...}`` while the database does not commit or (more than one node) the broker
  cannot reach Redis: the balancer's check for taking a node out of rotation.
- ``GET|HEAD /``: ``200`` naming the WebSocket endpoint and how to authenticate.
- ``/ws`` without an upgrade: ``426 Upgrade Required``; any other path: ``404``; another
  method: ``405``; a malformed or truncated request: ``400``; a head still incomplete after
  16 KiB: ``431``. Their bodies have the handshake refusal's shape,
  ``{"event": "error", "data": {"code", "message"}}``.
"""
from __future__ import annotations

import http
import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import attrs
import h11
import orjson
import trio

from winkr.errors import NOT_FOUND, VALIDATION_ERROR

MAX_HEAD_BYTES = 16 * 1024
READ_BYTES = 4096
HEALTH_PATHS = ("/health", "/healthz")


class ReplayStream(trio.abc.Stream):
    """``stream`` with ``prefix`` (bytes already read from it) delivered again first."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self._stream = stream

    @property
    def inner(self) -> trio.abc.Stream:
        """The wrapped stream (sends go straight to it)."""
        return self._stream

    @property
    def replayed(self) -> bool:
        """Whether the prefix has been read: every read from here goes to the wrapped stream."""
        return not self._prefix

    @property
    def socket(self) -> trio.socket.SocketType:
        """The underlying socket, for trio-websocket's ``local``/``remote`` (TCP streams only)."""
        sock: trio.socket.SocketType = getattr(self._stream, "socket")  # noqa: B009 - absent on memory streams
        return sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            cut = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:cut], self._prefix[cut:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


_UPGRADE = re.compile(rb"^upgrade[ \t]*:[^\r\n]*websocket", re.IGNORECASE | re.MULTILINE)
# What a WebSocket opening needs (RFC 6455 §4.1); checked by pattern, parsed only when one is missing.
_GET = re.compile(rb"^GET ")
_KEY = re.compile(rb"^sec-websocket-key[ \t]*:[ \t]*[A-Za-z0-9+/]{22}==[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_VERSION = re.compile(rb"^sec-websocket-version[ \t]*:[ \t]*13[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_HOST = re.compile(rb"^host[ \t]*:", re.IGNORECASE | re.MULTILINE)
TLS_RECORD = 0x16  # a TLS ClientHello's first byte: the client expected wss:// here


@attrs.frozen
class Opening:
    """The request head a client opened with."""

    is_websocket: bool  # a well-formed Upgrade: websocket request: trio-websocket takes it from here
    request: h11.Request | None  # a plain request, parsed; None: malformed, too large, or a WebSocket
    status: int  # 400 or 431 when the plain request could not be parsed, else 0
    connection: h11.Connection | None = attrs.field(eq=False, repr=False)
    data: bytes = attrs.field(repr=False)  # every byte read so far
    upgrade_problem: tuple[int, str, tuple[tuple[str, str], ...]] | None = None  # a malformed upgrade's answer
    is_tls: bool = False  # a TLS handshake on this plain port: nothing to answer, close at once

    def replay(self, stream: trio.abc.Stream) -> ReplayStream:
        """``stream`` as it was before the head was read (for ``wrap_server_stream``)."""
        return ReplayStream(self.data, stream)


async def read_opening(stream: trio.abc.Stream) -> Opening | None:
    """Read until a whole request head has arrived (or ``MAX_HEAD_BYTES``, or the end of the
    stream); None when the peer closed without sending anything.

    A WebSocket upgrade is recognised by its ``Upgrade`` header alone (a regular expression:
    ~2 µs per handshake, where parsing the head with h11 as well cost ~55 µs) and left for
    wsproto to parse; plain requests are parsed with h11. Cancellation (the handshake timeout)
    propagates."""
    data = bytearray()
    ended = False
    while (end := data.find(b"\r\n\r\n")) < 0 and len(data) <= MAX_HEAD_BYTES:
        chunk = await stream.receive_some(READ_BYTES)
        if not chunk:
            ended = True
            break
        data += chunk
        if data[0] == TLS_RECORD:
            return Opening(False, None, 0, None, bytes(data), is_tls=True)
    if end >= 0 and _UPGRADE.search(data, 0, end):
        problem = _upgrade_problem(bytes(data[:end + 2]))
        return Opening(problem is None, None, 0, None, bytes(data), problem)
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    connection.receive_data(bytes(data))
    if ended:
        connection.receive_data(b"")
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError as exc:
        return Opening(False, None, exc.error_status_hint, connection, bytes(data))
    if isinstance(event, h11.Request):
        return Opening(False, event, 0, connection, bytes(data))
    if event is h11.NEED_DATA:  # no end of head within the limit
        return Opening(False, None, 431, connection, bytes(data))
    return None  # ConnectionClosed: nothing was sent


def _upgrade_problem(head: bytes) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
    """Why an ``Upgrade: websocket`` head is not a WebSocket opening, as (status, message,
    headers); None when it is (wsproto parses it then)."""
    if not _GET.match(head):
        return 405, "a WebSocket upgrade is a GET request", (("allow", "GET"),)
    if not _HOST.search(head):
        return 400, "a WebSocket upgrade needs a Host header", ()
    if not _VERSION.search(head):
        return 426, "only WebSocket version 13 (RFC 6455): send Sec-WebSocket-Version: 13", (
            ("sec-websocket-version", "13"),)
    if not _KEY.search(head):
        return 400, "a WebSocket upgrade needs Sec-WebSocket-Key: base64 of 16 random bytes", ()
    return None


def _error(code: str, message: str) -> dict[str, object]:
    return {"event": "error", "data": {"code": code, "message": message}}


Readiness = Callable[[], Awaitable["str | None"]]
"""Why the server is not ready (a short reason), or None."""
READY_PATH = "/readyz"


def plan_answer(opening: Opening, not_ready: str | None = None) -> tuple[int, list[tuple[str, str]], dict[str, object]]:
    """The status, extra headers and JSON body for a request that is not a WebSocket upgrade
    (``not_ready``: the server's readiness problem, for ``/readyz``)."""
    request = opening.request
    if opening.upgrade_problem is not None:
        status, message, extra = opening.upgrade_problem
        return status, list(extra), _error(VALIDATION_ERROR, message)
    if request is None:  # (a well-formed upgrade never comes here)
        if opening.status == 431:
            return 431, [], _error(VALIDATION_ERROR, f"request head over {MAX_HEAD_BYTES} bytes: send a shorter one")
        return 400, [], _error(VALIDATION_ERROR, "malformed HTTP request")
    path = urlsplit(request.target.decode("latin-1")).path
    if request.method not in (b"GET", b"HEAD"):
        return 405, [("allow", "GET, HEAD")], _error(
            VALIDATION_ERROR, "only GET and HEAD: GET /health for a health check, a WebSocket upgrade on /ws")
    if path in HEALTH_PATHS:
        return 200, [], {"status": "ok"}
    if path == READY_PATH:
        return (200, [], {"status": "ready"}) if not_ready is None else (
            503, [], {"status": "unavailable", "reason": not_ready})
    if path == "/":
        return 200, [], {"service": "winkr", "websocket": "/ws", "health": "/health",
                         "message": "winkr speaks WebSocket at /ws: connect with a WebSocket client and a token "
                                    "(Authorization: Bearer <jwt>, the subprotocol bearer.<jwt>, or ?token=<jwt>)"}
    if path == "/ws":
        return 426, [("upgrade", "websocket")], _error(
            VALIDATION_ERROR, "/ws speaks WebSocket: send a WebSocket upgrade request "
                              "(Connection: Upgrade, Upgrade: websocket) with a token")
    return 404, [], _error(NOT_FOUND, "no such path: the WebSocket endpoint is /ws, the health check /health")


async def answer(stream: trio.abc.Stream, opening: Opening, readiness: Readiness | None = None) -> int:
    """Answer a request that is not a WebSocket upgrade and return its status; the caller
    closes the stream. ``readiness`` is asked only for ``/readyz``."""
    not_ready = None
    if readiness is not None and opening.request is not None and \
            urlsplit(opening.request.target.decode("latin-1")).path == READY_PATH:
        not_ready = await readiness()
    status, headers, body = plan_answer(opening, not_ready)
    payload = orjson.dumps(body) + b"\n"
    head = h11.Response(status_code=status, reason=http.HTTPStatus(status).phrase.encode(), headers=[
        ("content-type", "application/json"), ("content-length", str(len(payload))),
        ("cache-control", "no-store"), ("connection", "close"), *headers])
    is_head = opening.request is not None and opening.request.method == b"HEAD"
    connection = opening.connection or h11.Connection(h11.SERVER)
    out = connection.send(head) or b""
    if not is_head:
        out += connection.send(h11.Data(data=payload)) or b""
    if opening.request is not None:
        out += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
    return status
