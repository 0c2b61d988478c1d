"""What each webhook event carries (contract §14), and the ``message.created`` trigger.

The ``*_data`` builders give the ``data`` object of each event type, so every trigger
sends the documented shape (docs/webhooks.md). Timestamps are RFC 3339 strings like the
rest of the protocol. Everything here runs inside the store writer's transaction.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from winkr.clock import iso
from winkr.errors import ProtocolError
from winkr.ratelimit import Rate
from winkr.store.store import Message, SendResult, Store
from winkr.store.webhook_outbox import enqueue

MESSAGE_CREATED = "message.created"
MESSAGE_REPORTED = "message.reported"
USER_BLOCKED = "user.blocked"
CONVERSATION_CLOSED = "conversation.closed"


def message_created_data(recipient_id: str, message: Message, sender: dict[str, Any],
                         unread_count: int) -> dict[str, Any]:
    """``sender`` is ``{"id", "username", "avatar_url"}`` as in ``message:new``."""
    return {"recipient_id": recipient_id, "conversation_id": message["conversation_id"],
            "message": message, "sender": sender, "unread_count": unread_count}


def message_reported_data(report_id: str, reporter_id: str, reason: str, note: str | None,
                          conversation_id: str, snapshot: Message, reported_at: float) -> dict[str, Any]:
    return {"report_id": report_id, "reporter_id": reporter_id, "reason": reason, "note": note,
            "conversation_id": conversation_id, "message": snapshot, "reported_at": iso(reported_at)}


def user_blocked_data(blocker_id: str, blocked_id: str, closed_conversation_ids: Sequence[str],
                      blocked_at: float) -> dict[str, Any]:
    return {"blocker_id": blocker_id, "blocked_id": blocked_id,
            "closed_conversation_ids": list(closed_conversation_ids), "blocked_at": iso(blocked_at)}


def conversation_closed_data(conversation_id: str, closed_by: str, closed_at: float) -> dict[str, Any]:
    """``closed_by`` is a user id or ``"service"``."""
    return {"conversation_id": conversation_id, "closed_by": closed_by, "closed_at": iso(closed_at)}


def insert_messages_with_webhooks(
        store: Store, conversation_id: str, items: list[tuple[str, Any, str | None, list[str]]],
        now: float, rates: tuple[Rate, ...], senders: Sequence[dict[str, Any]],
        unconnected: Collection[str], enabled: Collection[str]) -> list[SendResult | ProtocolError]:
    """``Store.insert_messages``, plus one ``message.created`` per new message for each
    participant in ``unconnected`` (no open connection) other than its sender, in the same
    transaction. ``senders[i]`` is the ``sender`` object of ``items[i]``. A duplicate
    (repeated ``client_message_id``) or a refused message enqueues nothing."""
    results = store.insert_messages(conversation_id, items, now, rates)
    for (sender_id, *_), sender, result in zip(items, senders, results):
        if isinstance(result, ProtocolError) or result.duplicate:
            continue
        for recipient in sorted(unconnected):
            if recipient != sender_id:
                data = message_created_data(recipient, result.message, sender,
                                            store.unread_count(conversation_id, recipient))
                enqueue(store, MESSAGE_CREATED, data, now, enabled)
    return results
