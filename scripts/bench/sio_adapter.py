"""A socket.io client for ``loadgen.py`` (the shared load generator): Engine.IO v4 /
Socket.IO v5 framing spoken over loadgen's own picows client, so python-socketio is driven
by exactly the same client stack as the relays and winkr.

    loadgen.py pairs --url 'ws://127.0.0.1:PORT/socket.io/?EIO=4&transport=websocket' \\
        --adapter scripts/bench/sio_adapter.py:SocketIOAdapter ...

The frames, as python-socketio's own clients send and read them:

- server → client ``0{...}`` (Engine.IO open), then client → server ``40{"user": N}`` (connect
  to the default namespace with auth), server → client ``40{"sid": ...}`` (connected: ready)
  or ``44{...}`` (refused);
- client → server ``42["m",{"to":M,"payload":P}]``; server → peer the same event;
- server → client ``2`` (ping), client → server ``3`` (pong).

Duck-typed against loadgen's ``RelayAdapter`` (loadgen is run as a script, so it is not
imported here).
"""
from __future__ import annotations

import sys

import orjson

EVENT = b"42"
PING = b"2"


class SocketIOAdapter:
    ECHO = "echo"
    wait_ready = True

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg
        self._refusals = 0

    def url(self, base_url: str, user: int) -> str:
        return base_url

    def headers(self, user: int) -> None:
        return None

    def hello(self, user: int) -> tuple[bytes, ...]:
        return (b"40" + orjson.dumps({"user": user}),)

    def is_ready(self, raw: bytes) -> bool:
        if raw.startswith(b"40"):
            return True
        if raw.startswith(b"44"):
            self._refusals += 1
            if self._refusals <= 3:
                print(f"sio_adapter: connect refused: {raw[:200]!r}", file=sys.stderr, flush=True)
            return True  # fail fast: the pair delivers nothing
        return False

    def respond(self, raw: bytes) -> bytes | None:
        return b"3" if raw == PING else None

    def encode(self, to_user: int | str, payload: str) -> bytes:
        return EVENT + orjson.dumps(["m", {"to": to_user, "payload": payload}])

    def decode(self, raw: bytes) -> str | None:
        if not raw.startswith(EVENT):
            return None
        try:
            event, data = orjson.loads(raw[2:])
            payload = data["payload"] if event == "m" else None
        except (ValueError, TypeError, KeyError):
            return None
        return payload if isinstance(payload, str) else None


Adapter = SocketIOAdapter
