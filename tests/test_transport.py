"""What winkr.transport adds to trio-websocket, on a real server-side WebSocket over in-memory
streams: the handshake state is let go once the connection is open (memory per idle
connection, issue 10), frames still flow both ways, and a ping's pong is a flag."""
from __future__ import annotations

import gc
from typing import Any

import trio
import trio.testing
from conftest import Harness
from trio_websocket import WebSocketRequest, wrap_client_stream
from wsproto import WSConnection
from wsproto.connection import Connection

from winkr.transport import Pong, WinkrWebSocket, send_frames, send_ping, wrap_server_stream


async def _open_pair(nursery: trio.Nursery) -> tuple[WinkrWebSocket, Any]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    clients: list[Any] = []

    async def connect() -> None:
        clients.append(await wrap_client_stream(nursery, client_stream, "localhost", "/ws"))

    nursery.start_soon(connect)
    request = await wrap_server_stream(nursery, server_stream, message_queue_size=8,
                                       max_message_size=1 << 20, receive_buffer_size=4096)
    server = await request.accept()
    assert isinstance(server, WinkrWebSocket)
    await trio.testing.wait_all_tasks_blocked()  # the client has read the 101
    return server, clients[0]


async def test_the_handshake_state_is_let_go_once_open_and_frames_still_flow() -> None:
    async with trio.open_nursery() as nursery:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        request = None

        async def connect() -> None:
            await wrap_client_stream(nursery, client_stream, "localhost", "/ws")

        nursery.start_soon(connect)
        request = await wrap_server_stream(nursery, server_stream, message_queue_size=8,
                                           max_message_size=1 << 20, receive_buffer_size=4096)
        ws = request._connection
        assert isinstance(ws._wsproto, WSConnection)  # the handshake is needed until accepted
        await request.accept()
        assert type(ws._wsproto) is Connection  # open: the frames' protocol alone
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        server, client = await _open_pair(nursery)
        await client.send_message("hello")
        assert await server.get_message() == "hello"
        await send_frames(server, ["one", "two"])
        assert [await client.get_message(), await client.get_message()] == ["one", "two"]
        await client.aclose()
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
        assert await server.get_message() == "reply"
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
