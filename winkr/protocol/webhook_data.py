"""What each webhook event carries (contract §14): the ``data`` object of every event type,
built from the store's records so every trigger sends the documented shape
(docs/webhooks.md). Timestamps are RFC 3339 strings like the rest of the protocol. Pure."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from winkr.clock import iso
from winkr.protocol.wire import message_object
from winkr.records import StoredMessage

MESSAGE_CREATED = "message.created"
MESSAGE_REPORTED = "message.reported"
USER_BLOCKED = "user.blocked"
CONVERSATION_CLOSED = "conversation.closed"

Json = dict[str, Any]


def message_created_data(recipient_id: str, message: StoredMessage, sender: Json, unread_count: int) -> Json:
    """``sender`` is ``{"id", "username", "avatar_url"}`` as in ``message:new``."""
    return {"recipient_id": recipient_id, "conversation_id": message.conversation_id,
            "message": message_object(message), "sender": sender, "unread_count": unread_count}


def message_reported_data(report_id: str, reporter_id: str, reason: str, note: str | None,
                          conversation_id: str, snapshot: Json, reported_at: float) -> Json:
    """``snapshot`` is the reported message as stored when it was reported (a message object)."""
    return {"report_id": report_id, "reporter_id": reporter_id, "reason": reason, "note": note,
            "conversation_id": conversation_id, "message": snapshot, "reported_at": iso(reported_at)}


def user_blocked_data(blocker_id: str, blocked_id: str, closed_conversation_ids: Sequence[str],
                      blocked_at: float) -> Json:
    return {"blocker_id": blocker_id, "blocked_id": blocked_id,
            "closed_conversation_ids": list(closed_conversation_ids), "blocked_at": iso(blocked_at)}


def conversation_closed_data(conversation_id: str, closed_by: str, closed_at: float) -> Json:
    """``closed_by`` is a user id or ``"service"``."""
    return {"conversation_id": conversation_id, "closed_by": closed_by, "closed_at": iso(closed_at)}
