"""A faster way to write to a trio-websocket connection: several frames, one write.

``WebSocketConnection.send_message`` costs one ``send`` syscall per frame. A busy
connection has several frames waiting (an acknowledgement, a receipt, a broadcast), so the
outbox writer encodes them all with the connection's wsproto state and writes them in one
``send_all`` under the connection's own stream lock — exactly what ``send_message`` does per
frame. This reaches into trio-websocket's internals (``_wsproto``, ``_stream``,
``_stream_lock``), which is why setup.cfg pins trio-websocket below 0.13; if they are not
there, it falls back to one ``send_message`` per frame.
"""
from __future__ import annotations

import secrets

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import Ping, TextMessage


def _can_batch(ws: WebSocketConnection) -> bool:
    return all(hasattr(ws, name) for name in ("_wsproto", "_stream", "_stream_lock", "_abort_web_socket"))


async def send_frames(ws: WebSocketConnection, frames: list[str]) -> None:
    """Send text frames in order; raises ``ConnectionClosed`` like ``send_message``."""
    if not _can_batch(ws) or len(frames) == 1:
        for frame in frames:
            await ws.send_message(frame)
        return
    if ws.closed:
        raise ConnectionClosed(ws.closed)
    proto = ws._wsproto  # noqa: SLF001 - see the module docstring
    data = b"".join([proto.send(TextMessage(data=frame)) for frame in frames])
    async with ws._stream_lock:  # noqa: SLF001
        try:
            await ws._stream.send_all(data)  # noqa: SLF001
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()  # noqa: SLF001
            raise ConnectionClosed(ws.closed) from None


async def send_ping(ws: WebSocketConnection) -> trio.Event:
    """Send a ping without waiting for its pong: the returned event is set when the pong (or
    a later one) arrives. ``ws.ping()`` would need a task per connection to wait in; the
    outbox writer checks this event at its next wake-up instead."""
    if not _can_batch(ws) or not hasattr(ws, "_pings"):
        raise RuntimeError("trio-websocket internals changed: pin trio-websocket<0.13")
    if ws.closed:
        raise ConnectionClosed(ws.closed)
    payload = secrets.token_bytes(8)
    pong = trio.Event()
    ws._pings[payload] = pong  # noqa: SLF001 - trio-websocket sets it on the matching pong
    await ws._send(Ping(payload=payload))  # noqa: SLF001
    return pong
