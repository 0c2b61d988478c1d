"""Frames written straight to the socket by the actor that fans them out (issue 10, phase 3):
over real loopback TCP (memory streams have no direct writer), with the server's real code.

A room's fan-out of a send writes the acknowledgement, the receipt and the peer's
``message:new`` itself when the sockets take them, without waking either connection's writer
task; when a socket does not take everything, the writer sends the rest before anything
later, and a client that reads nothing is still cut as a slow consumer.
"""
from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from conftest import RATE_LIMITS_OFF, SECRET, Client, Harness, TaskSteps, join, make_settings, metric, settle
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

from winkr.config import Settings
from winkr.server import Server
from winkr.store.writer import run_inline
from winkr.transport import WinkrWebSocket, direct_writer, send_frames, send_ping, wrap_server_stream


class TcpHarness(Harness):
    """The test harness with its clients on loopback TCP; ``receive_buffer``: the clients'
    ``SO_RCVBUF`` (small: their sockets fill fast)."""

    port: int = 0
    receive_buffer: int | None = None

    async def open_ws(self, path: str = "/ws", headers: list[tuple[str, str]] | None = None,
                      subprotocols: list[str] | None = None) -> WebSocketConnection:
        sock = trio.socket.socket()
        if self.receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        await sock.connect(("127.0.0.1", self.port))
        return await wrap_client_stream(self.nursery, trio.SocketStream(sock), "localhost", path,
                                        subprotocols=subprotocols, extra_headers=headers)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[TcpHarness]:
    async with trio.open_nursery() as clients:
        async with trio.open_nursery() as servers:
            server = Server(settings, SECRET, run_sync=run_inline)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await servers.start(server.serve, listeners)
            harness = TcpHarness(server, clients, settings)
            harness.port = server.ports[0]
            try:
                yield harness
            finally:
                server.request_shutdown()
        clients.cancel_scope.cancel()


async def pair(harness: TcpHarness) -> tuple[Client, Client, str]:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    reply = await alice.request("conversation:create", {"participant_ids": ["bob"]})
    conv = reply["data"]["conversation"]["id"]
    await bob.expect("conversation:created")
    await join(alice, conv)
    await join(bob, conv)
    await settle(alice, bob)
    return alice, bob, conv


def send_data(conv: str, n: int, size: int = 40) -> dict[str, Any]:
    return {"conversation_id": conv, "type": "text", "metadata": {}, "content": f"{n:04d} " + "x" * size}


async def test_a_send_reaches_both_sockets_without_waking_a_writer(tmp_path: Any) -> None:
    """Acknowledgement, receipt and the peer's message:new, each in order, for 50 sends — and
    the two connections' writer tasks never ran (before: each send woke both, three steps a
    write)."""
    steps = TaskSteps("._write_outbox")  # the connections' outbox writers
    async with serving(make_settings(tmp_path, limits=RATE_LIMITS_OFF)) as harness:
        alice, bob, conv = await pair(harness)
        trio.lowlevel.add_instrument(steps)
        try:
            with trio.fail_after(30):
                for n in range(50):
                    ref = await alice.send("message:send", send_data(conv, n))
                    ack = await alice.expect("message:new", ref=ref)
                    receipt = await alice.expect("message:delivered")
                    got = await bob.expect("message:new")
                    assert ack["data"]["message"]["seq"] == n + 1
                    assert got["data"]["message"] == ack["data"]["message"]
                    assert receipt["data"]["message_id"] == ack["data"]["message"]["id"]
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert steps.steps == 0


async def test_what_a_full_socket_did_not_take_arrives_whole_and_in_order(tmp_path: Any) -> None:
    """bob's socket is small and bob stops reading: the direct writes fill it, the rest of a
    write goes to bob's writer, later frames queue behind it. Once bob reads again every
    message arrives once, whole and in seq order."""
    count = 300
    steps = TaskSteps("._write_outbox")  # the connections' outbox writers
    async with serving(make_settings(tmp_path, limits=RATE_LIMITS_OFF)) as harness:
        harness.receive_buffer = 4096
        alice, bob, conv = await pair(harness)
        trio.lowlevel.add_instrument(steps)
        try:
            with trio.fail_after(60):
                for n in range(count):
                    reply = await alice.request("message:send", send_data(conv, n, size=1500))
                    assert reply["event"] == "message:new", reply
                contents = []
                while len(contents) < count:
                    event = orjson.loads(await bob.ws.get_message())
                    if event["event"] == "message:new":
                        assert event["data"]["message"]["seq"] == len(contents) + 1
                        contents.append(event["data"]["message"]["content"])
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert contents == [send_data(conv, n, size=1500)["content"] for n in range(count)]
    assert steps.steps > 0, "bob's socket never filled: the test did not reach a partial write"


