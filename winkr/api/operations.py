"""What the server API does, as the service principal, through the same actors and handler
code as the WebSocket path: the store writer for reads and writes, the conversation's room
for anything that must be ordered with its messages (system messages, closing), presence for
who is connected. Nothing here touches the database behind an actor's back, and nothing
builds a wire dict by hand (``winkr.protocol.wire`` does).

Every function raises ``ProtocolError`` for what the caller got wrong; ``winkr.api.app``
maps its code to an HTTP status.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import attrs

from winkr.actor import Reply
from winkr.clock import iso
from winkr.errors import INVALID_MESSAGE_TYPE, NOT_FOUND, VALIDATION_ERROR, ProtocolError
from winkr.handlers import conversations, safety
from winkr.handlers.context import RoomCall
from winkr.handlers.registry import ROUTES
from winkr.outbox import Outbox
from winkr.peer import Peer
from winkr.policy import check_message
from winkr.protocol.requests import ApiSystemMessage, ConversationRef, Id, MessageSend
from winkr.protocol.wire import conversation_object, conversation_state_object, message_object
from winkr.records import ClosedConversation, SendResult, StoredMessage
from winkr.room import send_to_room
from winkr.services import Services
from winkr.store.store import Store

SYSTEM_SENDER = "system"
"""``sender_id`` of the server API's messages (contract §13)."""
DISCONNECT_REASON = "disconnected"  # close code 4004 (winkr.connection.CLOSE_CODES)

Json = dict[str, Any]


def service_peer() -> Peer:
    """The server API as a room sees it: a service principal whose answers come back through
    ``RoomCall.outcome``; its outbox is closed, so frames addressed to it go nowhere."""
    outbox = Outbox(1, 1, 0)
    outbox.close()
    return Peer(f"api-{secrets.token_hex(6)}", SYSTEM_SENDER, SYSTEM_SENDER, None, True, outbox)


async def _in_room(services: Services, conversation_id: str, event: str, request: Any,
                   prepared: object = None) -> Any:
    """Hand one call to the conversation's room, as a client's would be, and wait for the
    handler's result (or its error)."""
    outcome: Reply[Any] = Reply()
    call = RoomCall(ROUTES[event], service_peer(), request, None, prepared, outcome=outcome)
    await send_to_room(services.hub.room, conversation_id, call)
    return await outcome.wait()


@attrs.frozen
class Created:
    conversation: Json
    created: bool


async def create_conversation(services: Services, participant_ids: Sequence[str]) -> Created:
    """Create (or find the open two-person) conversation for these users; not counted toward
    anyone's daily limit. ``FORBIDDEN`` for a blocked pair, ``CONVERSATION_FULL`` above
    ``max_participants``."""
    conversation, created = await conversations.create_conversation(
        services, SYSTEM_SENDER, participant_ids, is_service=True, per_day=0)
    return Created(conversation_object(conversation), created)


async def get_conversation(services: Services, conversation_id: str) -> Json:
    """The conversation, open or closed (``closed_at``); ``NOT_FOUND``."""
    state = await services.store.call(lambda store: store.conversation_state(conversation_id))
    return conversation_state_object(state)


async def close_conversation(services: Services, conversation_id: str) -> None:
    """Close it as an unmatch (§12), ``closed_by: "service"``; closing a closed one again is
    fine; ``NOT_FOUND`` for an unknown id."""
    try:
        closed = await _in_room(services, conversation_id, "conversation:close",
                                ConversationRef(Id(conversation_id)))
        assert isinstance(closed, ClosedConversation)
    except ProtocolError as exc:
        if exc.code != NOT_FOUND:
            raise
        await get_conversation(services, conversation_id)  # NOT_FOUND unless it exists (then: closed)


@attrs.frozen
class Posted:
    message: Json
    duplicate: bool  # a repeated client_message_id: the original


async def post_system_message(services: Services, conversation_id: str, body: ApiSystemMessage) -> Posted:
    """A ``system`` message from ``"system"``, through the room like any sent message (one
    ``seq``, the same fan-out, unread counts and receipts). ``INVALID_MESSAGE_TYPE`` for
    another type; ``NOT_FOUND`` for an unknown or closed conversation."""
    if isinstance(body.type, str) and body.type != "system":
        raise ProtocolError(INVALID_MESSAGE_TYPE, "the server API posts only system messages (type \"system\")",
                            field="type")
    checked = check_message(body.type, body.content, body.metadata, is_service=True, settings=services.policy)
    request = MessageSend(Id(conversation_id), checked.type, checked.content, checked.metadata,
                          body.client_message_id)
    result = await _in_room(services, conversation_id, "message:send", request, checked)
    assert isinstance(result, SendResult)
    return Posted(message_object(result.message), result.duplicate)


async def history(services: Services, conversation_id: str, before_seq: int | None, after_seq: int | None,
                  limit: int) -> tuple[list[Json], bool]:
    """A page as ``message:history`` (contract §11.2); the backend may read a closed
    conversation too (moderation). Reading is not a delivery."""
    def work(store: Store) -> tuple[list[StoredMessage], bool]:
        store.authorize(conversation_id, SYSTEM_SENDER, is_service=True, closed_ok=True)
        return store.history(conversation_id, SYSTEM_SENDER, before_seq, after_seq, limit)

    messages, has_more = await services.store.call(work)
    return [message_object(m) for m in messages], has_more


async def disconnect_user(services: Services, user_id: str, revoke_tokens: bool) -> int:
    """Close every open connection of the user with ``disconnected`` (4004); with
    ``revoke_tokens``, first refuse every token issued until now (durably). Returns how many
    connections were asked to close."""
    if revoke_tokens:
        await services.revocations.revoke(user_id, services.frames.now())
    return await services.presence.close_user(user_id, DISCONNECT_REASON)


async def presence(services: Services, user_id: str) -> Json:
    """The truth about the user's presence, whatever their settings."""
    truth = await services.presence.inspect(user_id)
    last_seen = await services.store.call(lambda store: store.last_seen_at(user_id))
    return {"user_id": user_id, "online": truth.online, "status": truth.status,
            "last_seen_at": iso(last_seen) if last_seen is not None else None, "connections": truth.connections}


async def user_conversations(services: Services, user_id: str) -> list[Json]:
    """``conversation:list`` as ``user_id`` would get it."""
    return await conversations.conversation_listing(services, user_id)


async def block(services: Services, blocker: str, blocked: str) -> Json:
    """As if ``blocker`` had sent ``user:block``: the data of its ``user:blocked`` reply."""
    if blocker == blocked:
        raise ProtocolError(VALIDATION_ERROR, "a user cannot block themself", field="user_id")
    result = await safety.block_user(services, blocker, blocked)
    return {"user_id": blocked, "blocked_at": iso(result.blocked_at)}


async def unblock(services: Services, blocker: str, blocked: str) -> None:
    await safety.unblock_user(services, blocker, blocked)
