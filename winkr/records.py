"""What the store hands back: plain, immutable values with no wire format in them.

``winkr.protocol.wire`` turns them into the JSON objects of the protocol; the store never
builds a wire dict. Times are wall-clock seconds since the epoch (floats).
"""
from __future__ import annotations

from typing import Any

import attrs

from winkr.errors import FORBIDDEN, NOT_FOUND, ProtocolError


@attrs.frozen
class StoredMessage:
    conversation_id: str
    seq: int
    sender_id: str
    type: str
    content: str
    metadata: dict[str, Any]
    client_message_id: str | None
    created_at: float
    updated_at: float
    is_deleted: bool = False
    is_read: bool = False  # as seen by whoever asked (history marks it per viewer)


@attrs.frozen
class Conversation:
    id: str
    participant_ids: tuple[str, ...]
    created_at: float


@attrs.frozen
class Delivery:
    """The first time a message reached a connection of ``recipient_id``."""

    conversation_id: str
    seq: int
    sender_id: str
    recipient_id: str
    delivered_at: float


@attrs.frozen
class SendItem:
    """One message of a room's send run, as the store receives it."""

    sender_id: str
    type: str
    content: str
    metadata: dict[str, Any]
    client_message_id: str | None
    reached: tuple[str, ...]  # recipients whose joined connections get it as soon as it commits


@attrs.frozen
class SendResult:
    message: StoredMessage
    duplicate: bool  # a repeated client_message_id: the original, nothing stored
    deliveries: tuple[Delivery, ...] = ()


@attrs.frozen
class ReadResult:
    seq: int
    viewed_at: float
    newly_read_senders: tuple[str, ...]
    unread_count: int
    last_message: StoredMessage | None
    ephemeral_expiries: tuple[float, ...]


@attrs.frozen
class UnreadSummary:
    conversation_id: str
    unread_count: int
    last_message: StoredMessage | None


@attrs.frozen
class Person:
    id: str
    username: str
    avatar_url: str | None
    last_seen_at: float | None


@attrs.frozen
class ConversationListing:
    id: str
    participants: tuple[Person, ...]
    unread_count: int
    last_message: StoredMessage | None


def authorize(participants: tuple[str, ...] | None, user_id: str, is_service: bool) -> tuple[str, ...]:
    """The one authorization rule (contract §4, §11.13): the participants, if ``user_id`` may
    act on the conversation; ``NOT_FOUND`` for an unknown one, ``FORBIDDEN`` for others."""
    if participants is None:
        raise ProtocolError(NOT_FOUND, "conversation not found", field="conversation_id")
    if user_id not in participants and not is_service:
        raise ProtocolError(FORBIDDEN, "you are not a participant of this conversation",
                            field="conversation_id")
    return participants
