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
- One reading task per connection: trio-websocket's reader task reads only the handshake
  request; once the connection is accepted, :meth:`WinkrWebSocket.read_frames` reads in the
  connection's own task and hands each complete message straight to its handler — no
  memory channel, no hand-off between two tasks per frame, one task and its stack fewer per
  connection (docs/performance.md, issue 10, proposal 4). Client frames not yet read wait in
  the socket while the handler works (back-pressure instead of a read-ahead queue);
  :meth:`WinkrWebSocket._aclose` reads on until the client's close frame.
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

import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio
import wsproto.utilities
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Request, TextMessage
from wsproto.events import Pong as PongEvent

from winkr.metrics import FastHistogram
from winkr.plain_http import ReplayStream

FrameHandler = Callable[[str | bytes], Awaitable[None]]

# RFC 6455 close codes of violations wsproto detects in what the client sent.
_VIOLATIONS = {1007: "invalid_payload", 1009: "message_too_large"}
PROTOCOL_ERROR = 1002


class WinkrWebSocket(WebSocketConnection):
    """A server-side WebSocket that says goodbye before closing on a protocol violation."""

    goodbye: Callable[[str, int], str] | None = None  # (reason, code) -> the connection:closed frame
    protocol_error: tuple[int, str] | None = None  # (code, reason) once a violation closed it
    _request_read = False

    async def _reader_task(self) -> None:
        """trio-websocket's reader, until the handshake request has been read: what follows
        is read by :meth:`read_frames` in the connection's task (the request goes to the
        gateway, which refuses it or accepts it and runs the connection)."""
        try:
            async with self._send_channel:
                while self._reader_running and not self._request_read:
                    for event in self._wsproto.events():
                        if isinstance(event, Request):
                            await self._handle_request_event(event)
                            self._request_read = True
                        elif isinstance(event, CloseConnection):
                            await self._handle_close_connection_event(event)
                    if self._request_read or not self._reader_running:
                        return
                    if not await self._receive():
                        return
        except ConnectionClosed:
            self._reader_running = False

    async def _receive(self) -> bool:
        """Read from the socket into wsproto; False when the connection is gone (the socket
        closed or broke, or the bytes broke the protocol)."""
        try:
            data = await self._stream.receive_some(self._receive_buffer_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort_web_socket()
            return False
        if not data:
            if self._wsproto.state != ConnectionState.CLOSED:
                await self._abort_web_socket()
            return False
        if self._wsproto.state != ConnectionState.CLOSED:
            try:
                self._wsproto.receive_data(data)  # type: ignore[arg-type]  # trio returns bytearray; wsproto takes it
            except wsproto.utilities.RemoteProtocolError as err:
                if err.event_hint:
                    await self._send(err.event_hint)
                await self._close_stream()
                return False
        return True

    async def read_frames(self, handle: FrameHandler) -> None:
        """Read the open connection in this task until it closes: each complete message goes
        to ``handle`` (awaited before anything more is read), pings are answered, pongs
        noted, the client's close frame answered, a violation said goodbye to. Returns once
        the connection is closed (by the client, a violation, a message above
        ``max_message_size`` (1009) or a broken socket); raises only what ``handle`` raises.
        Cancelling it loses nothing not yet handed over (unread bytes stay in the socket,
        parsed frames in wsproto)."""
        proto = self._wsproto
        while self._reader_running:
            for event in proto.events():
                try:
                    if isinstance(event, (TextMessage, BytesMessage)):
                        message = await self._message(event)
                        if message is not None:
                            await handle(message)
                    elif isinstance(event, Ping):
                        # Once our close frame is out wsproto refuses a pong (LocalProtocolError);
                        # a ping sent before the client saw our close goes unanswered.
                        if proto.state is ConnectionState.OPEN:
                            await self._handle_ping_event(event)
                    elif isinstance(event, PongEvent):
                        await self._handle_pong_event(event)
                    elif isinstance(event, CloseConnection):
                        await self._handle_close_connection_event(event)
                except ConnectionClosed:
                    self._reader_running = False
                if not self._reader_running:
                    return
            if not await self._receive():
                return

    async def _message(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        """A complete message, or None while parts are still coming (or it grew past
        ``max_message_size``: closed with ``connection:closed`` and 1009)."""
        self._message_size += len(event.data)
        self._message_parts.append(event.data)  # type: ignore[arg-type]  # bytearray parts join like bytes
        if self._message_size > self._max_message_size:
            self._message_size = 0
            self._message_parts = []
            if self._wsproto.state is ConnectionState.OPEN:
                # A close the server starts: connection:closed first (contract §9), as for 1007.
                await self._violation(1009, _VIOLATIONS[1009])
            else:  # already closing (our close frame is out): nothing more can be said
                await self._close_stream()
            return None
        if not event.message_finished:
            return None
        parts = self._message_parts
        self._message_size = 0
        self._message_parts = []
        if isinstance(event, BytesMessage):
            return b"".join(parts)  # type: ignore[arg-type]
        return "".join(parts)  # type: ignore[arg-type]

    async def _aclose(self, code: int, reason: str | None) -> None:
        """trio-websocket's close, reading on (in the closing task: nobody else reads now)
        until the client answers the close frame; messages that arrive meanwhile are dropped."""
        if self._close_reason:
            return
        try:
            if self._wsproto.state == ConnectionState.OPEN:
                self._close_reason = CloseReason(1000, None)
                await self._send(CloseConnection(code=code, reason=reason))
            elif self._wsproto.state in (ConnectionState.CONNECTING, ConnectionState.REJECTING):
                self._close_handshake.set()
            if not self._close_handshake.is_set():
                await self.read_frames(_drop)
        except ConnectionClosed:
            pass
        finally:
            await self._close_stream()

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
        await self._violation(code, _VIOLATIONS.get(code, "protocol_error"))

    async def _violation(self, code: int, reason: str) -> None:
        """Close on what the client broke: ``connection:closed``, a close frame with ``code``,
        then the TCP stream (the connection reads no more; ``protocol_error`` says why)."""
        self.protocol_error = (code, reason)
        # Closed for the other senders from here: the goodbye and the close frame may wait for
        # the stream behind the outbox writer, whose next batch must not follow the close frame.
        self._close_reason = CloseReason(code, reason)
        try:
            if self.goodbye is not None:
                await self._send(TextMessage(data=self.goodbye(reason, code)))
            await self._send(CloseConnection(code=code, reason=reason))
        except ConnectionClosed:
            pass
        await self._close_web_socket(code, reason)
        self._close_handshake.set()
        await self._close_stream()


async def _drop(message: str | bytes) -> None:
    """What a closing connection does with a client message that arrives after its close frame."""


async def wrap_server_stream(nursery: trio.Nursery, stream: trio.abc.Stream, *,
                             max_message_size: int, receive_buffer_size: int) -> WebSocketRequest:
    """trio-websocket's ``wrap_server_stream`` with :class:`WinkrWebSocket`: the reader task
    (the handshake only) runs in ``nursery``; returns the handshake request once it arrived.
    The connection is then read with :meth:`WinkrWebSocket.read_frames`."""
    connection = WinkrWebSocket(stream, WSConnection(ConnectionType.SERVER), message_queue_size=0,
                                max_message_size=max_message_size, receive_buffer_size=receive_buffer_size)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


def _check_open(ws: WebSocketConnection) -> None:
    """Raise ``ConnectionClosed`` unless frames may still be sent: not once the connection is
    closed, nor once a close frame is out (wsproto would raise ``LocalProtocolError``)."""
    if ws.closed:
        raise ConnectionClosed(ws.closed)
    if ws._wsproto.state is not ConnectionState.OPEN:
        raise ConnectionClosed(CloseReason(1006, None))


async def send_frames(ws: WebSocketConnection, frames: list[str], unsent: bytes = b"") -> None:
    """Send ``unsent`` (the rest of a write :class:`DirectWriter` began) and then text frames in
    order, in one write; raises ``ConnectionClosed`` like ``send_message``. Cancelling it may
    cut a frame in half: close the stream after that."""
    _check_open(ws)
    proto = ws._wsproto
    data = b"".join([unsent, *[proto.send(TextMessage(data=frame)) for frame in frames]])
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws.closed) from None


class DirectWriter:
    """Writes frames to a TCP socket from the task that has them, without waiting, when the
    socket takes them now: no wake-up of the connection's writer task, no stream lock, no
    checkpoint (docs/performance.md, issue 10, phase 3: the writer's three task steps per write
    were the largest cost left per message). The outbox uses it only while its writer is parked
    (``winkr.outbox``); :meth:`ready` adds that no pong or close frame is being written (the
    stream lock) and that the connection is open.

    Made only for a stream that is a ``trio.SocketStream`` (possibly behind
    ``plain_http.ReplayStream``, whose sends go straight through): :func:`direct_writer`
    returns None otherwise (memory streams in tests, anything wrapped differently)."""

    __slots__ = ("_ws", "_socket", "_metrics")

    def __init__(self, ws: WebSocketConnection, socket: trio.socket.SocketType, metrics: WriteMetrics | None) -> None:
        self._ws = ws
        self._socket = socket
        self._metrics = metrics

    def ready(self) -> bool:
        ws = self._ws
        return (not ws.closed and not ws._stream_lock.locked() and ws._wsproto.state is ConnectionState.OPEN
                and self._socket.fileno() >= 0)

    def write(self, frames: list[str]) -> bytes:
        """Encode ``frames`` and write them now (call only when :meth:`ready`); returns what the
        socket did not take (``b""``: everything went). The writer must send the rest before
        anything else; on a failing socket all of it is returned, and the writer's own write
        meets the error and closes the connection the usual way."""
        proto = self._ws._wsproto
        if len(frames) == 1:
            data = proto.send(TextMessage(data=frames[0]))
        else:
            data = b"".join([proto.send(TextMessage(data=frame)) for frame in frames])
        try:
            written = os.write(self._socket.fileno(), data)
        except OSError:  # EAGAIN: the socket's buffer is full; anything else: the writer learns it
            written = 0
        if self._metrics is not None:
            self._metrics.frames_per_write.observe(len(frames))
        return data[written:]


class WriteMetrics(Protocol):
    """The metrics a direct write counts (``winkr.metrics.Metrics`` has them)."""

    @property
    def frames_per_write(self) -> FastHistogram: ...


def direct_writer(ws: WebSocketConnection, metrics: WriteMetrics | None = None) -> DirectWriter | None:
    """A :class:`DirectWriter` for ``ws`` when its stream is a TCP socket, else None."""
    stream = ws._stream
    while isinstance(stream, ReplayStream):
        stream = stream.inner
    if type(stream) is not trio.SocketStream:
        return None
    return DirectWriter(ws, stream.socket, metrics)


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
    _check_open(ws)
    payload = secrets.token_bytes(8)
    pong = Pong()
    ws._pings[payload] = pong  # type: ignore[assignment]  # trio-websocket only calls set() on it
    await ws._send(Ping(payload=payload))
    return pong


async def abort(ws: WebSocketConnection) -> None:
    """Close the TCP stream at once, with no close frame (after a write was cut mid-frame)."""
    await ws._close_stream()
