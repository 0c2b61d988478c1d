"""message:send, message:read, message:delete, message:history."""
from __future__ import annotations

from typing import Any

import trio

from winkr.handlers.catchup import announce_deliveries
from winkr.policy import check_message
from winkr.protocol.requests import MessageHistory, MessageRef, MessageSend
from winkr.room import Delete, Read, Send
from winkr.store.store import Delivery, Message, Store


async def send(conn: Any, request: MessageSend, ref: str | None) -> None:
    checked = check_message(request.type, request.content, request.metadata,
                            is_service=conn.principal.is_service, settings=conn.s.policy)
    await conn.to_room(request.conversation_id, Send(conn.peer, checked, request.client_message_id, ref,
                                                     trio.current_time()))


async def read(conn: Any, request: MessageRef, ref: str | None) -> None:
    await conn.to_room(request.conversation_id, Read(conn.peer, request.message_id, ref))


async def delete(conn: Any, request: MessageRef, ref: str | None) -> None:
    await conn.to_room(request.conversation_id, Delete(conn.peer, request.message_id, ref))


async def history(conn: Any, request: MessageHistory, ref: str | None) -> None:
    user_id, is_service, now = conn.principal.user_id, conn.principal.is_service, conn.s.frames.now()

    def work(store: Store) -> tuple[list[Message], bool, list[Delivery]]:
        participants = store.authorize(request.conversation_id, user_id, is_service)
        messages, has_more = store.history(request.conversation_id, user_id, request.before_seq,
                                           request.after_seq, request.limit)
        if user_id not in participants:  # a service account reading is not a delivery
            return messages, has_more, []
        return messages, has_more, store.record_delivered(messages, user_id, now)

    messages, has_more, deliveries = await conn.s.store.call(work)
    conn.reply("message:history", {"conversation_id": request.conversation_id, "messages": messages,
                                   "has_more": has_more}, ref)
    await announce_deliveries(conn, deliveries)
