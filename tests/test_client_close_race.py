"""winkr.client over a real loopback socket against a minimal WebSocket server (wsproto) that
answers the client's close frame with a ping first — a server heartbeat that crossed the
client's close, which a busy server sends now and then. trio-websocket then tries to answer
the ping in LOCAL_CLOSING, wsproto refuses (LocalProtocolError), and that error escaped the
client: ``open_client``'s block raised it on a plain close (seen with 100 clients closing
after a load test), and a client dropping a stalled connection to reconnect would have died.
The real clock: a real socket, every wait bounded."""
from __future__ import annotations

from functools import partial
from typing import Any

import orjson
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from winkr.client import open_client

pytestmark = pytest.mark.trio(run=trio.run)

LATE_PING = b"\x89\x04late"  # a server's (unmasked) ping frame with a 4-byte payload


async def _server(stream: trio.SocketStream, closes: list[int]) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    while data := await stream.receive_some():
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection(subprotocol="winkr.v1")))
                await stream.send_all(ws.send(TextMessage(data=orjson.dumps({
                    "event": "connection:established", "data": {
                        "user_id": "alice", "connection_id": "c1", "timestamp": "2026-01-01T00:00:00Z",
                        "settings": {}}}).decode())))
            elif isinstance(event, CloseConnection):
                closes.append(event.code)
                await stream.send_all(LATE_PING)  # the heartbeat that crossed the client's close
                await stream.send_all(ws.send(event.response()))
                return


@pytest.mark.sqlite_only  # no store involved: one run is enough
async def test_a_ping_that_crosses_the_client_s_close_does_not_escape_the_client() -> None:
    closes: list[int] = []
    async with trio.open_nursery() as nursery:
        listeners: list[Any] = await nursery.start(partial(trio.serve_tcp, partial(_server, closes=closes), 0,
                                                           host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(20):
            async with open_client(f"ws://127.0.0.1:{port}/ws", "any-token") as client:
                assert client.state == "open"
            assert client.state == "closed"
        assert closes == [1000]
        nursery.cancel_scope.cancel()
