"""What winkr.transport adds to trio-websocket, on a real server-side WebSocket over in-memory
streams: the handshake state is let go once the connection is open (memory per idle
connection, issue 10), frames still flow both ways, and a ping's pong is a flag."""
from __future__ import annotations

import gc
import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing
from conftest import RATE_LIMITS_OFF, Harness, make_settings, running, still_works
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import WebSocketRequest, wrap_client_stream
from wire_clients import RawClient, bounded_stream_pair
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

from winkr.plain_http import ReplayStream
from winkr.transport import (
    Pong,
    WinkrWebSocket,
    receive_from_socket,
    send_frames,
    send_ping,
    simple_text_frame,
    socket_to_read,
    text_frame,
    wrap_server_stream,
)


async def _open_pair(nursery: trio.Nursery) -> tuple[WinkrWebSocket, Any]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    clients: list[Any] = []

    async def connect() -> None:
        clients.append(await wrap_client_stream(nursery, client_stream, "localhost", "/ws"))

    nursery.start_soon(connect)
    request = await wrap_server_stream(nursery, server_stream, max_message_size=1 << 20, receive_buffer_size=4096)
    server = await request.accept()
    assert isinstance(server, WinkrWebSocket)
    await trio.testing.wait_all_tasks_blocked()  # the client has read the 101
    return server, clients[0]


async def _next_frame(server: WinkrWebSocket) -> str | bytes:
    """The next client message, read the way a connection reads (``read_frames``)."""
    got: list[str | bytes] = []
    with trio.CancelScope() as scope:
        async def handle(message: str | bytes) -> None:
            got.append(message)
            scope.cancel()

        await server.read_frames(handle)
    return got[0]


async def _ignore(message: str | bytes) -> None:
    pass


async def test_the_handshake_state_is_let_go_once_open_and_frames_still_flow() -> None:
    async with trio.open_nursery() as nursery:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        request = None

        async def connect() -> None:
            await wrap_client_stream(nursery, client_stream, "localhost", "/ws")

        nursery.start_soon(connect)
        request = await wrap_server_stream(nursery, server_stream, max_message_size=1 << 20, receive_buffer_size=4096)
        ws = request._connection
        assert isinstance(ws._wsproto, WSConnection)  # the handshake is needed until accepted
        await request.accept()
        assert type(ws._wsproto) is Connection  # open: the frames' protocol alone
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        server, client = await _open_pair(nursery)
        await client.send_message("hello")
        assert await _next_frame(server) == "hello"
        await send_frames(server, ["one", "two"])
        assert [await client.get_message(), await client.get_message()] == ["one", "two"]
        nursery.start_soon(server.read_frames, _ignore)  # the server reads on, as a connection does
        await client.aclose()  # answered by the server's reading
        assert server.closed is not None
        nursery.cancel_scope.cancel()


async def test_a_pong_sets_the_flag_of_its_ping() -> None:
    async with trio.open_nursery() as nursery:
        server, client = await _open_pair(nursery)
        pong = await send_ping(server)
        assert isinstance(pong, Pong) and not pong.arrived
        # The client answers the ping in its reader before it sees the frame that followed it,
        # so its reply to that frame reaches the server after the pong.
        await send_frames(server, ["after the ping"])
        assert await client.get_message() == "after the ping"
        await client.send_message("reply")
        assert await _next_frame(server) == "reply"
        assert pong.arrived and pong.is_set()
        nursery.cancel_scope.cancel()


async def test_a_served_connection_holds_nothing_of_its_handshake(harness: Harness) -> None:
    """Thousands of idle connections: the request head, its headers and the handshake's h11
    state are let go once the connection is open (issue 10)."""
    alice = await harness.connect("alice")
    await alice.request("user:status", {"status": "online"})  # a served, working connection
    gc.collect()
    served = [o for o in gc.get_objects() if isinstance(o, WinkrWebSocket) and not o.closed]
    assert served
    assert all(type(ws._wsproto) is Connection for ws in served)
    held = [o for o in gc.get_objects() if isinstance(o, WebSocketRequest) and o._connection in served]
    assert held == []


def _tasks_named(suffix: str) -> list[trio.lowlevel.Task]:
    found: list[trio.lowlevel.Task] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.endswith(suffix):
            found.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return found


