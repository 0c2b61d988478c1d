"""conversation:join, conversation:leave, conversation:create, conversation:list."""
from __future__ import annotations

from typing import Any

from winkr.protocol.requests import ConversationCreate, ConversationRef, Empty
from winkr.room import Join, Leave
from winkr.store.store import Store


async def join(conn: Any, request: ConversationRef, ref: str | None) -> None:
    conn.joined.add(request.conversation_id)  # a refused join leaves a harmless no-op leave behind
    await conn.to_room(request.conversation_id, Join(conn.peer, ref))


async def leave(conn: Any, request: ConversationRef, ref: str | None) -> None:
    conn.joined.discard(request.conversation_id)
    await conn.to_room(request.conversation_id, Leave(conn.peer, ref))


async def create(conn: Any, request: ConversationCreate, ref: str | None) -> None:
    settings, principal = conn.s.settings, conn.principal

    def work(store: Store) -> tuple[dict[str, Any], bool]:
        return store.create_conversation(
            principal.user_id, request.participant_ids, is_service=principal.is_service,
            max_participants=settings.max_participants, now=conn.s.frames.now(),
            per_day=settings.limits.conversations_per_day)

    conversation, created = await conn.s.store.call(work)
    conn.reply("conversation:created", {"conversation": conversation}, ref)
    if created:
        participants = conversation["participant_ids"]
        frame = conn.s.frames.event("conversation:created", {"conversation": conversation})
        await conn.s.presence.send_to_users(participants, frame, except_connection=conn.id)
        await conn.s.presence.add_contacts(participants)


async def list_(conn: Any, request: Empty, ref: str | None) -> None:
    user_id = conn.principal.user_id
    conversations = await conn.s.store.call(lambda store: store.list_conversations(user_id))
    people = {p["id"] for c in conversations for p in c["participants"]}
    online = await conn.s.presence.online(people)
    for conversation in conversations:
        for person in conversation["participants"]:
            person["online"] = online.get(person["id"], False)
    conn.reply("conversation:list", {"conversations": conversations}, ref)
