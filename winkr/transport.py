"""What winkr needs from trio-websocket beyond its public API, in one place.

- Several frames in one write: ``WebSocketConnection.send_message`` costs one ``send``
  syscall per frame; the outbox writer encodes every waiting frame with the connection's
  wsproto state and writes them in one ``send_all`` under the connection's stream lock —
  exactly what ``send_message`` does per frame.
- A ping without a task waiting for its pong.
- Less held per open connection (thousands of them sit idle): once the handshake is done, the
  connection talks to wsproto's ``Connection`` directly and the handshake state (its h11
  connection, buffers and event queue, ~1.5 KB) is let go; a ping's pong is a flag, not a
  ``trio.Event``.
- A clean close on a protocol violation: trio-websocket drops the TCP connection without a
  close frame when the client breaks RFC 6455 (invalid UTF-8 in a text frame, a bad opcode,
  an unmasked frame). :class:`WinkrWebSocket` sends ``connection:closed`` and a close frame
  with 1007 (invalid payload) or 1002 (protocol error) first.

This reaches into trio-websocket's internals (``_wsproto``, ``_stream``, ``_stream_lock``,
``_send``, ``_pings``, ``_accept``, ``_close_web_socket``, ``_close_stream``) and wsproto's
``WSConnection.connection``, which is why setup.cfg pins trio-websocket below 0.13;
``tests/test_connection.py`` and ``tests/test_transport.py`` exercise every piece.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping, Request, TextMessage

# RFC 6455 close codes of violations wsproto detects in what the client sent.
_VIOLATIONS = {1007: "invalid_payload", 1009: "message_too_large"}
PROTOCOL_ERROR = 1002


class WinkrWebSocket(WebSocketConnection):
    """A server-side WebSocket that says goodbye before closing on a protocol violation."""

    goodbye: Callable[[str, int], str] | None = None  # (reason, code) -> the connection:closed frame
    protocol_error: tuple[int, str] | None = None  # (code, reason) once a violation closed it

    async def _accept(self, request: Request, subprotocol: str | None,
                      extra_headers: list[tuple[bytes, bytes]]) -> None:
        await super()._accept(request, subprotocol, extra_headers)
        # Open: from here wsproto's WSConnection only forwards to its Connection, which has the
        # same interface (send, receive_data, events, state, client). Talking to it directly
        # lets the handshake (h11 state, buffers, an event queue: ~1.5 KB) go, and saves a
        # layer of calls and generators on every frame in and out.
        if isinstance(self._wsproto, WSConnection) and self._wsproto.connection is not None:
            self._wsproto = self._wsproto.connection  # type: ignore[assignment]

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        # wsproto reports a frame it could not parse as a CloseConnection while the connection
        # is still OPEN; a close frame from the client arrives in REMOTE_CLOSING instead.
        if self._wsproto.state is not ConnectionState.OPEN:
            await super()._handle_close_connection_event(event)
            return
        code = event.code if event.code in _VIOLATIONS else PROTOCOL_ERROR
        reason = _VIOLATIONS.get(code, "protocol_error")
        self.protocol_error = (code, reason)
        try:
            if self.goodbye is not None:
                await self._send(TextMessage(data=self.goodbye(reason, code)))
            await self._send(CloseConnection(code=code, reason=reason))
        except ConnectionClosed:
            pass
        await self._close_web_socket(code, reason)
        self._close_handshake.set()
        await self._close_stream()


async def wrap_server_stream(nursery: trio.Nursery, stream: trio.abc.Stream, *, message_queue_size: int,
                             max_message_size: int, receive_buffer_size: int) -> WebSocketRequest:
    """trio-websocket's ``wrap_server_stream`` with :class:`WinkrWebSocket`: the reader task
    runs in ``nursery``; returns the handshake request once it arrived."""
    connection = WinkrWebSocket(stream, WSConnection(ConnectionType.SERVER), message_queue_size=message_queue_size,
                                max_message_size=max_message_size, receive_buffer_size=receive_buffer_size)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


async def send_frames(ws: WebSocketConnection, frames: list[str]) -> None:
    """Send text frames in order, in one write; raises ``ConnectionClosed`` like
    ``send_message``. Cancelling it may cut a frame in half: close the stream after that."""
    if ws.closed:
        raise ConnectionClosed(ws.closed)
    proto = ws._wsproto
    data = b"".join([proto.send(TextMessage(data=frame)) for frame in frames])
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws.closed) from None


class Pong:
    """Whether a ping's pong (or a later one) has arrived; trio-websocket calls ``set`` on it.
    Nobody waits on it (the outbox writer looks at it when its timer fires), so it is a flag,
    not a ``trio.Event`` (an object and a set per ping)."""

    __slots__ = ("arrived",)

    def __init__(self) -> None:
        self.arrived = False

    def set(self) -> None:
        self.arrived = True

    def is_set(self) -> bool:
        return self.arrived


async def send_ping(ws: WebSocketConnection) -> Pong:
    """Send a ping without waiting for its pong: the returned flag is set when the pong (or
    a later one) arrives. ``ws.ping()`` would need a task per connection to wait in; the
    outbox writer checks the flag at its next wake-up instead."""
    if ws.closed:
        raise ConnectionClosed(ws.closed)
    payload = secrets.token_bytes(8)
    pong = Pong()
    ws._pings[payload] = pong  # type: ignore[assignment]  # trio-websocket only calls set() on it
    await ws._send(Ping(payload=payload))
    return pong


async def abort(ws: WebSocketConnection) -> None:
    """Close the TCP stream at once, with no close frame (after a write was cut mid-frame)."""
    await ws._close_stream()