async def test_an_open_connection_is_read_by_its_own_task_alone(autojump_clock: Any, harness: Harness) -> None:
    """trio-websocket's reader task ends with the handshake; the connection's task reads its
    frames (issue 10: one task and one hand-off per frame fewer). Only the two test clients'
    own (trio-websocket) readers are left."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    assert len(_tasks_named("._reader_task")) == 2
    conversation = await harness.conversation(alice, "bob")
    await still_works(alice)
    await still_works(bob)
    assert conversation


async def test_a_pong_behind_frames_waiting_for_the_budget_still_counts(autojump_clock: Any, tmp_path: Any) -> None:
    """While the connection waits for its inbound budget it reads nothing (the frames wait in
    the socket), pongs included: a pong read a few seconds late, well inside pong_timeout,
    keeps the connection open."""
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF | {"inbound_events_per_second": 1, "inbound_burst": 1},
                             ping_interval=5.0, pong_timeout=10.0)
    async with running(settings) as harness:
        raw = RawClient(harness, answer_pings=True)
        await raw.handshake(harness.token("alice"))
        for n in range(8):  # one within the budget, seven waiting ~1 s each (an unknown event costs 1)
            await raw.send_event("no:such", {}, f"r{n}")
        await raw.pump_for(40)
        assert raw.close_code is None, raw.events
        assert len(raw.pings) >= 7
        assert len([e for e in raw.events if e.get("ref", "").startswith("r")]) == 8



async def test_a_client_that_floods_pings_and_reads_nothing_is_cut(autojump_clock: Any, tmp_path: Any) -> None:
    """Pings keep coming, nothing is read: the pongs fill the socket and the connection's
    reader waits in their write, holding the stream; the heartbeat's own ping then waits for
    the stream too. Neither wait had a limit, so the connection (online, holding a slot)
    stayed until its token expired. The ping waits as a write does: at most twice
    ``slow_consumer_seconds``, then the connection is cut as a slow consumer."""
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF | {"slow_consumer_seconds": 5},
                             ping_interval=5.0, pong_timeout=10.0)
    async with running(settings) as harness:
        client_end, server_end = bounded_stream_pair(16 * 1024)
        harness.server.accept_stream(server_end)
        ws = WSConnection(ConnectionType.CLIENT)
        await client_end.send_all(ws.send(Request(host="localhost", target="/ws", extra_headers=[
            (b"authorization", f"Bearer {harness.token('alice')}".encode())])))
        with trio.fail_after(10):
            while not any(isinstance(event, AcceptConnection) for event in ws.events()):
                ws.receive_data(await client_end.receive_some(65536))
        await client_end.send_all(b"".join(ws.send(Ping(payload=b"p" * 125)) for _ in range(2000)))
        to_client = client_end.incoming
        with trio.fail_after(60):  # ping 5 s + the stall limit 10 s + the goodbye's 2 s, with room
            while not to_client.send_closed:
                await to_client.lot.park()


async def test_a_message_above_the_library_limit_gets_connection_closed_and_1009(autojump_clock: Any,
                                                                               harness: Harness) -> None:
    """Contract §9: ``connection:closed`` precedes every close the server starts. A message
    past trio-websocket's own limit (fragments adding up to more than 1 MiB, each under
    it) was closed with a bare 1009 frame, counted as the client's close."""
    raw = RawClient(harness, answer_pings=True)
    await raw.handshake(harness.token("alice"))
    chunk = "a" * (256 * 1024)
    await raw.stream.send_all(raw.ws.send(TextMessage(data='{"event":"x","data":"' + chunk, message_finished=False)))
    for _ in range(4):
        await raw.stream.send_all(raw.ws.send(TextMessage(data=chunk, message_finished=False)))
    await raw.pump_until(lambda: raw.close_code is not None, timeout=10)
    closed = [e for e in raw.events if e.get("event") == "connection:closed"]
    assert closed and closed[0]["data"]["reason"] == "message_too_large" and closed[0]["data"]["code"] == 1009, \
        raw.events
    assert raw.close_code == 1009


async def test_a_message_above_the_limit_while_closing_ends_the_close_quietly() -> None:
    """The server's close frame is out and it reads on for the client's; a message past the
    limit arrives first. Nothing more can be said (a frame after our close frame breaks
    RFC 6455, and wsproto raises on it): the stream is closed, ``aclose`` returns."""
    async with trio.open_nursery() as nursery:
        server, client = await _open_pair(nursery)
        big = "x" * ((1 << 20) + 1)
        await client._stream.send_all(client._wsproto.send(TextMessage(data=big)))  # no wait for an answer
        with trio.fail_after(5):
            await server.aclose(4001, "token_expired")
        assert server.closed is not None
        nursery.cancel_scope.cancel()


async def test_a_ping_that_arrives_after_our_close_frame_ends_the_close_quietly() -> None:
    """The server's close frame is out and it reads on for the client's; the client's ping,
    sent before it saw ours, arrives first. wsproto refuses to send a pong once the close
    frame is out (LocalProtocolError, which escaped ``aclose`` and the connection's ``run``):
    the ping goes unanswered, the close completes."""
    async with trio.open_nursery() as nursery:
        server, client = await _open_pair(nursery)
        await client._stream.send_all(client._wsproto.send(Ping(payload=b"late")))
        with trio.fail_after(5):
            await server.aclose(4001, "token_expired")
        assert server.closed is not None
        nursery.cancel_scope.cancel()


