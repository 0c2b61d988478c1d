"""The synchronous store: every SQL statement of the service lives here.

It runs only inside the store writer's thread (one connection, one owner), so its caches
(participants, last ``seq``) are plain attributes. Methods raise ``ProtocolError`` for what
the client got wrong; the writer rolls that request's savepoint back.
"""
from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable
from typing import Any

import attrs
import orjson

from winkr.clock import iso
from winkr.errors import CONVERSATION_FULL, FORBIDDEN, NOT_FOUND, VALIDATION_ERROR, ProtocolError
from winkr.ratelimit import PERIODS, Rate, gcra, rate_limited

Message = dict[str, Any]
"""A message object exactly as it goes on the wire (contract §5)."""

_MESSAGE_COLUMNS = ("conversation_id, seq, sender_id, type, content, metadata, client_message_id,"
                    " created_at, updated_at, deleted_at")

_UNREAD_SQL = """
SELECT p.user_id,
       ((SELECT coalesce(max(m.seq), 0) FROM messages m WHERE m.conversation_id = p.conversation_id)
        - p.last_read_seq)
       - (SELECT count(*) FROM messages m WHERE m.conversation_id = p.conversation_id
            AND m.sender_id = p.user_id AND m.seq > p.last_read_seq)
       - (SELECT count(*) FROM messages m INDEXED BY messages_deleted  -- else it scans every unread
            WHERE m.conversation_id = p.conversation_id  -- message (327 us at 5000 unread, 4 us so)
            AND m.deleted_at IS NOT NULL AND m.sender_id != p.user_id AND m.seq > p.last_read_seq)
FROM participants p
WHERE p.conversation_id = ?"""


@attrs.frozen
class Delivery:
    message_id: str
    conversation_id: str
    sender_id: str
    recipient_id: str
    delivered_at: float


@attrs.frozen
class SendResult:
    message: Message
    duplicate: bool
    deliveries: tuple[Delivery, ...] = ()


@attrs.frozen
class ReadResult:
    seq: int
    viewed_at: float
    newly_read_senders: tuple[str, ...]
    unread_count: int
    ephemeral_expiries: tuple[float, ...]


@attrs.frozen
class UnreadSummary:
    conversation_id: str
    unread_count: int
    last_message: Message | None


def message_id(conversation_id: str, seq: int) -> str:
    return f"{conversation_id}.{seq}"


def parse_message_id(conversation_id: str, message_id: str) -> int | None:
    """The ``seq`` a message id names within this conversation, if it does."""
    prefix, dot, seq = message_id.rpartition(".")
    if not dot or prefix != conversation_id or not seq.isdigit() or len(seq) > 18:
        return None
    return int(seq)


def _message(row: tuple[Any, ...], is_read: bool = False) -> Message:
    (conv, seq, sender, type_, content, metadata, cmid, created, updated, deleted) = row
    message: Message = {
        "id": message_id(conv, seq), "conversation_id": conv, "seq": seq, "sender_id": sender, "type": type_,
        "content": content, "metadata": orjson.loads(metadata), "created_at": iso(created),
        "updated_at": iso(updated), "is_read": is_read, "is_deleted": deleted is not None,
    }
    if cmid is not None:
        message["client_message_id"] = cmid
    return message


def last_message_summary(message: Message) -> Message:
    """The short form used in ``conversation:unread`` and ``conversation:list``."""
    return {key: message[key] for key in
            ("id", "seq", "content", "type", "sender_id", "created_at", "is_deleted")}


