"""Operator actions from the command line, done the way the server would do them."""
from __future__ import annotations

import time
from typing import Any

import orjson
import trio
from trio_websocket import open_websocket_url

from winkr.config import Settings
from winkr.errors import INTERNAL_ERROR, ProtocolError
from winkr.protocol.wire import conversation_object

CLI_TIMEOUT = 10.0  # seconds for the whole exchange with a running server


async def create_conversation_through_server(url: str, service_token: str, user_ids: list[str]) -> dict[str, Any]:
    """``conversation:create`` over the running server's WebSocket as a service account: the
    participants' open connections get ``conversation:created``. Raises ``ProtocolError`` with
    the server's error, ``OSError`` when the server cannot be reached."""
    headers = [(b"authorization", f"Bearer {service_token}".encode())]
    with trio.fail_after(CLI_TIMEOUT):
        async with open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(orjson.dumps({"event": "conversation:create", "ref": "cli",
                                                "data": {"participant_ids": user_ids}}).decode())
            while True:
                reply = orjson.loads(await ws.get_message())
                if reply.get("ref") != "cli":
                    continue
                if reply["event"] == "error":
                    data = reply["data"]
                    raise ProtocolError(data.get("code", INTERNAL_ERROR), data.get("message", "refused"))
                conversation: dict[str, Any] = reply["data"]["conversation"]
                return conversation


def create_conversation_directly(settings: Settings, user_ids: list[str]) -> dict[str, Any]:
    """Create it in the database itself: only while no server runs on it. Raises
    ``ProtocolError`` for what the store refuses."""
    from winkr.protocol.requests import ConversationCreate, structure_request
    from winkr.store.engine import open_engine
    from winkr.store.store import Store

    # The ids go through the protocol's own rules, as conversation:create reads them.
    user_ids = list(structure_request(ConversationCreate, {"participant_ids": user_ids}).participant_ids)
    db = open_engine(settings.database, sqlite_synchronous=settings.sqlite_synchronous).open_writer()
    try:
        store = Store(db)
        db.begin()
        try:
            conversation, _ = store.create_conversation(
                user_ids[0], user_ids, is_service=True, max_participants=settings.max_participants,
                now=time.time())
            db.commit()
        except BaseException:
            db.rollback()
            raise
    finally:
        db.close()
    return conversation_object(conversation)