def _masked_text_frame(payload: bytes) -> bytes:
    """A client text frame around any bytes (wsproto only frames valid UTF-8)."""
    mask = b"\x01\x02\x03\x04"
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_violation_while_the_writer_has_more_to_write_still_says_goodbye(autojump_clock: Any,
                                                                                 tmp_path: Any) -> None:
    """The client breaks the protocol (invalid UTF-8) while the outbox writer is busy with a
    backlog for it. The goodbye and the close frame wait for the stream behind a write; the
    close frame is encoded first (wsproto is then closing), and the writer's next batch must
    not be encoded after it (wsproto's LocalProtocolError failed the connection instead: no
    close frame, an internal error logged)."""
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF)
    async with running(settings) as harness:
        raw = RawClient(harness, answer_pings=True, to_client_capacity=2048)
        await raw.handshake(harness.token("alice"))
        for n in range(200):  # 200 error replies wait for this client, which reads nothing yet
            await raw.send_event("no:such", {}, f"r{n}")
        await trio.testing.wait_all_tasks_blocked()
        await raw.stream.send_all(_masked_text_frame(b'{"event": "\xff"}'))
        await trio.testing.wait_all_tasks_blocked()
        await raw.pump_for(30)
        assert raw.close_code == 1007, (raw.close_code, raw.events[-2:])
        closed = [e for e in raw.events if e.get("event") == "connection:closed"]
        assert closed and closed[0]["data"]["reason"] == "invalid_payload", raw.events[-2:]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.text(min_size=120, max_size=131),
                 st.integers(0, 3).map(lambda n: "é" * (65535 // 2 - 1 + n) + "x" * n),
                 st.integers(65530, 65540).map(lambda n: "a" * n)))
def test_text_frame_is_what_wsproto_makes(message: str) -> None:
    """The framer of every outgoing message (issue 10, phase 3) against wsproto's own, around
    the 7-bit/16-bit/64-bit length boundaries (125/126, 65535/65536 bytes), multibyte text."""
    assert text_frame(message) == Connection(ConnectionType.SERVER).send(TextMessage(data=message))


def test_text_frame_refuses_a_lone_surrogate_as_wsproto_does() -> None:
    with pytest.raises(UnicodeEncodeError):
        Connection(ConnectionType.SERVER).send(TextMessage(data="\ud800"))
    with pytest.raises(UnicodeEncodeError):
        text_frame("\ud800")


