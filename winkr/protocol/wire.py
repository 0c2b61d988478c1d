"""The JSON objects of the protocol, built from the store's records (contract §4, §5).

One place knows the wire shape of a message, a conversation and a receipt; everything that
sends one calls these. Pure functions.
"""
from __future__ import annotations

from typing import Any

from winkr.clock import iso
from winkr.ids import message_id
from winkr.records import (
    Conversation,
    ConversationListing,
    ConversationState,
    Delivery,
    Report,
    StoredMessage,
    UserSettings,
)

Json = dict[str, Any]


def message_object(message: StoredMessage) -> Json:
    """The message object of ``message:new`` and ``message:history`` (contract §5)."""
    created = iso(message.created_at)
    obj: Json = {
        "id": message_id(message.conversation_id, message.seq), "conversation_id": message.conversation_id,
        "seq": message.seq, "sender_id": message.sender_id, "type": message.type, "content": message.content,
        "metadata": message.metadata, "created_at": created,
        "updated_at": created if message.updated_at == message.created_at else iso(message.updated_at),
        "is_read": message.is_read, "is_deleted": message.is_deleted,
    }
    if message.client_message_id is not None:
        obj["client_message_id"] = message.client_message_id
    return obj


def message_summary(message: StoredMessage | None) -> Json | None:
    """The short form in ``conversation:unread`` and ``conversation:list``."""
    if message is None:
        return None
    return {"id": message_id(message.conversation_id, message.seq), "seq": message.seq,
            "content": message.content, "type": message.type, "sender_id": message.sender_id,
            "created_at": iso(message.created_at), "is_deleted": message.is_deleted}


def conversation_object(conversation: Conversation) -> Json:
    return {"id": conversation.id, "participant_ids": list(conversation.participant_ids),
            "created_at": iso(conversation.created_at)}


def sender_object(user_id: str, username: str, avatar_url: str | None) -> Json:
    return {"id": user_id, "username": username, "avatar_url": avatar_url}


def delivered_data(delivery: Delivery) -> Json:
    return {"message_id": message_id(delivery.conversation_id, delivery.seq),
            "conversation_id": delivery.conversation_id, "recipient_id": delivery.recipient_id,
            "delivered_at": iso(delivery.delivered_at)}


def unread_data(conversation_id: str, unread_count: int, last_message: StoredMessage | None) -> Json:
    return {"conversation_id": conversation_id, "unread_count": unread_count,
            "last_message": message_summary(last_message)}


def listing_object(listing: ConversationListing, online: dict[str, bool]) -> Json:
    """One entry of ``conversation:list``; ``online`` says who is visibly online. A person
    hidden from the viewer (§12) is offline with no last-seen time."""
    return {
        "id": listing.id,
        "participants": [{"id": p.id, "username": p.username, "avatar_url": p.avatar_url,
                          "online": online.get(p.id, False) and not p.hidden,
                          "last_seen_at": iso(p.last_seen_at) if p.last_seen_at is not None and not p.hidden
                          else None}
                         for p in listing.participants],
        "unread_count": listing.unread_count,
        "last_message": message_summary(listing.last_message),
    }


# --- safety between users (contract §12) ------------------------------------------------------

CLOSE_REASON = "unmatched"
"""The one reason a closed conversation gives, whoever closed it (the blocked learn no more)."""


def closed_data(conversation_id: str, closed_at: float) -> Json:
    """``conversation:closed``."""
    return {"conversation_id": conversation_id, "reason": CLOSE_REASON, "closed_at": iso(closed_at)}


def settings_object(settings: UserSettings) -> Json:
    """The ``settings`` of ``connection:established``."""
    return {"read_receipts": settings.read_receipts, "online_status": settings.online_status}


def report_reply(report: Report) -> Json:
    """``message:reported``."""
    return {"report_id": report.id, "conversation_id": report.message.conversation_id,
            "message_id": message_id(report.message.conversation_id, report.message.seq),
            "reported_at": iso(report.reported_at)}


# --- the server API (contract §13) ---------------------------------------------------------------

def conversation_state_object(state: ConversationState) -> Json:
    """``GET /v1/conversations/{id}``."""
    return {"id": state.id, "participant_ids": list(state.participant_ids), "created_at": iso(state.created_at),
            "closed_at": iso(state.closed_at) if state.closed_at is not None else None, "last_seq": state.last_seq}
