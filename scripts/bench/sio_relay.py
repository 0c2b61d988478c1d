#!/usr/bin/env python3
"""The python-socketio peer of ``relay_trio.py``: what a Python developer would otherwise pick
for chat (python-socketio's ASGI server on uvicorn, uvloop and websockets through
``uvicorn[standard]``), doing what the bare relays do and no more: no storage, no receipts.

    python scripts/bench/sio_relay.py PORT

- a client connects to ``/socket.io/?EIO=4&transport=websocket`` and names itself in the
  namespace CONNECT packet's auth: ``40{"user": N}`` (the relays take ``?user=N``);
- event ``m`` with ``{"to": M, "payload": ...}`` is emitted unchanged as ``m`` to user M's
  connection; ``"to": "echo"`` goes back to the sender; anything else is dropped.

Listens on 127.0.0.1 only. Library defaults are kept (as relay_trio keeps trio-websocket's),
except the access log, which is off (the relays log nothing per connection either).
"""
from __future__ import annotations

import sys
from typing import Any

import socketio
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=[], logger=False, engineio_logger=False)
app = socketio.ASGIApp(sio)
sid_of: dict[str, str] = {}  # user -> session id
user_of: dict[str, str] = {}  # session id -> user


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
    user = auth.get("user") if isinstance(auth, dict) else None
    if user is None:
        return False
    sid_of[str(user)] = sid
    user_of[sid] = str(user)
    return True


@sio.event
async def disconnect(sid: str, *args: Any) -> None:
    user = user_of.pop(sid, None)
    if user is not None and sid_of.get(user) == sid:
        del sid_of[user]


@sio.on("m")
async def relay(sid: str, data: Any) -> None:
    try:
        to = data["to"]
    except (TypeError, KeyError):
        return
    target = sid if to == "echo" else sid_of.get(str(to))
    if target is not None:
        await sio.emit("m", data, to=target)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8766
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
