"""What the store hands back: plain, immutable values with no wire format in them.

``winkr.protocol.wire`` turns them into the JSON objects of the protocol; the store never
builds a wire dict. Times are wall-clock seconds since the epoch (floats).

The four built for every message (``SendItem``, ``StoredMessage``, ``Delivery``,
``SendResult``) are ``NamedTuple``s, the rest frozen attrs classes: both are immutable and
mypy refuses an assignment to a field of either, but a frozen attrs ``__init__`` sets each
field through ``object.__setattr__`` (a StoredMessage cost ~12.5 k instructions to build,
as a tuple ~4.4 k; the store writer builds three of them per quiet message). Being tuples,
they also compare equal to a plain tuple of the same values and unpack; nothing relies on
either.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import attrs

from winkr.errors import FORBIDDEN, NOT_FOUND, ProtocolError


class StoredMessage(NamedTuple):
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


class Delivery(NamedTuple):
    """The first time a message reached a connection of ``recipient_id``."""

    conversation_id: str
    seq: int
    sender_id: str
    recipient_id: str
    delivered_at: float


class SendItem(NamedTuple):
    """One message of a room's send run, as the store receives it."""

    sender_id: str
    type: str
    content: str
    metadata: dict[str, Any]
    client_message_id: str | None
    reached: tuple[str, ...]  # recipients whose joined connections get it as soon as it commits
    counted: bool = True  # False: not counted against message limits (the server API's system messages)


class SendResult(NamedTuple):
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
    hidden: bool = False  # to this viewer: blocked either way, or online_status off (§12)


@attrs.frozen
class ConversationListing:
    id: str
    participants: tuple[Person, ...]
    unread_count: int
    last_message: StoredMessage | None


@attrs.frozen
class ConversationState:
    """A conversation as the server API shows it (open or closed)."""

    id: str
    participant_ids: tuple[str, ...]
    created_at: float
    closed_at: float | None
    last_seq: int


@attrs.frozen
class UserSettings:
    """A user's privacy settings (contract §12); both on by default."""

    read_receipts: bool = True
    online_status: bool = True
    updated_at: float | None = None  # None: never changed


@attrs.frozen
class ClosedConversation:
    """A conversation a close (unmatch, block, the server API) has just closed."""

    id: str
    participant_ids: tuple[str, ...]
    closed_at: float
    closed_by: str  # a user id or "service"
    uncontacted: tuple[tuple[str, str], ...]  # pairs that no longer share an open conversation


@attrs.frozen
class BlockResult:
    blocker_id: str
    blocked_id: str
    blocked_at: float  # the original time when the pair was already blocked
    created: bool  # False: blocking again (a no-op)
    closed: tuple[ClosedConversation, ...]


@attrs.frozen
class BlockEntry:
    user_id: str
    blocked_at: float


@attrs.frozen
class Report:
    id: str
    reporter_id: str
    reason: str
    note: str | None
    message: StoredMessage  # the snapshot, as stored when reported
    reported_at: float


def authorize(participants: tuple[str, ...] | None, user_id: str, is_service: bool) -> tuple[str, ...]:
    """The one authorization rule (contract §4, §11.13): the participants, if ``user_id`` may
    act on the conversation; ``NOT_FOUND`` for an unknown one, ``FORBIDDEN`` for others."""
    if participants is None:
        raise ProtocolError(NOT_FOUND, "conversation not found", field="conversation_id")
    if user_id not in participants and not is_service:
        raise ProtocolError(FORBIDDEN, "you are not a participant of this conversation",
                            field="conversation_id")
    return participants
