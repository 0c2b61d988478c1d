"""Clients that do what trio-websocket's client never does, for tests: a hand-spoken
WebSocket (wsproto) that can ignore pings, delay its handshake or send bytes that break RFC
6455, and a bounded in-memory pipe that behaves like a socket whose reader is slow."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import trio
import trio.testing
from conftest import TIMESTAMP, Client, Harness, bearer, welcomed
from trio_websocket import wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request, TextMessage


def assert_closed_with(events: list[dict[str, Any]], reason: str, code: int) -> None:
    assert events, "no connection:closed before the close frame"
    last = events[-1]
    assert last["event"] == "connection:closed", events
    assert last["data"]["reason"] == reason, last
    assert last["data"]["code"] == code, last
    assert TIMESTAMP.match(last["data"]["timestamp"]), last
    assert "ref" not in last


class RawClient:
    """A WebSocket client spoken by hand with wsproto over a memory stream, so it can do what
    trio-websocket never does: ignore pings, or wait before sending its handshake."""

    def __init__(self, harness: Harness, *, answer_pings: bool, to_client_capacity: int | None = None) -> None:
        # With ``to_client_capacity``, the server can get ahead of this client by only that
        # many unread bytes (``bounded_stream_pair``).
        self.stream: trio.abc.Stream
        if to_client_capacity is None:
            self.stream, server_stream = trio.testing.memory_stream_pair()
        else:
            self.stream, server_stream = bounded_stream_pair(to_client_capacity)
        harness.server.accept_stream(server_stream)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.answer_pings = answer_pings
        self.accepted = False
        self.events: list[dict[str, Any]] = []
        self.pings: list[float] = []
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.eof = False
        self._text: list[str] = []

    async def handshake(self, token: str) -> None:
        await self.stream.send_all(self.ws.send(Request(
            host="localhost", target="/ws",
            extra_headers=[(b"authorization", f"Bearer {token}".encode())])))
        await self.pump_until(lambda: self.accepted, timeout=30)

    async def send_event(self, event: str, data: dict[str, Any], ref: str) -> None:
        frame = orjson.dumps({"event": event, "data": data, "ref": ref}).decode()
        await self.stream.send_all(self.ws.send(TextMessage(frame)))

    async def _pump_once(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
        self.ws.receive_data(data or None)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, RejectConnection):
                raise AssertionError(f"handshake refused: {event.status_code}")
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    self.events.append(orjson.loads("".join(self._text)))
                    self._text.clear()
            elif isinstance(event, Ping):
                self.pings.append(trio.current_time())
                if self.answer_pings and self.ws.state is ConnectionState.OPEN:
                    await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self.close_code is None:
                    self.close_code, self.closed_at = event.code, trio.current_time()
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    try:
                        await self.stream.send_all(self.ws.send(event.response()))
                    except trio.BrokenResourceError:
                        self.eof = True  # a server may close TCP right after its close frame

    async def pump_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                assert not self.eof, "the server ended the stream"  # noqa: ASYNC110
                await self._pump_once()

    async def pump_for(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            while not self.eof:
                await self._pump_once()


class _Pipe:
    """One direction of a bounded in-memory byte pipe. ``send_all`` waits while ``capacity``
    bytes are unread, then appends all of its data at once: a cancelled send leaves no
    half frame behind (unlike ``lockstep_stream_pair``)."""

    def __init__(self, capacity: int) -> None:
        self.buffer = bytearray()
        self.capacity = capacity
        self.send_closed = False
        self.receive_closed = False
        self.lot = trio.lowlevel.ParkingLot()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.send_closed:
            raise trio.ClosedResourceError
        while len(self.buffer) >= self.capacity and not self.receive_closed:
            await self.lot.park()
        if self.receive_closed:
            raise trio.BrokenResourceError
        self.buffer += data
        self.lot.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.receive_closed:
            raise trio.ClosedResourceError
        while not self.buffer and not self.send_closed:
            await self.lot.park()
        if self.receive_closed:
            raise trio.ClosedResourceError
        size = len(self.buffer) if max_bytes is None else max_bytes
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.lot.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def close_send(self) -> None:
        self.send_closed = True
        self.lot.unpark_all()

    def close_receive(self) -> None:
        self.receive_closed = True
        self.lot.unpark_all()


class _PipeEnd(trio.abc.Stream):
    def __init__(self, outgoing: _Pipe, incoming: _Pipe) -> None:
        self.outgoing, self.incoming = outgoing, incoming

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.outgoing.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.incoming.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.outgoing.close_send()
        self.incoming.close_receive()
        await trio.lowlevel.checkpoint()


async def over_slow_link(harness: Harness, user_id: str, capacity: int) -> Client:
    """A client whose socket takes only ``capacity`` unread bytes from the server."""
    client_end, server_end = bounded_stream_pair(capacity)
    harness.server.accept_stream(server_end)
    ws = await wrap_client_stream(harness.nursery, client_end, "localhost", "/ws",
                                  extra_headers=bearer(harness.token(user_id)))
    return await welcomed(ws, user_id)


def bounded_stream_pair(to_client_capacity: int) -> tuple[_PipeEnd, _PipeEnd]:
    """(client end, server end): the server can get ahead of a non-reading client by only
    ``to_client_capacity`` bytes, as with a real socket's buffers."""
    up, down = _Pipe(1 << 22), _Pipe(to_client_capacity)
    return _PipeEnd(up, down), _PipeEnd(down, up)