async def test_a_client_that_reads_nothing_is_still_cut_as_a_slow_consumer(tmp_path: Any) -> None:
    """Direct writes fill bob's socket; what follows waits in bob's outbox, which cannot drain:
    past ``outbound_queue_bytes`` (64 KiB here) bob is closed as a slow consumer, and alice goes
    on. bob, reading again, finds his connection closed (the goodbye may not pass a full
    socket)."""
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF | {"outbound_queue_bytes": 64 * 1024})
    async with serving(settings) as harness:
        harness.receive_buffer = 4096
        alice, bob, conv = await pair(harness)
        with trio.fail_after(60):
            for n in range(1000):  # 1.5 MB: more than bob's socket, its buffers and 64 KiB
                reply = await alice.request("message:send", send_data(conv, n, size=1500))
                assert reply["event"] == "message:new", reply
            with pytest.raises(ConnectionClosed):
                while True:
                    await bob.ws.get_message()
            reply = await alice.request("conversation:list")
            assert reply["event"] == "conversation:list"
    assert metric(harness.server.metrics.text(), "winkr_connections_closed_total", reason="slow_consumer") == 1


class RawTcpClient:
    """A client spoken by hand with wsproto over loopback TCP: it reads only when told to;
    ``got``: what arrived, in order (("text", message), ("ping",), ("pong",), ("close", code))."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.accepted = False
        self.got: list[tuple[Any, ...]] = []
        self._parts: list[str] = []

    async def read_until(self, count: int) -> None:
        """Read until ``count`` things arrived (0: until the handshake's answer); fails if the
        stream ends first."""
        while len(self.got) < count or not self.accepted:
            data = await self.stream.receive_some(65536)
            assert data, f"the stream ended after {[g[0] for g in self.got]}"
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.accepted = True
                elif isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        self.got.append(("text", "".join(self._parts)))
                        self._parts.clear()
                else:
                    self.got.append((type(event).__name__.lower(), getattr(event, "code", None)))


async def open_raw_pair(nursery: trio.Nursery) -> tuple[WinkrWebSocket, RawTcpClient]:
    """A served WebSocket over loopback TCP whose socket takes little (``SO_SNDBUF`` 4 KiB), and
    its hand-spoken client."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client = RawTcpClient(await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1]))
    server_stream = await listener.accept()
    await listener.aclose()
    server_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await client.stream.send_all(client.ws.send(Request(host="localhost", target="/ws")))
    request = await wrap_server_stream(nursery, server_stream, max_message_size=1 << 20, receive_buffer_size=4096)
    server = await request.accept()
    assert isinstance(server, WinkrWebSocket)
    await client.read_until(0)
    return server, client


@pytest.mark.parametrize("other", ["ping", "pong", "goodbye"])
async def test_what_else_is_written_while_a_rest_waits_goes_after_the_rest(
        other: str, watchdog: dict[str, Any]) -> None:
    """A direct write the socket took only part of leaves its rest waiting for the writer task.
    Whatever another task writes to the stream before the writer runs — the heartbeat's ping,
    the reader's pong, a violation's goodbye and close frame — goes after that rest, never into
    the middle of the frame (before: straight to the socket, and the client read a broken
    stream; a violation closed the stream with the rest never sent). No trio timeout: with
    autojump one would fire while the kernel moves the bytes; the watchdog ends a hang."""
    watchdog["token"] = trio.lowlevel.current_trio_token()
    big = "a" * 200_000
    expected: list[tuple[Any, ...]] = [("text", big)]
    async with trio.open_nursery() as nursery:
        server, client = await open_raw_pair(nursery)
        direct = direct_writer(server)
        assert direct is not None and direct.ready()
        assert not direct.write([big]), "the socket took a 200 KB frame whole: nothing to test"
        assert not direct.ready()  # a rest waits: no direct write may start
        async with trio.open_nursery() as reading:
            reading.start_soon(client.read_until, 3)
            if other == "ping":
                await send_ping(server)
                expected.append(("ping", None))
            elif other == "pong":
                await client.stream.send_all(client.ws.send(Ping(b"are you there")))
                await client.stream.send_all(client.ws.send(TextMessage("after my ping")))
                await _read_one(server)  # answers the ping on the way
                expected.append(("pong", None))
            else:
                server.goodbye = lambda reason, code: f"goodbye {reason}"
                await client.stream.send_all(b"\x81\x82abcd\xff\xfe")  # invalid UTF-8
                await server.read_frames(_ignore)  # says goodbye and closes
                expected += [("text", "goodbye invalid_payload"), ("closeconnection", 1007)]
            if other != "goodbye":
                await send_frames(server, ["after"])  # the writer: the rest first, then its batch
                expected.append(("text", "after"))
        nursery.cancel_scope.cancel()
    assert client.got == expected


async def _read_one(server: WinkrWebSocket) -> None:
    """Read the client's next message the way a connection reads (pings answered on the way)."""
    with trio.CancelScope() as scope:
        async def stop(message: str | bytes) -> None:
            scope.cancel()

        await server.read_frames(stop)


async def _ignore(message: str | bytes) -> None:
    pass