def _client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
                  long_length: bool = False, key: bytes = b"\x11\x22\x33\x44") -> bytes:
    """One client frame, any of its fields as asked (also the ones RFC 6455 forbids)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126 and not long_length:
        head += bytes([mask_bit | size])
    elif size < 65536:
        head += bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


_frames = st.one_of(
    st.builds(lambda t, k: _client_frame(1, t.encode(), key=k), st.text(max_size=200),
              st.binary(min_size=4, max_size=4)),
    st.builds(lambda t: _client_frame(1, t.encode(), long_length=True), st.text(max_size=200)),  # 16-bit length
    st.builds(lambda t: _client_frame(1, t.encode(), fin=False), st.text(max_size=20)),  # a first fragment
    st.builds(lambda t: _client_frame(0, t.encode()), st.text(max_size=20)),  # a continuation
    st.builds(lambda b: _client_frame(2, b), st.binary(max_size=20)),
    st.builds(lambda b: _client_frame(9, b), st.binary(max_size=20)),  # ping
    st.builds(lambda b: _client_frame(10, b), st.binary(max_size=20)),  # pong
    st.just(_client_frame(8, b"\x03\xe8")),  # close
    st.builds(lambda b: _client_frame(1, b), st.binary(max_size=20)),  # text, maybe invalid UTF-8
    st.builds(lambda t: _client_frame(1, t.encode(), masked=False), st.text(max_size=20)),
    st.builds(lambda t, r: _client_frame(1, t.encode(), rsv=r), st.text(max_size=20), st.integers(1, 7)),
    st.builds(lambda o, b: _client_frame(o, b), st.sampled_from([3, 4, 5, 6, 7, 11, 15]), st.binary(max_size=5)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_frames, max_size=8), st.integers(0, 40), st.integers(20, 300))
def test_simple_text_frames_are_what_wsproto_reads(frames: list[bytes], cut: int, max_size: int) -> None:
    """The reading fast path (issue 10, phase 3) against wsproto: the whole messages it takes
    from the front of any byte stream (frames of every kind, valid or not, maybe cut short) are
    exactly the messages wsproto reads from those bytes, in order; it stops at the first frame
    it does not take, at a frame boundary."""
    data = b"".join(frames)
    data = data[:len(data) - cut] if cut < len(data) else data
    taken: list[str] = []
    at = 0
    while (found := simple_text_frame(data, at, max_size)) is not None:
        text, at = found
        taken.append(text)
    reader = Connection(ConnectionType.SERVER)
    reader.receive_data(data[:at])
    events = list(reader.events())
    assert [e.data for e in events] == taken
    assert all(isinstance(e, TextMessage) and e.message_finished and len(e.data.encode()) <= max_size
               for e in events)
    assert at == sum(len(f) for f in frames[:len(taken)])


# --- reading the TCP socket directly (receive_from_socket) -----------------------------------


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
    server = await listener.accept()
    await listener.aclose()
    assert isinstance(server, trio.SocketStream)
    return client, server


async def test_a_direct_read_returns_what_arrived_and_empty_bytes_at_the_end() -> None:
    client, server = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await receive_from_socket(server.socket, 4096))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # waiting for the socket
        await client.send_all(b"hello")
    assert got == [b"hello"]
    await client.send_all(b"0123456789")
    assert await receive_from_socket(server.socket, 4) == b"0123"  # at most max_bytes; the rest stays
    assert await receive_from_socket(server.socket, 4096) == b"456789"
    await client.aclose()
    assert await receive_from_socket(server.socket, 4096) == b""
    await server.aclose()


async def test_a_direct_read_is_a_checkpoint_and_a_cancelled_one_takes_nothing() -> None:
    client, server = await _tcp_pair()
    await client.send_all(b"waiting")
    await trio.testing.wait_all_tasks_blocked()
    with trio.CancelScope() as scope:
        scope.cancel()
        await receive_from_socket(server.socket, 4096)
    assert scope.cancelled_caught
    with trio.testing.assert_checkpoints():  # also when the bytes are already there
        assert await receive_from_socket(server.socket, 4096) == b"waiting"
    await client.aclose()
    await server.aclose()


async def test_a_direct_read_of_a_closed_socket_is_closed_resource_error() -> None:
    client, server = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        async def read() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await receive_from_socket(server.socket, 4096)

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await server.aclose()  # closed by another task while the reader waits
    with pytest.raises(trio.ClosedResourceError):  # and once closed
        await receive_from_socket(server.socket, 4096)
    await client.aclose()


async def test_a_direct_read_of_a_reset_connection_is_broken_resource_error() -> None:
    client, server = await _tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()  # a reset, not an orderly end
    with pytest.raises(trio.BrokenResourceError):
        await receive_from_socket(server.socket, 4096)
    await server.aclose()


async def test_the_socket_is_read_directly_only_once_nothing_is_left_to_replay() -> None:
    client, server = await _tcp_pair()
    replay = ReplayStream(b"GET", ReplayStream(b"", server))
    assert socket_to_read(replay) is None  # the prefix first
    assert await replay.receive_some(2) == b"GE"
    assert socket_to_read(replay) is None
    assert await replay.receive_some(10) == b"T"
    assert socket_to_read(replay) is server.socket
    assert socket_to_read(server) is server.socket
    assert socket_to_read(trio.testing.memory_stream_pair()[0]) is None
    await client.aclose()
    await server.aclose()


async def test_a_connection_over_tcp_reads_frames_and_pings_after_directly_read_messages() -> None:
    """The reader skips wsproto while only whole text frames came (nothing fed to it); a ping
    and a fragmented message after them still reach wsproto and are answered."""
    client_stream, server_stream = await _tcp_pair()
    async with trio.open_nursery() as nursery:
        clients: list[Any] = []

        async def connect() -> None:
            clients.append(await wrap_client_stream(nursery, client_stream, "localhost", "/ws"))

        nursery.start_soon(connect)
        request = await wrap_server_stream(nursery, ReplayStream(b"", server_stream), max_message_size=1 << 20,
                                           receive_buffer_size=4096)
        server = await request.accept()
        assert isinstance(server, WinkrWebSocket)
        await trio.testing.wait_all_tasks_blocked()
        client = clients[0]
        received: list[str | bytes] = []

        async def handle(message: str | bytes) -> None:
            received.append(message)

        nursery.start_soon(server.read_frames, handle)
        await client.send_message("one")
        await client.send_message("two")
        await trio.testing.wait_all_tasks_blocked()
        assert received == ["one", "two"]
        assert server._read_socket is server_stream.socket  # read straight from the socket
        await client.ping(b"12345678")  # answered: the pong comes back
        await client._send(TextMessage(data="thr", message_finished=False))
        await client._send(TextMessage(data="ee", message_finished=True))
        await client.send_message("four")
        await trio.testing.wait_all_tasks_blocked()
        assert received == ["one", "two", "three", "four"]
        nursery.cancel_scope.cancel()
    await client_stream.aclose()
    await server_stream.aclose()
