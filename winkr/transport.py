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

import errno
import os
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
import wsproto.utilities
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Request, TextMessage
from wsproto.events import Pong as PongEvent

from winkr.metrics import FastHistogram
from winkr.plain_http import ReplayStream

FrameHandler = Callable[[str | bytes], Awaitable[None]]

# RFC 6455 close codes of violations wsproto detects in what the client sent.
_VIOLATIONS = {1007: "invalid_payload", 1009: "message_too_large"}
PROTOCOL_ERROR = 1002
DEFAULT_RECEIVE_BYTES = 65536  # trio.SocketStream's read size when none is given


class WinkrWebSocket(WebSocketConnection):
    """A server-side WebSocket that says goodbye before closing on a protocol violation."""

    goodbye: Callable[[str, int], str] | None = None  # (reason, code) -> the connection:closed frame
    protocol_error: tuple[int, str] | None = None  # (code, reason) once a violation closed it
    _request_read = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes read while wsproto was between messages, for simple_text_frame. Set here, in
        # every instance in the same order, so that instances keep sharing their dict's keys
        # (an attribute first set later unshares them: memory per idle connection).
        self._unparsed = b""
        self._unparsed_at = 0
        # The rest of a frame a DirectWriter began and the socket did not take. It belongs to
        # the stream, not to the outbox: whoever writes next under the stream lock (the
        # writer's batch, the reader's pong or close frame, the heartbeat's ping) sends it
        # first, so nothing lands in the middle of that frame.
        self.unsent: bytes = b""
        # The TCP socket read directly once nothing is left to replay (see _receive).
        self._read_socket: trio.socket.SocketType | None = None
        # Whether wsproto was given bytes since its events were last read (else it has none).
        self._fed = True
        # Whether _between_messages found wsproto between messages and nothing was given to it
        # since: then it still is while the connection is open (only bytes fed change that).
        self._between = False

    def take_unsent(self) -> bytes:
        """The waiting rest of a direct write (``b""``: none), to be sent before anything else;
        call with the stream lock held."""
        unsent, self.unsent = self.unsent, b""
        return unsent

    async def _send(self, event: Event) -> None:
        """trio-websocket's ``_send`` (every write but the outbox writer's batches: pongs, pings,
        close frames, a violation's goodbye), sending a direct write's rest first."""
        await _write(self, self._wsproto.send(event))

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
        """Read from the socket into wsproto — or, while wsproto is between messages and the
        connection open, into ``_unparsed`` for :func:`simple_text_frame`; False when the
        connection is gone (the socket closed or broke, or the bytes broke the protocol)."""
        try:
            data: bytes | bytearray
            sock = self._read_socket
            if sock is None:
                sock = self._read_socket = socket_to_read(self._stream)
            if sock is not None:
                data = await receive_from_socket(sock, self._receive_buffer_size or DEFAULT_RECEIVE_BYTES)
            else:
                data = await self._stream.receive_some(self._receive_buffer_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort_web_socket()
            return False
        if not data:
            if self._wsproto.state != ConnectionState.CLOSED:
                await self._abort_web_socket()
            return False
        if self._between_messages():
            self._unparsed, self._unparsed_at = bytes(data), 0
            return True
        return await self._feed(data)

    async def _feed(self, data: bytes | bytearray) -> bool:
        """Hand bytes to wsproto; False when they broke the protocol (the stream is closed)."""
        if self._wsproto.state != ConnectionState.CLOSED:
            self._fed = True
            self._between = False
            try:
                self._wsproto.receive_data(data)  # type: ignore[arg-type]  # trio returns bytearray; wsproto takes it
            except wsproto.utilities.RemoteProtocolError as err:
                if err.event_hint:
                    await self._send(err.event_hint)
                await self._close_stream()
                return False
        return True

    def _between_messages(self) -> bool:
        """Whether wsproto holds nothing of an incoming frame or message (so the next bytes
        start a frame it has not seen) on an open connection without extensions."""
        if self._between:  # nothing fed since it was (the quiet path: one message per read)
            if self._wsproto.state is ConnectionState.OPEN:
                return True
            self._between = False
        proto = getattr(self._wsproto, "_proto", None)
        if proto is None or self._wsproto.state is not ConnectionState.OPEN or proto.extensions:
            return False
        frames = proto._frame_decoder
        self._between = (frames.header is None and not len(frames.buffer) and proto._message_decoder.opcode is None
                         and not self._message_parts)
        return self._between

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
            while self._unparsed:
                # Complete single-frame text messages straight from the bytes read (issue 10,
                # phase 3: wsproto's parse of one costs ~18 µs, this ~3); the first frame of
                # any other kind, and everything after it, goes to wsproto.
                found = simple_text_frame(self._unparsed, self._unparsed_at, self._max_message_size)
                if found is None:
                    rest = self._unparsed[self._unparsed_at:]
                    self._unparsed, self._unparsed_at = b"", 0
                    if not await self._feed(rest):
                        return
                    break
                text, self._unparsed_at = found
                if self._unparsed_at == len(self._unparsed):
                    self._unparsed, self._unparsed_at = b"", 0
                try:
                    await handle(text)
                except ConnectionClosed:
                    self._reader_running = False
                if not self._reader_running:
                    return
            if not self._fed:  # only whole frames read directly since wsproto's events were read
                if not await self._receive():
                    return
                continue
            self._fed = False
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


async def send_frames(ws: WebSocketConnection, frames: list[str]) -> None:
    """Send text frames in order, in one write, after the rest of a write a
    :class:`DirectWriter` began (if one waits); raises ``ConnectionClosed`` like
    ``send_message``. Cancelling it may cut a frame in half: close the stream after that."""
    _check_open(ws)
    await _write(ws, _encode(ws._wsproto, frames))


async def _write(ws: WebSocketConnection, data: bytes) -> None:
    """Write ``data`` under the stream lock, after the rest of a direct write if one waits;
    ``ConnectionClosed`` (the connection aborted) when the stream is broken or closed."""
    async with ws._stream_lock:
        if isinstance(ws, WinkrWebSocket) and ws.unsent:
            data = ws.take_unsent() + data
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws.closed) from None


