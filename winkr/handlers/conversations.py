"""conversation:join, conversation:leave (in the room), conversation:create and
conversation:list (on the connection)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from winkr.actor import Reply
from winkr.clock import iso
from winkr.handlers.context import ConnectionContext, RoomCall, RoomContext, Route
from winkr.protocol.requests import ConversationCreate, ConversationRef, Empty
from winkr.protocol.wire import conversation_object, listing_object
from winkr.records import Conversation, ConversationListing
from winkr.store.store import Store

if TYPE_CHECKING:
    from winkr.services import Services


LIST_UNIT = 5
"""Conversations in a ``conversation:list`` reply per unit of the inbound budget charged after it."""


async def join(conn: ConnectionContext, request: ConversationRef, ref: str | None) -> None:
    """On the connection: within its join budget, ask the room; a refused id is not kept.
    The room is recorded before asking: a connection that ends while the room has the join
    in its inbox then departs after it (the room's inbox keeps the order), and no dead member
    stays in the room."""
    conn.check_can_join(request.conversation_id)
    newly = conn.joined_room(request.conversation_id)
    accepted: Reply[bool] = Reply()
    try:
        await conn.to_room(request.conversation_id, RoomCall(JOIN_IN_ROOM, conn.peer, request, ref,
                                                             outcome=accepted))
    except BaseException:
        if newly:  # never reached the room's inbox: nothing to depart from
            conn.left_room(request.conversation_id)
        raise
    if not await accepted.wait() and newly:
        conn.left_room(request.conversation_id)


async def _join_in_room(room: RoomContext, call: RoomCall) -> None:
    try:
        room.authorize(call.peer)
        room.add_member(call.peer)
    except BaseException:
        if call.outcome is not None:
            call.outcome.set(False)
        raise
    if call.outcome is not None:
        call.outcome.set(True)
    call.peer.deliver(room.frames.event("conversation:joined", {
        "conversation_id": room.id, "joined_at": iso(room.frames.now())}, call.ref))


JOIN_IN_ROOM = Route("conversation:join", ConversationRef, in_room=_join_in_room)
"""The room half of ``conversation:join`` (the registry routes the event to ``join``)."""


async def forget_room(conn: ConnectionContext, request: ConversationRef) -> None:
    """On the connection, before ``conversation:leave`` reaches the room."""
    conn.left_room(request.conversation_id)


async def leave_in_room(room: RoomContext, call: RoomCall) -> None:
    room.authorize(call.peer)
    room.remove_member(call.peer)
    call.peer.deliver(room.frames.event("conversation:left", {
        "conversation_id": room.id, "left_at": iso(room.frames.now())}, call.ref))


async def create_conversation(services: Services, creator: str, participant_ids: Sequence[str], *,
                              is_service: bool, per_day: int, except_connection: str | None = None,
                              reply: Any = None) -> tuple[Conversation, bool]:
    """Create (or, for two people, find the open) conversation; when created, every connection
    of its participants but ``except_connection`` gets ``conversation:created`` and they become
    contacts. ``reply`` (awaited with the conversation's data first) answers the requester.
    Shared by ``conversation:create`` and the server API."""
    settings, now = services.settings, services.frames.now()

    def work(store: Store) -> tuple[Conversation, bool]:
        return store.create_conversation(creator, participant_ids, is_service=is_service,
                                         max_participants=settings.max_participants, now=now, per_day=per_day)

    conversation, created = await services.store.call(work)
    data = {"conversation": conversation_object(conversation)}
    if reply is not None:
        await reply(data)
    if created:
        await services.presence.send_to_users(conversation.participant_ids, services.frames.event(
            "conversation:created", data), except_connection=except_connection)
        await services.presence.add_contacts(conversation.participant_ids)
    return conversation, created


async def create(conn: ConnectionContext, request: ConversationCreate, ref: str | None) -> None:
    """Create (or find) a conversation; its participants' other connections are told."""
    async def answer(data: dict[str, Any]) -> None:
        await conn.reply("conversation:created", data, ref)

    await create_conversation(conn.services, conn.principal.user_id, request.participant_ids,
                              is_service=conn.principal.is_service,
                              per_day=conn.services.settings.limits.conversations_per_day,
                              except_connection=conn.id, reply=answer)


async def conversation_listing(services: Services, user_id: str) -> list[dict[str, Any]]:
    """The entries of ``conversation:list`` for ``user_id`` (open conversations, participants'
    visible presence, unread counts, last messages). Shared with the server API."""
    def work(store: Store) -> list[ConversationListing]:
        return store.list_conversations(user_id)

    listings = await services.readers.call(work)  # a pure read: beside the writer, not in its queue
    online = await services.presence.online({p.id for c in listings for p in c.participants})
    return [listing_object(c, online) for c in listings]


async def list_(conn: ConnectionContext, request: Empty, ref: str | None) -> None:
    """The caller's conversations with participants' presence, unread counts and last messages."""
    listing = await conversation_listing(conn.services, conn.principal.user_id)
    # Its cost grows with the user's conversations: one more unit per LIST_UNIT of them.
    conn.charge(len(listing) // LIST_UNIT)
    await conn.reply("conversation:list", {"conversations": listing}, ref)