class Store:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._participants: dict[str, tuple[str, ...]] = {}
        self._last_seq: dict[str, int] = {}

    def forget_caches(self) -> None:
        """After a failed COMMIT the caches may be ahead of the database."""
        self._participants.clear()
        self._last_seq.clear()

    # --- users and conversations -------------------------------------------------------

    def upsert_user(self, user_id: str, username: str, avatar_url: str | None) -> None:
        self.db.execute(
            "INSERT INTO users (id, username, avatar_url) VALUES (?, ?, ?) ON CONFLICT (id) DO "
            "UPDATE SET username = excluded.username, avatar_url = excluded.avatar_url",
            (user_id, username, avatar_url))

    def touch_last_seen(self, user_id: str, now: float) -> None:
        self.db.execute("UPDATE users SET last_seen_at = ? WHERE id = ?", (now, user_id))

    def contacts(self, user_id: str) -> set[str]:
        """Users who share at least one conversation with ``user_id``."""
        rows = self.db.execute(
            "SELECT DISTINCT o.user_id FROM participants p JOIN participants o "
            "ON o.conversation_id = p.conversation_id WHERE p.user_id = ? AND o.user_id != ?",
            (user_id, user_id))
        return {row[0] for row in rows}

    def participants(self, conversation_id: str) -> tuple[str, ...] | None:
        cached = self._participants.get(conversation_id)
        if cached is None:
            rows = self.db.execute("SELECT user_id FROM participants WHERE conversation_id = ? "
                                   "ORDER BY user_id", (conversation_id,)).fetchall()
            if not rows:
                return None
            cached = self._participants[conversation_id] = tuple(row[0] for row in rows)
        return cached

    def authorize(self, conversation_id: str, user_id: str, is_service: bool = False) -> tuple[str, ...]:
        """The participants, if ``user_id`` may act on the conversation."""
        participants = self.participants(conversation_id)
        if participants is None:
            raise ProtocolError(NOT_FOUND, "conversation not found", field="conversation_id")
        if user_id not in participants and not is_service:
            raise ProtocolError(FORBIDDEN, "you are not a participant of this conversation",
                                field="conversation_id")
        return participants

    def create_conversation(self, creator: str, others: Iterable[str], *, is_service: bool,
                            max_participants: int, now: float,
                            per_day: int = 0) -> tuple[dict[str, Any], bool]:
        """Create (or, for two people, find) a conversation. Returns ``(conversation, created)``."""
        members = set(others) if is_service else {creator, *others}
        if len(members) < 2:
            raise ProtocolError(VALIDATION_ERROR, "a conversation needs at least two different users",
                                field="participant_ids")
        if max_participants and len(members) > max_participants:
            raise ProtocolError(CONVERSATION_FULL,
                                f"a conversation has at most {max_participants} participants",
                                field="participant_ids")
        ordered = sorted(members)
        pair_key = "\x1f".join(ordered) if len(ordered) == 2 else None
        if pair_key is not None:
            row = self.db.execute("SELECT id, created_at FROM conversations WHERE pair_key = ?",
                                  (pair_key,)).fetchone()
            if row is not None:
                return self._conversation(row[0], ordered, row[1]), False
        if per_day:
            self._count_conversation(creator, per_day, now)
        conversation_id = str(uuid.uuid4())
        self.db.execute("INSERT INTO conversations (id, created_at, created_by, pair_key) "
                        "VALUES (?, ?, ?, ?)", (conversation_id, now, creator, pair_key))
        self.db.executemany("INSERT INTO participants (conversation_id, user_id) VALUES (?, ?)",
                            [(conversation_id, user) for user in ordered])
        for user in ordered:
            self.db.execute("INSERT OR IGNORE INTO users (id, username) VALUES (?, ?)", (user, user))
        return self._conversation(conversation_id, ordered, now), True

    @staticmethod
    def _conversation(conversation_id: str, participants: list[str], created_at: float) -> dict[str, Any]:
        return {"id": conversation_id, "participant_ids": participants, "created_at": iso(created_at)}

    # --- messages ----------------------------------------------------------------------

    def _next_seq(self, conversation_id: str) -> int:
        last = self._last_seq.get(conversation_id)
        if last is None:
            last = self.db.execute("SELECT coalesce(max(seq), 0) FROM messages WHERE conversation_id = ?",
                                   (conversation_id,)).fetchone()[0]
        return last + 1

    def insert_message(self, conversation_id: str, sender_id: str, type_: str, content: str,
                       metadata: dict[str, Any], client_message_id: str | None,
                       now: float, rates: tuple[Rate, ...] = ()) -> SendResult:
        """Store a message with the next ``seq``; a repeated ``client_message_id`` returns the
        original and stores nothing. ``rates`` are the sender's message limits: checked and
        counted here, in the same transaction, so they hold across restarts."""
        if client_message_id is not None:
            row = self.db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND sender_id = ? "
                "AND client_message_id = ?", (conversation_id, sender_id, client_message_id)).fetchone()
            if row is not None:
                return SendResult(_message(row), True)
        if rates:
            self._count_messages(sender_id, rates, now)
        seq = self._next_seq(conversation_id)
        self.db.execute(
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (conversation_id, seq, sender_id, type_, content, orjson.dumps(metadata).decode(),
             client_message_id, now, now))
        self._last_seq[conversation_id] = seq
        created = iso(now)
        message: Message = {
            "id": message_id(conversation_id, seq), "conversation_id": conversation_id, "seq": seq,
            "sender_id": sender_id,
            "type": type_, "content": content, "metadata": metadata, "created_at": created,
            "updated_at": created, "is_read": False, "is_deleted": False,
        }
        if client_message_id is not None:
            message["client_message_id"] = client_message_id
        return SendResult(message, False)

    def insert_messages(self, conversation_id: str, items: list[tuple[str, Any, str | None, list[str]]],
                        now: float, rates: tuple[Rate, ...] = ()) -> list[SendResult | ProtocolError]:
        """Several ``insert_message`` calls in one request: ``items`` are (sender, checked
        message, client_message_id, recipients reached at once). A refusal (rate limit)
        writes nothing, so it needs no savepoint; it is returned in its place."""
        results: list[SendResult | ProtocolError] = []
        for sender_id, m, client_message_id, reached in items:
            try:
                result = self.insert_message(conversation_id, sender_id, m.type, m.content,
                                             m.metadata, client_message_id, now, rates)
            except ProtocolError as exc:
                results.append(exc)
                continue
            if not result.duplicate and reached:
                result = attrs.evolve(result, deliveries=tuple(
                    self.record_delivered_to(result.message, reached, now)))
            results.append(result)
        return results

    def unread_count(self, conversation_id: str, user_id: str) -> int:
        row = self.db.execute(_UNREAD_SQL + " AND p.user_id = ?", (conversation_id, user_id)).fetchone()
        return row[1] if row else 0

    def unread_counts(self, conversation_id: str, user_ids: Iterable[str]) -> dict[str, int]:
        return {user: self.unread_count(conversation_id, user) for user in user_ids}

    def _message_seq(self, conversation_id: str, message_id: str) -> tuple[int, float | None]:
        seq = parse_message_id(conversation_id, message_id)
        row = None if seq is None else self.db.execute(
            "SELECT deleted_at FROM messages WHERE conversation_id = ? AND seq = ?",
            (conversation_id, seq)).fetchone()
        if seq is None or row is None:
            raise ProtocolError(NOT_FOUND, "message not found", field="message_id")
        return seq, row[0]

    def read_up_to(self, conversation_id: str, reader: str, message_id: str, now: float) -> ReadResult:
        """Mark every message up to ``message_id`` not sent by ``reader`` as read by them."""
        seq, _ = self._message_seq(conversation_id, message_id)
        row = self.db.execute("SELECT last_read_seq FROM participants WHERE conversation_id = ? AND "
                              "user_id = ?", (conversation_id, reader)).fetchone()
        if row is None:  # a service account: it may post, but it has no read position
            raise ProtocolError(FORBIDDEN, "only participants can mark messages read",
                                field="conversation_id")
        old = row[0]
        if seq <= old:
            return ReadResult(seq, now, (), self.unread_count(conversation_id, reader), ())
        senders = tuple(row[0] for row in self.db.execute(
            "SELECT DISTINCT sender_id FROM messages WHERE conversation_id = ? AND seq > ? AND seq <= ? "
            "AND sender_id != ?", (conversation_id, old, seq, reader)))
        expiries = tuple(row[0] for row in self.db.execute(
            "UPDATE messages SET expires_at = ? + coalesce(json_extract(metadata, '$.ttl_seconds'), 10) "
            "WHERE conversation_id = ? AND seq > ? AND seq <= ? AND sender_id != ? "
            "AND type = 'photo_ephemeral' AND deleted_at IS NULL AND expires_at IS NULL "
            "RETURNING expires_at", (now, conversation_id, old, seq, reader)))
        self.db.execute("UPDATE participants SET last_read_seq = ? WHERE conversation_id = ? AND user_id = ?",
                        (seq, conversation_id, reader))
        return ReadResult(seq, now, senders, self.unread_count(conversation_id, reader), expiries)

    def delete_message(self, conversation_id: str, message_id: str, deleted_by: str, now: float) -> float:
        """Erase content and metadata, keep a tombstone. Returns ``deleted_at``."""
        seq, deleted_at = self._message_seq(conversation_id, message_id)
        if deleted_at is not None:
            raise ProtocolError(NOT_FOUND, "message already deleted", field="message_id")
        self.db.execute("UPDATE messages SET content = '', metadata = '{}', deleted_at = ?, deleted_by = ?, "
                        "expires_at = NULL, updated_at = ? WHERE conversation_id = ? AND seq = ?",
                        (now, deleted_by, now, conversation_id, seq))
        return now

    def next_expiry(self) -> float | None:
        row = self.db.execute("SELECT min(expires_at) FROM messages WHERE expires_at IS NOT NULL").fetchone()
        expiry: float | None = row[0]
        return expiry

    def expire_due(self, now: float) -> list[tuple[str, str]]:
        """Erase every ephemeral message whose time has come: ``[(conversation_id, message_id)]``."""
        due = [(c, message_id(c, seq)) for c, seq in self.db.execute(
            "SELECT conversation_id, seq FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?",
            (now,)).fetchall()]
        for conversation_id, mid in due:
            self.delete_message(conversation_id, mid, "system", now)
        return due

    def history(self, conversation_id: str, user_id: str, before_seq: int | None,
                after_seq: int | None, limit: int) -> tuple[list[Message], bool]:
        """A page in ascending ``seq`` (contract §11.2) and whether more lie beyond it."""
        where = "conversation_id = ?"
        args: list[Any] = [conversation_id]
        if before_seq is not None:
            where += " AND seq < ?"
            args.append(before_seq)
        if after_seq is not None:
            where += " AND seq > ?"
            args.append(after_seq)
        order = "ASC" if after_seq is not None and before_seq is None else "DESC"
        rows = self.db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where} "
                               f"ORDER BY seq {order} LIMIT ?", (*args, limit + 1)).fetchall()
        has_more = len(rows) > limit
        rows = sorted(rows[:limit], key=lambda r: r[1])
        reads = dict(self.db.execute("SELECT user_id, last_read_seq FROM participants WHERE "
                                     "conversation_id = ?", (conversation_id,)).fetchall())
        mine = reads.get(user_id, 0)
        others = max((seq for user, seq in reads.items() if user != user_id), default=0)
        return [_message(row, row[1] <= (others if row[2] == user_id else mine)) for row in rows], has_more

    def last_message(self, conversation_id: str) -> Message | None:
        row = self.db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? "
                              "ORDER BY seq DESC LIMIT 1", (conversation_id,)).fetchone()
        return _message(row) if row else None

    # --- receipts and summaries --------------------------------------------------------

    def record_delivered(self, messages: Iterable[Message], recipient_id: str, now: float) -> list[Delivery]:
        """Record first deliveries to ``recipient_id``; returns only the new ones."""
        fresh = []
        for message in messages:
            if message["sender_id"] == recipient_id or message["is_deleted"]:
                continue
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO deliveries (conversation_id, seq, user_id, delivered_at) "
                "VALUES (?, ?, ?, ?)", (message["conversation_id"], message["seq"], recipient_id, now))
            if cursor.rowcount:
                fresh.append(Delivery(message["id"], message["conversation_id"], message["sender_id"],
                                      recipient_id, now))
        return fresh

    def record_delivered_to(self, message: Message, recipients: Iterable[str], now: float) -> list[Delivery]:
        fresh = []
        for recipient in recipients:
            fresh += self.record_delivered((message,), recipient, now)
        return fresh

    def conversation_ids(self, user_id: str) -> list[str]:
        return [row[0] for row in self.db.execute(
            "SELECT conversation_id FROM participants WHERE user_id = ?", (user_id,))]

    def unread_summaries(self, user_id: str) -> list[UnreadSummary]:
        """Every conversation of ``user_id`` with unread messages, with its last message."""
        found = []
        for conversation_id in self.conversation_ids(user_id):
            count = self.unread_count(conversation_id, user_id)
            if count > 0:
                found.append(UnreadSummary(conversation_id, count, self.last_message(conversation_id)))
        return found

    def list_conversations(self, user_id: str) -> list[dict[str, Any]]:
        result = []
        for conversation_id in self.conversation_ids(user_id):
            people = self.db.execute(
                "SELECT p.user_id, u.username, u.avatar_url, u.last_seen_at FROM participants p "
                "LEFT JOIN users u ON u.id = p.user_id WHERE p.conversation_id = ? ORDER BY p.user_id",
                (conversation_id,)).fetchall()
            last = self.last_message(conversation_id)
            result.append({
                "id": conversation_id,
                "participants": [{"id": uid, "username": name or uid, "avatar_url": avatar,
                                  "last_seen_at": iso(seen) if seen else None} for uid, name, avatar, seen in people],
                "unread_count": self.unread_count(conversation_id, user_id),
                "last_message": last_message_summary(last) if last else None,
            })
        return result

    # --- rate-limit state (GCRA, persisted) --------------------------------------------

    def _count_messages(self, sender_id: str, rates: tuple[Rate, ...], now: float) -> None:
        """Refuse (``RATE_LIMITED``) or count one message against every window."""
        updates = []
        for rate in rates:
            if not rate.count:
                continue
            key = f"{sender_id}\x1fmessages/{rate.period}"
            row = self.db.execute("SELECT tat FROM rate_state WHERE key = ?", (key,)).fetchone()
            allowed, tat, retry_after = gcra(row[0] if row else None, now, rate)
            if not allowed:
                raise rate_limited(rate, retry_after, "messages")
            updates.append((key, tat))
        self.db.executemany("INSERT INTO rate_state (key, tat) VALUES (?, ?) ON CONFLICT (key) "
                            "DO UPDATE SET tat = excluded.tat", updates)

    def _count_conversation(self, creator: str, per_day: int, now: float) -> None:
        """An exact sliding day window, read from the conversations themselves."""
        day = PERIODS["day"]
        rows = self.db.execute("SELECT created_at FROM conversations WHERE created_by = ? AND "
                               "created_at > ? ORDER BY created_at DESC LIMIT ?",
                               (creator, now - day, per_day)).fetchall()
        if len(rows) >= per_day:
            raise rate_limited(Rate(per_day, "day"), rows[-1][0] + day - now, "new conversations")