def socket_to_read(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under ``stream`` when reads may go to it directly: ``stream`` is a
    ``trio.SocketStream``, possibly behind ``plain_http.ReplayStream``s whose bytes have all
    been replayed; else None (bytes still to replay, a memory stream in tests)."""
    while isinstance(stream, ReplayStream):
        if not stream.replayed:
            return None
        stream = stream.inner
    if type(stream) is not trio.SocketStream:
        return None
    return stream.socket


async def receive_from_socket(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """``trio.SocketStream.receive_some`` without its layers (the stream, its error-translating
    context manager, the socket's method wrapper, its non-blocking helper and try-first
    context: five coroutine frames crossed on every wait and wake-up of a connection's
    reader, issue 10): what it returns and raises (``BrokenResourceError``,
    ``ClosedResourceError``), with the same checkpoint — but it waits for the socket to be
    readable first and then reads, where trio tries a read first. A connection's reader comes
    back to its socket right after handling what it read, and in the usual quiet conversation
    the client's next frame is not there yet: trio's first read fails (a system call and an
    exception) before the wait. When it is there, the wait returns at the next scheduler
    round, as trio's read does after its checkpoint. The descriptor is looked up again after
    the wait (closed meanwhile: ``ClosedResourceError``, never another socket's read)."""
    try:
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("this socket was already closed")
            await trio.lowlevel.wait_readable(fd)
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("this socket was already closed")
            try:
                return os.read(fd, max_bytes)
            except BlockingIOError:
                continue  # woken without data after all (another reader, a spurious wake-up): wait again
    except OSError as exc:  # as trio.SocketStream translates them
        if exc.errno in _CLOSED_SOCKET_ERRNOS:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


_CLOSED_SOCKET_ERRNOS = {errno.EBADF, errno.ENOTSOCK}
_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]


def simple_text_frame(data: bytes, at: int, max_size: int) -> tuple[str, int] | None:
    """The client frame at ``data[at:]`` when it is a whole message wsproto would accept as
    it stands — final, no RSV bits, text, masked, its length in the shortest form and under
    64 KiB, at most ``max_size`` bytes, valid UTF-8 — as (its text, where the next frame
    starts); else None (a partial frame, a control or binary frame, a fragment, anything
    invalid: wsproto takes it from there and answers as RFC 6455 says)."""
    end = len(data)
    if end - at < 6 or data[at] != _FINAL_TEXT:
        return None
    size = data[at + 1] ^ 0x80  # the mask bit must be set: a server refuses unmasked frames
    start = at + 6
    if size >= 126:
        if size != 126 or end - at < 8:
            return None
        size = (data[at + 2] << 8) | data[at + 3]
        if size < 126:  # a 16-bit length where 7 bits do: wsproto refuses it
            return None
        start = at + 8
    stop = start + size
    if stop > end or size > max_size:
        return None
    key = data[start - 4:start]
    payload = bytearray(data[start:stop])
    payload[::4] = payload[::4].translate(_XOR_TABLES[key[0]])
    payload[1::4] = payload[1::4].translate(_XOR_TABLES[key[1]])
    payload[2::4] = payload[2::4].translate(_XOR_TABLES[key[2]])
    payload[3::4] = payload[3::4].translate(_XOR_TABLES[key[3]])
    try:
        return payload.decode(), stop
    except UnicodeDecodeError:
        return None


_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_FINAL_TEXT = 0x81  # FIN, no RSV bits, opcode 1 (text)


def text_frame(message: str) -> bytes:
    """``message`` as one final, unmasked text frame: byte for byte what wsproto's
    ``send(TextMessage(data=message))`` makes on a server connection without extensions (winkr
    negotiates none), for about a twentieth of its cost (~0.4 µs against ~9 µs; every message
    sends three frames). Raises ``UnicodeEncodeError`` where wsproto does (a lone surrogate)."""
    payload = message.encode()
    size = len(payload)
    if size < 126:
        return bytes((_FINAL_TEXT, size)) + payload
    if size < 65536:
        return _HEADER_16.pack(_FINAL_TEXT, 126, size) + payload
    return _HEADER_64.pack(_FINAL_TEXT, 127, size) + payload


def _without_extensions(proto: WSConnection) -> bool:
    """Whether the open connection negotiated no extensions: then :func:`text_frame` frames
    its messages (wsproto keeps no state for a complete outgoing message)."""
    return getattr(getattr(proto, "_proto", None), "extensions", None) == []


def _text_frames(frames: list[str]) -> bytes:
    """The frames as one write, each by :func:`text_frame`."""
    if len(frames) == 1:
        return text_frame(frames[0])
    return b"".join([text_frame(frame) for frame in frames])


def _encode(proto: WSConnection, frames: list[str]) -> bytes:
    """The frames as one write: by :func:`text_frame` when the connection has no extensions,
    else by wsproto."""
    if _without_extensions(proto):
        return _text_frames(frames)
    return b"".join([proto.send(TextMessage(data=frame)) for frame in frames])


class DirectWriter:
    """Writes frames to a TCP socket from the task that has them, without waiting, when the
    socket takes them now: no wake-up of the connection's writer task, no stream lock, no
    checkpoint (docs/performance.md, issue 10, phase 3: the writer's three task steps per write
    were the largest cost left per message). The outbox uses it only while its writer is parked
    (``winkr.outbox``); :meth:`ready` adds that no pong or close frame is being written (the
    stream lock), that the connection is open and that no rest of an earlier direct write waits.

    Made only for a stream that is a ``trio.SocketStream`` (possibly behind
    ``plain_http.ReplayStream``, whose sends go straight through): :func:`direct_writer`
    returns None otherwise (memory streams in tests, anything wrapped differently)."""

    __slots__ = ("_ws", "_socket", "_metrics", "_plain")

    def __init__(self, ws: WinkrWebSocket, socket: trio.socket.SocketType, metrics: WriteMetrics | None) -> None:
        self._ws = ws
        self._socket = socket
        self._metrics = metrics
        # Made once the connection is open: whether it has extensions is settled (see _encode).
        self._plain = _without_extensions(ws._wsproto)

    def ready(self) -> bool:
        ws = self._ws
        return (not ws.closed and not ws._stream_lock.locked() and ws._wsproto.state is ConnectionState.OPEN
                and not ws.unsent and self._socket.fileno() >= 0)

    def has_rest(self) -> bool:
        return bool(self._ws.unsent)

    def write(self, frames: list[str]) -> bool:
        """Encode ``frames`` and write them now (call only when :meth:`ready`); True when the
        socket took everything. Else the rest waits in the stream (``WinkrWebSocket.unsent``):
        the next write under the stream lock sends it first, and the caller must see that one
        happens (wake the writer). On a failing socket all of it waits, and that write meets the
        error and closes the connection the usual way."""
        if self._plain:
            data = _text_frames(frames)
        else:
            data = _encode(self._ws._wsproto, frames)
        try:
            written = os.write(self._socket.fileno(), data)
        except OSError:  # EAGAIN: the socket's buffer is full; anything else: the writer learns it
            written = 0
        if self._metrics is not None:
            self._metrics.frames_per_write.observe(len(frames))
        if written == len(data):
            return True
        self._ws.unsent = data[written:]
        return False


class WriteMetrics(Protocol):
    """The metrics a direct write counts (``winkr.metrics.Metrics`` has them)."""

    @property
    def frames_per_write(self) -> FastHistogram: ...


def direct_writer(ws: WebSocketConnection, metrics: WriteMetrics | None = None) -> DirectWriter | None:
    """A :class:`DirectWriter` for ``ws`` when it is a :class:`WinkrWebSocket` on a TCP socket,
    else None."""
    if not isinstance(ws, WinkrWebSocket):
        return None
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
