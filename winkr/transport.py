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

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import TextMessage


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
