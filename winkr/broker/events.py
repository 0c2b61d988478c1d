"""The bus events' kinds and their JSON data: one builder and one reader per shape, so the
sending and the receiving side cannot drift apart."""
from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from winkr.records import StoredMessage

# c:{conversation}
MESSAGE = "message"  # {"m": stored message, "sender": sender object}
DELETED = "deleted"  # {"message_id", "deleted_by", "deleted_at"}
TYPING = "typing"  # {"user_id", "username", "is_typing"}
CLOSED = "closed"  # {"closed_at"}
# u:{user}
FRAME = "frame"  # {"frame", "except", "key"}: hand to every connection of the user here
RECEIPT = "receipt"  # {"frame", "key"}: message:viewed, unless the user switched read receipts off
COMMITTED = "committed"  # {"m", "participants"}: unread count (and delivery) for connections outside the room
CONTACTS = "contacts"  # {"add": [user]}: these now share a conversation with the user
APART = "apart"  # {"other"}: a block either way
TOGETHER = "together"  # {"other", "still_apart", "contacts"}: an unblock
DROP_CONTACT = "drop_contact"  # {"other"}
SETTINGS = "settings"  # {"read_receipts", "online_status"}
STATUS = "status"  # {"status"}: the user's chosen status (kept by every node holding them)
CLOSE = "close"  # {"reason"}: ask every connection of the user to close
# all
REVOKED = "revoked"  # {"user_id", "at"}


def message_json(message: StoredMessage) -> dict[str, Any]:
    return {"c": message.conversation_id, "s": message.seq, "u": message.sender_id, "t": message.type,
            "x": message.content, "md": message.metadata, "cm": message.client_message_id,
            "ca": message.created_at, "ua": message.updated_at, "d": message.is_deleted}


def message_from_json(data: dict[str, Any]) -> StoredMessage:
    return StoredMessage(str(data["c"]), int(data["s"]), str(data["u"]), str(data["t"]), str(data["x"]),
                         dict(data["md"]), data["cm"], float(data["ca"]), float(data["ua"]), bool(data["d"]))


def key_json(key: Hashable | None) -> Any:
    """A coalescing key (a tuple of strings, or None) as JSON."""
    return list(key) if isinstance(key, tuple) else key


def key_from_json(value: Any) -> Hashable | None:
    return tuple(value) if isinstance(value, list) else value
