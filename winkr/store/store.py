"""The synchronous store: every SQL statement of the service lives here.

It runs on both engines through :class:`winkr.store.engine.Database` (portable SQL with
``?`` placeholders; ``self.db.dialect`` for the few fragments that differ: docs/architecture.md
"Dialect rules"). It runs only inside the store writer's thread (one connection, one owner), so its cache
(participants, which never change once a conversation exists) is a plain attribute. Methods
return the records of ``winkr.records`` — never wire-format dicts — and raise
``ProtocolError`` for what the client got wrong; the writer then rolls back what that request
wrote (its savepoint in a batch of several, the whole transaction when it ran alone), its
``seq`` counter too.
"""
from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from winkr.errors import CONVERSATION_FULL, FORBIDDEN, NOT_FOUND, VALIDATION_ERROR, ProtocolError
from winkr.ids import message_id, pair_key, parse_message_id
from winkr.ratelimit import PERIODS, Rate, gcra, rate_limited
from winkr.records import (
    Conversation,
    ConversationListing,
    Delivery,
    Person,
    ReadResult,
    SendItem,
    SendResult,
    StoredMessage,
    UnreadSummary,
    authorize,
)
from winkr.store.engine import Database, SqliteDatabase, one_at_a_time
from winkr.store.safety import SafetyQueries

_MESSAGE_COLUMNS = ("conversation_id, seq, sender_id, type, content, metadata, client_message_id,"
                    " created_at, updated_at, deleted_at")

# Unread = what the others sent after my read position, minus what they deleted. `seq` has no
# gaps by construction (the counter moves in the insert's own transaction), so the count of
# messages after my position is `last_seq - last_read_seq`. One row per participant row that
# the WHERE clause picks: (key column, count).
_UNREAD_SQL = """
SELECT p.{key},
       (c.last_seq - p.last_read_seq)
       - (SELECT count(*) FROM messages m WHERE m.conversation_id = p.conversation_id
            AND m.sender_id = p.user_id AND m.seq > p.last_read_seq)
       - (SELECT count(*) FROM messages m INDEXED BY messages_deleted  -- else it scans every unread
            WHERE m.conversation_id = p.conversation_id  -- message (327 us at 5000 unread, 4 us so)
            AND m.deleted_at IS NOT NULL AND m.sender_id != p.user_id AND m.seq > p.last_read_seq)
FROM participants p JOIN conversations c ON c.id = p.conversation_id
WHERE {where}"""
_UNREAD_IN_CONVERSATION_SQL = _UNREAD_SQL.format(key="user_id", where="p.conversation_id = ? AND p.user_id = ?")
_UNREAD_OF_USER_SQL = _UNREAD_SQL.format(key="conversation_id", where="p.user_id = ? AND c.closed_at IS NULL")

_MESSAGE_COLUMNS_M = ", ".join(f"m.{column.strip()}" for column in _MESSAGE_COLUMNS.split(","))

# Deliveries (issue 10, proposal 5). The message at `seq` was delivered to participant `u` when
# `seq` is at or below u's position, or when a row in `deliveries` says so (a delivery past a
# gap: a history page read out of order, a catch-up's last message). The position is the
# larger of two: `conversations.delivered_seq` (everything up to it is delivered to everyone:
# a quiet conversation's send moves it in the UPDATE that moves last_seq, so it writes no
# delivery at all) and u's own `participants.delivered_seq` (for when someone fell behind).
# Everything up to a position that needs a delivery has one; one's own messages and deleted
# ones never get a delivery (record_delivered skips them), so a position passes over them as if
# they had one. Rows at or below a position say nothing more; they go when a later delivery
# moves the position past a gap.
#
# The position of the participants row being worked on.
_POSITION_SQL = """(SELECT CASE WHEN participants.delivered_seq > c.delivered_seq THEN participants.delivered_seq
    ELSE c.delivered_seq END FROM conversations c WHERE c.id = participants.conversation_id)"""
# Whether the participants row being worked on may move its position to (at least) ?: no
# message after its position and up to ? still needs a delivery to them. For a position already
# at the bound, one index probe.
_NOTHING_MISSING_SQL = f"""NOT EXISTS (
    SELECT 1 FROM messages m WHERE m.conversation_id = participants.conversation_id
      AND m.seq > {_POSITION_SQL} AND m.seq <= ? AND m.sender_id != participants.user_id
      AND m.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.conversation_id =
          m.conversation_id AND d.seq = m.seq AND d.user_id = participants.user_id))"""
# How far the position of user ? can reach from ?: up to the first later message that still
# needs a delivery to them, else to the conversation's last_seq. Parameters: (conversation,
# from seq, user, user, conversation).
_REACHABLE_SQL = """coalesce(
    (SELECT m.seq - 1 FROM messages m WHERE m.conversation_id = ? AND m.seq > ? AND m.sender_id != ?
       AND m.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.conversation_id =
           m.conversation_id AND d.seq = m.seq AND d.user_id = ?)
     ORDER BY m.seq LIMIT 1),
    (SELECT last_seq FROM conversations WHERE id = ?))"""
# A delivery of one message, ? at `seq`, with nothing missing before it (an outside connection,
# another node's room, a catch-up): the position moves onto it and on over what follows it
# already recorded, in one statement; no row is returned when something before it is missing,
# the position is already past it, or a row says it was delivered.
_ADVANCE_SQL = ("UPDATE participants SET delivered_seq = " + _REACHABLE_SQL
                + f" WHERE conversation_id = ? AND user_id = ? AND {_POSITION_SQL} < ? AND NOT EXISTS ("
                  "SELECT 1 FROM deliveries WHERE conversation_id = ? AND seq = ? AND user_id = ?) AND "
                + _NOTHING_MISSING_SQL + " RETURNING delivered_seq")
_INSERT_DELIVERY_SQL = "INSERT INTO deliveries (conversation_id, seq, user_id, delivered_at) VALUES (?, ?, ?, ?)"


_INSERT_SQL = (f"INSERT INTO messages ({_MESSAGE_COLUMNS}, ttl_seconds) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)")
_INSERT_PLAIN_SQL = (f"INSERT INTO messages ({_MESSAGE_COLUMNS}, ttl_seconds) "
                     "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, NULL, NULL)")
# The first statement of a send run, on the conversation's row. PostgreSQL claims the counter
# for the whole run in one round trip (parameters: the run's length; the same if the run
# reaches every participant but each message's sender, else 0; the conversation): the row lock
# that serialises every node's sends into the conversation (an UPDATE that waited works on the
# row as the other node committed it), and the delivery position moves with the counter when it
# was at the counter (every right-hand side reads the row as it was). RETURNING gives the new
# values. SQLite reads them instead (the writer holds the database lock): its RETURNING fills an
# ephemeral table, and the read with a plain UPDATE at the end costs fewer instructions.
_COUNTER_SQL = "SELECT last_seq, delivered_seq FROM conversations WHERE id = ? AND closed_at IS NULL"
_CLAIM_SQL = ("UPDATE conversations SET last_seq = last_seq + ?, delivered_seq = CASE WHEN delivered_seq = last_seq "
              "THEN last_seq + ? ELSE delivered_seq END WHERE id = ? AND closed_at IS NULL "
              "RETURNING last_seq, delivered_seq")


def _message(row: Sequence[Any], is_read: bool = False) -> StoredMessage:
    (conv, seq, sender, type_, content, metadata, cmid, created, updated, deleted) = row
    return StoredMessage(conv, seq, sender, type_, content, orjson.loads(metadata), cmid, created, updated,
                         deleted is not None, is_read)


class Store(SafetyQueries):
    """Every SQL statement; the safety ones (blocks, closing, reports, settings, revocations)
    come from ``SafetyQueries`` (``winkr/store/safety.py``)."""

    def __init__(self, db: Database | sqlite3.Connection) -> None:
        # A bare sqlite3 connection (as open_database returns) is wrapped: its owner's
        # BEGIN IMMEDIATE/COMMIT go through store.db like any other statement.
        self.db: Database = SqliteDatabase(db) if isinstance(db, sqlite3.Connection) else db
        self._participants: dict[str, tuple[str, ...]] = {}

    def forget_caches(self) -> None:
        """After a failed COMMIT the cache may hold conversations that were never stored."""
        self._participants.clear()

    # --- users and conversations -------------------------------------------------------

    def upsert_user(self, user_id: str, username: str, avatar_url: str | None) -> None:
        self.db.execute(
            "INSERT INTO users (id, username, avatar_url) VALUES (?, ?, ?) ON CONFLICT (id) DO "
            "UPDATE SET username = excluded.username, avatar_url = excluded.avatar_url",
            (user_id, username, avatar_url))

    def touch_last_seen(self, user_id: str, now: float) -> None:
        self.db.execute("UPDATE users SET last_seen_at = ? WHERE id = ?", (now, user_id))

    def contacts(self, user_id: str) -> set[str]:
        """Users who share at least one open conversation with ``user_id`` and are not blocked
        either way: who hears of their presence (contract §7, §12)."""
        rows = self.db.execute(
            "SELECT DISTINCT o.user_id FROM participants p JOIN participants o "
            "ON o.conversation_id = p.conversation_id JOIN conversations c ON c.id = p.conversation_id "
            "WHERE p.user_id = ? AND o.user_id != ? AND c.closed_at IS NULL AND NOT EXISTS ("
            "SELECT 1 FROM blocks b WHERE (b.blocker_id = p.user_id AND b.blocked_id = o.user_id) "
            "OR (b.blocker_id = o.user_id AND b.blocked_id = p.user_id))",
            (user_id, user_id))
        return {row[0] for row in rows}

    def presence_card(self, user_id: str) -> tuple[str, set[str]]:
        """(username, contacts) of a user: what an offline announcement needs on a node that
        holds none of the user's connections (the username is the id if never stored)."""
        row = self.db.execute("SELECT username FROM users WHERE id = ?", (user_id,)).fetchone()
        return (str(row[0]) if row else user_id), self.contacts(user_id)

    def participants(self, conversation_id: str) -> tuple[str, ...] | None:
        """The participants (sorted), or ``None`` for a conversation that does not exist."""
        cached = self._participants.get(conversation_id)
        if cached is None:
            rows = self.db.execute("SELECT user_id FROM participants WHERE conversation_id = ? "
                                   "ORDER BY user_id", (conversation_id,)).fetchall()
            if not rows:
                return None
            cached = self._participants[conversation_id] = tuple(row[0] for row in rows)
        return cached

    def authorize(self, conversation_id: str, user_id: str, is_service: bool = False, *,
                  closed_ok: bool = False) -> tuple[str, ...]:
        """The participants, if ``user_id`` may act on the conversation (``records.authorize``);
        a closed one is ``NOT_FOUND`` unless ``closed_ok``."""
        participants = authorize(self.participants(conversation_id), user_id, is_service)
        if not closed_ok:
            self.require_open(conversation_id)
        return participants

    def create_conversation(self, creator: str, others: Iterable[str], *, is_service: bool,
                            max_participants: int, now: float, per_day: int = 0) -> tuple[Conversation, bool]:
        """Create (or, for two people, find) a conversation. Returns ``(conversation, created)``.
        A service account is not a participant (contract §11.13)."""
        members = set(others) if is_service else {creator, *others}
        if len(members) < 2:
            raise ProtocolError(VALIDATION_ERROR, "a conversation needs at least two different users",
                                field="participant_ids")
        if max_participants and len(members) > max_participants:
            raise ProtocolError(CONVERSATION_FULL,
                                f"a conversation has at most {max_participants} participants",
                                field="participant_ids")
        ordered = tuple(sorted(members))
        key = pair_key(*ordered) if len(ordered) == 2 else None
        if key is not None and self.is_blocked_pair(*ordered):
            raise ProtocolError(FORBIDDEN, "these two users cannot have a conversation", field="participant_ids")
        if key is not None:  # only an open conversation has a pair key
            row = self.db.execute("SELECT id, created_at FROM conversations WHERE pair_key = ?",
                                  (key,)).fetchone()
            if row is not None:
                return Conversation(row[0], ordered, row[1]), False
        if per_day:
            self._count_conversation(creator, per_day, now)
        conversation_id = str(uuid.uuid4())
        # ON CONFLICT: another node may have created the pair since the lookup (PostgreSQL waits
        # for its commit on the unique index); then that one is the conversation.
        if self.db.execute("INSERT INTO conversations (id, created_at, created_by, pair_key) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (pair_key) DO NOTHING RETURNING id",
                           (conversation_id, now, creator, key)).fetchone() is None:
            row = self.db.execute("SELECT id, created_at FROM conversations WHERE pair_key = ?", (key,)).fetchone()
            return Conversation(row[0], ordered, row[1]), False
        self.db.executemany("INSERT INTO participants (conversation_id, user_id) VALUES (?, ?)",
                            [(conversation_id, user) for user in ordered])
        self.db.executemany("INSERT INTO users (id, username) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                            [(user, user) for user in ordered])
        return Conversation(conversation_id, ordered, now), True

    # --- messages ----------------------------------------------------------------------

    def last_seq(self, conversation_id: str) -> int:
        row = self.db.execute("SELECT last_seq FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return int(row[0]) if row else 0

    def unread_since(self, user_ids: Sequence[str],
                     since: float) -> list[tuple[str, str, int, StoredMessage | None]]:
        """(conversation, user, unread count, last message) for every conversation of these users
        that got a message from someone else at or after ``since`` (wall-clock seconds): what
        a node re-sends after its bus may have lost events."""
        if not user_ids:
            return []
        marks = ", ".join("?" * len(user_ids))
        rows = self.db.execute(
            "SELECT DISTINCT m.conversation_id, p.user_id FROM messages m JOIN participants p "  # noqa: S608
            f"ON p.conversation_id = m.conversation_id WHERE m.created_at >= ? AND p.user_id IN ({marks}) "
            "AND m.sender_id != p.user_id ORDER BY m.conversation_id, p.user_id",
            (since, *user_ids)).fetchall()
        return [(str(conversation_id), str(user_id), self.unread_count(conversation_id, user_id),
                 self.last_message(conversation_id)) for conversation_id, user_id in rows]

    def last_seqs(self, conversation_ids: Sequence[str]) -> dict[str, int]:
        """``last_seq`` of each conversation that exists (one query)."""
        if not conversation_ids:
            return {}
        marks = ", ".join("?" * len(conversation_ids))
        rows = self.db.execute(f"SELECT id, last_seq FROM conversations WHERE id IN ({marks})",  # noqa: S608
                               tuple(conversation_ids)).fetchall()
        return {str(conversation_id): int(last_seq) for conversation_id, last_seq in rows}

    def insert_message(self, conversation_id: str, item: SendItem, now: float,
                       rates: tuple[Rate, ...] = ()) -> SendResult:
        """Store a message with the next ``seq``; a repeated ``client_message_id`` returns the
        original and stores nothing. ``rates`` are the sender's message limits: checked and
        counted here, in the same transaction, so they hold across restarts."""
        result = self.insert_messages(conversation_id, [item._replace(reached=())], now, rates)[0]
        if isinstance(result, ProtocolError):
            raise result
        return result

    def _insert_locked(self, conversation_id: str, item: SendItem, now: float, rates: tuple[Rate, ...],
                       seq: int) -> SendResult:
        """Store ``item`` at ``seq`` (the conversation is locked; the caller moves its counter)."""
        cmid = item.client_message_id
        if cmid is not None:
            row = self.db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND sender_id = ? "
                "AND client_message_id = ?", (conversation_id, item.sender_id, cmid)).fetchone()
            if row is not None:
                return SendResult(_message(row), True)
        if rates and item.counted:
            self._count_messages(item.sender_id, rates, now)
        metadata = orjson.dumps(item.metadata).decode() if item.metadata else "{}"
        ttl = item.metadata.get("ttl_seconds") if item.type == "photo_ephemeral" else None
        if cmid is None and ttl is None:  # the usual message: no None to bind (sqlite3 adapts each one)
            self.db.execute(_INSERT_PLAIN_SQL, (conversation_id, seq, item.sender_id, item.type, item.content,
                                                metadata, now, now))
        else:
            self.db.execute(_INSERT_SQL, (conversation_id, seq, item.sender_id, item.type, item.content, metadata,
                                          cmid, now, now, ttl))
        message = StoredMessage(conversation_id, seq, item.sender_id, item.type, item.content, item.metadata,
                                cmid, now, now)
        return SendResult(message, False)

    def insert_messages(self, conversation_id: str, items: Sequence[SendItem], now: float,
                        rates: tuple[Rate, ...] = ()) -> list[SendResult | ProtocolError]:
        """A room's run of sends in one request, each with the deliveries to the recipients it
        reaches at once. A refusal (rate limit) writes nothing, so it needs no savepoint; it is
        returned in its place. In a closed conversation every send is ``NOT_FOUND``.

        The run's seqs come from the conversation's counter (``last_seq + 1`` …), read or claimed
        by the run's first statement (``_COUNTER_SQL`` on SQLite, ``_CLAIM_SQL`` on PostgreSQL:
        there the row lock, taken before the idempotency lookup, so a retry sent to two nodes at
        once is stored once). The counter ends where the run's stored messages end, in the same
        transaction as the inserts, and with it the delivery position of a conversation whose
        participants all got the run (``_deliver_new``): one ``UPDATE`` at the end, unless the
        claim already left both there (PostgreSQL, every message stored and reaching everyone).
        On PostgreSQL every statement is a round trip, so a quiet run costs 1 plus 1 per message
        (2 with a ``client_message_id``: the idempotency lookup)."""
        results: list[SendResult | ProtocolError] = []
        if self.db.dialect.update_returning:
            claimed = len(items)
            everyone = claimed if self._reaches_everyone(conversation_id, items) else 0
            row = self.db.execute(_CLAIM_SQL, (claimed, everyone, conversation_id)).fetchone()
        else:  # SQLite: read (the writer holds the database lock), move at the end
            claimed = everyone = 0
            row = self.db.execute(_COUNTER_SQL, (conversation_id,)).fetchone()
        if row is None:  # no such conversation, or closed: gone for everyone (contract §12)
            return [ProtocolError(NOT_FOUND, "conversation not found", field="conversation_id")] * len(items)
        claimed_last, claimed_delivered = int(row[0]), int(row[1])
        last_seq = claimed_last - claimed
        # The position moved with the counter only if it was at the counter (and the run reaches everyone).
        delivered_seq = last_seq if everyone and claimed_delivered == claimed_last else claimed_delivered
        seq = last_seq
        deliveries: list[Delivery] = []
        new: list[tuple[str, tuple[Delivery, ...]]] = []  # each new message's sender and deliveries
        for item in items:
            try:
                result = self._insert_locked(conversation_id, item, now, rates, seq + 1)
            except ProtocolError as exc:
                results.append(exc)
                continue
            if not result.duplicate:
                seq += 1
                reached = tuple([Delivery(conversation_id, seq, item.sender_id, recipient, now)
                                 for recipient in dict.fromkeys(item.reached) if recipient != item.sender_id])
                if reached:  # a message stored just now has no deliveries yet: all of these are first ones
                    result = SendResult(result.message, False, reached)
                    deliveries += reached
                new.append((item.sender_id, reached))
            results.append(result)
        if deliveries:  # else nobody was reached: no position moves
            delivered_seq = self._deliver_new(conversation_id, last_seq, delivered_seq, new, deliveries)
        if seq != claimed_last or delivered_seq != claimed_delivered:
            self.db.execute("UPDATE conversations SET last_seq = ?, delivered_seq = ? WHERE id = ?",
                            (seq, delivered_seq, conversation_id))
        return results

    def _reaches_everyone(self, conversation_id: str, items: Sequence[SendItem]) -> bool:
        """Whether every item reaches every participant but its sender (``_deliver_new``'s
        quiet conversation, told before the run is stored)."""
        participants = self.participants(conversation_id)
        if participants is None:
            return False
        for item in items:
            count = 0
            for recipient in dict.fromkeys(item.reached):
                if recipient != item.sender_id and recipient in participants:
                    count += 1
            if count != len(participants) - (item.sender_id in participants):
                return False
        return True

    def _deliver_new(self, conversation_id: str, last_seq: int, delivered_seq: int,
                     new: Sequence[tuple[str, tuple[Delivery, ...]]], deliveries: Sequence[Delivery]) -> int:
        """Record a run's deliveries (``new``: each new message's sender and deliveries, in seq
        order from ``last_seq + 1``); returns the conversation's new ``delivered_seq``.

        Everything up to ``last_seq`` delivered to everyone, and the run's first messages
        reaching every participant but their sender: the conversation's position moves over
        them and nothing else is written (the quiet conversation). Otherwise each recipient
        with nothing missing up to ``last_seq`` moves their own position over the run's
        messages they got or sent, from its first on (one UPDATE each); when the whole run
        reached everyone, every participant is tried, and if all move, the conversation's
        position catches up. The other deliveries are rows (a recipient behind a gap: their
        history page or catch-up closes it later)."""
        participants = self.participants(conversation_id) or ()
        everyone = 0  # the run's first messages that reached every participant but their sender
        participants_reached = 0
        for sender, reached in new:
            count = 0  # participants reached (all distinct, none the sender): plain loops, on every send
            for delivery in reached:
                if delivery.recipient_id in participants:
                    count += 1
            if count != len(participants) - (sender in participants):
                break
            everyone += 1
            participants_reached += count
        if delivered_seq == last_seq and everyone == len(new):  # the quiet conversation
            if participants_reached != len(deliveries):  # a service account in the room: rows, as ever
                self._delivery_rows([d for d in deliveries if d.recipient_id not in participants])
            return last_seq + everyone
        base, rest = last_seq, new
        if delivered_seq == last_seq:
            base, rest = last_seq + everyone, new[everyone:]
        reach: dict[str, int] = {}  # participant -> how many of `rest`, from its first, they got or sent
        for user in participants:
            count = 0
            for sender, reached in rest:
                if sender != user and all(d.recipient_id != user for d in reached):
                    break
                count += 1
            if count:
                reach[user] = count
        recipients = [user for user in reach if any(d.recipient_id == user for d in deliveries)]
        moved = {user for user in recipients if self._move_position(conversation_id, user, last_seq,
                                                                    base + reach[user])}
        caught_up = False
        if everyone == len(new) and len(moved) == len(recipients):
            # The run reached everyone and every recipient had nothing missing: if the senders
            # have nothing missing either, the conversation's position catches up.
            caught_up = all(self._move_position(conversation_id, user, last_seq, base + reach[user])
                            for user in participants if user not in moved)
        self._delivery_rows([  # a service account in the room has no position: rows, as ever
            d for d in deliveries if d.recipient_id not in participants
            or (d.seq > base and (d.recipient_id not in moved or d.seq > base + reach[d.recipient_id]))])
        if caught_up:
            return last_seq + everyone
        return base if delivered_seq == last_seq else delivered_seq

    def _delivery_rows(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            self.db.executemany(_INSERT_DELIVERY_SQL, [(d.conversation_id, d.seq, d.recipient_id, d.delivered_at)
                                                       for d in deliveries])

    def _move_position(self, conversation_id: str, user: str, last_seq: int, to: int) -> bool:
        """Move ``user``'s own position to ``to`` if nothing before ``last_seq`` is missing.
        On PostgreSQL a row another node's delivery recording holds is passed over (False:
        the caller writes rows) instead of waited for, since that node's batch may go on to
        wait for this conversation's lock, which this transaction holds."""
        whose = "user_id = ?"
        if self.db.dialect.skip_locked:
            whose = (f"user_id IN (SELECT user_id FROM participants WHERE conversation_id = ? AND user_id = ?"
                     f"{self.db.dialect.skip_locked})")
        args = (conversation_id, user) if self.db.dialect.skip_locked else (user,)
        return bool(self.db.execute(
            f"UPDATE participants SET delivered_seq = ? WHERE conversation_id = ? AND {whose} "  # noqa: S608
            f"AND {_NOTHING_MISSING_SQL}", (to, conversation_id, *args, last_seq)).rowcount)

    def unread_count(self, conversation_id: str, user_id: str) -> int:
        row = self.db.execute(_UNREAD_IN_CONVERSATION_SQL, (conversation_id, user_id)).fetchone()
        return int(row[1]) if row else 0

    def unread_counts(self, conversation_id: str, user_ids: Iterable[str]) -> dict[str, int]:
        return {user: self.unread_count(conversation_id, user) for user in user_ids}

    def _message_seq(self, conversation_id: str, message_id_: str, lock: bool = False) -> tuple[int, float | None]:
        """The seq of an existing message and its ``deleted_at`` (row locked until COMMIT with
        ``lock``); ``NOT_FOUND`` otherwise."""
        seq = parse_message_id(conversation_id, message_id_)
        row = None if seq is None else self.db.execute(
            "SELECT deleted_at FROM messages WHERE conversation_id = ? AND seq = ?"
            + (self.db.dialect.for_update if lock else ""), (conversation_id, seq)).fetchone()
        if seq is None or row is None:
            raise ProtocolError(NOT_FOUND, "message not found", field="message_id")
        return seq, row[0]

    def read_up_to(self, conversation_id: str, reader: str, message_id_: str, now: float) -> ReadResult:
        """Mark every message up to ``message_id_`` not sent by ``reader`` as read by them."""
        self.require_open(conversation_id)
        seq, _ = self._message_seq(conversation_id, message_id_)
        row = self.db.execute("SELECT last_read_seq FROM participants WHERE conversation_id = ? AND "
                              "user_id = ?" + self.db.dialect.for_update, (conversation_id, reader)).fetchone()
        if row is None:  # a service account: it may post, but it has no read position
            raise ProtocolError(FORBIDDEN, "only participants can mark messages read",
                                field="conversation_id")
        old = row[0]
        if seq <= old:
            return ReadResult(seq, now, (), self.unread_count(conversation_id, reader), None, ())
        senders = tuple(row[0] for row in self.db.execute(
            "SELECT DISTINCT sender_id FROM messages WHERE conversation_id = ? AND seq > ? AND seq <= ? "
            "AND sender_id != ?", (conversation_id, old, seq, reader)))
        expiries = tuple(row[0] for row in self.db.execute(
            "UPDATE messages SET expires_at = ? + coalesce(ttl_seconds, 10) "
            "WHERE conversation_id = ? AND seq > ? AND seq <= ? AND sender_id != ? "
            "AND type = 'photo_ephemeral' AND deleted_at IS NULL AND expires_at IS NULL "
            "RETURNING expires_at", (now, conversation_id, old, seq, reader)))
        self.db.execute("UPDATE participants SET last_read_seq = ? WHERE conversation_id = ? AND user_id = ?",
                        (seq, conversation_id, reader))
        return ReadResult(seq, now, senders, self.unread_count(conversation_id, reader),
                          self.last_message(conversation_id) if senders else None, expiries)

    def delete_message(self, conversation_id: str, message_id_: str, deleted_by: str, now: float) -> float:
        """Erase content and metadata, keep a tombstone. Returns ``deleted_at``."""
        if deleted_by != "system":  # the reaper still erases ephemeral photos of a closed conversation
            self.require_open(conversation_id)
        seq, deleted_at = self._message_seq(conversation_id, message_id_, lock=True)
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
        # SKIP LOCKED: on PostgreSQL another node's reaper may be erasing some of them right now.
        due = [(c, message_id(c, seq)) for c, seq in self.db.execute(
            "SELECT conversation_id, seq FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?"
            + self.db.dialect.skip_locked, (now,)).fetchall()]
        for conversation_id, mid in due:
            self.delete_message(conversation_id, mid, "system", now)
        return due

    def history(self, conversation_id: str, user_id: str, before_seq: int | None,
                after_seq: int | None, limit: int) -> tuple[list[StoredMessage], bool]:
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
        rows = sorted(rows[:limit], key=lambda r: int(r[1]))
        reads = dict(self.db.execute("SELECT user_id, last_read_seq FROM participants WHERE "
                                     "conversation_id = ?", (conversation_id,)).fetchall())
        mine = reads.get(user_id, 0)
        others = max((seq for user, seq in reads.items() if user != user_id), default=0)
        return [_message(row, row[1] <= (others if row[2] == user_id else mine)) for row in rows], has_more

    def last_message(self, conversation_id: str) -> StoredMessage | None:
        row = self.db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? "
                              "ORDER BY seq DESC LIMIT 1", (conversation_id,)).fetchone()
        return _message(row) if row else None

    def messages_after(self, conversation_id: str, after_seq: int,
                       limit: int) -> list[tuple[StoredMessage, str | None, str | None]]:
        """Up to ``limit`` messages with ``seq > after_seq`` in ``seq`` order, each with its
        sender's stored username and avatar URL (``None`` for a sender never seen, such as
        ``system``): how a room fills a gap the bus left (``seq`` has none, so the first row is
        ``after_seq + 1``)."""
        columns = ", ".join(f"m.{column.strip()}" for column in _MESSAGE_COLUMNS.split(","))
        rows = self.db.execute(
            f"SELECT {columns}, u.username, u.avatar_url FROM messages m LEFT JOIN users u ON u.id = m.sender_id "
            "WHERE m.conversation_id = ? AND m.seq > ? ORDER BY m.seq LIMIT ?",
            (conversation_id, after_seq, limit)).fetchall()
        return [(_message(row[:-2]), row[-2], row[-1]) for row in rows]

    # --- receipts and summaries --------------------------------------------------------

    def record_delivered(self, messages: Iterable[StoredMessage], recipient_id: str, now: float) -> list[Delivery]:
        """Record first deliveries to ``recipient_id``; returns only the new ones, in the order
        given. One's own messages and deleted ones are not deliveries."""
        candidates = [m for m in messages if m.sender_id != recipient_id and not m.is_deleted]
        seqs: dict[str, set[int]] = {}
        for message in candidates:
            seqs.setdefault(message.conversation_id, set()).add(message.seq)
        fresh: set[tuple[str, int]] = set()
        for conversation_id, group in seqs.items():
            fresh.update((conversation_id, seq)
                         for seq in self._record_delivered(conversation_id, sorted(group), recipient_id, now))
        deliveries = []
        for message in candidates:
            key = (message.conversation_id, message.seq)
            if key in fresh:
                fresh.discard(key)  # a message given twice is delivered once
                deliveries.append(Delivery(message.conversation_id, message.seq, message.sender_id, recipient_id, now))
        return deliveries

    def _record_delivered(self, conversation_id: str, seqs: list[int], user: str, now: float) -> list[int]:
        """Record deliveries of the messages at ``seqs`` (ascending; none ``user``'s own or
        deleted) to ``user``; returns the seqs delivered for the first time. On PostgreSQL the
        participant's row is locked until COMMIT, so two nodes recording the same delivery
        see one another's: the first one records it (and sends the receipt), the other gets []."""
        if len(seqs) == 1:  # the usual one: the next message after the position, one statement
            seq = seqs[0]
            row = self.db.execute(_ADVANCE_SQL, (conversation_id, seq, user, user, conversation_id, conversation_id,
                                                 user, seq, conversation_id, seq, user, seq - 1)).fetchone()
            if row is not None:
                if row[0] > seq:
                    self._drop_covered_rows(conversation_id, user, row[0])
                return seqs
        row = self.db.execute("SELECT delivered_seq FROM participants WHERE conversation_id = ? AND user_id = ?"
                              + self.db.dialect.for_update, (conversation_id, user)).fetchone()
        position = 0  # not a participant (no position): rows only
        if row is not None:
            everyone = self.db.execute("SELECT delivered_seq FROM conversations WHERE id = ?",
                                       (conversation_id,)).fetchone()
            position = max(int(row[0]), int(everyone[0]))
        fresh = [seq for seq in seqs if seq > position and self.db.execute(
            _INSERT_DELIVERY_SQL + " ON CONFLICT DO NOTHING", (conversation_id, seq, user, now)).rowcount]
        if fresh and row is not None:
            reachable = self.db.execute("SELECT " + _REACHABLE_SQL, (conversation_id, position, user, user,
                                                                     conversation_id)).fetchone()[0]
            if reachable > position:
                self.db.execute("UPDATE participants SET delivered_seq = ? WHERE conversation_id = ? "
                                "AND user_id = ?", (reachable, conversation_id, user))
                self._drop_covered_rows(conversation_id, user, reachable)
        return fresh

    def _drop_covered_rows(self, conversation_id: str, user: str, position: int) -> None:
        """The user's rows up to their new ``position`` say nothing more."""
        self.db.execute("DELETE FROM deliveries WHERE conversation_id = ? AND seq <= ? AND user_id = ?",
                        (conversation_id, position, user))

    def record_delivered_to(self, message: StoredMessage, recipients: Iterable[str], now: float) -> list[Delivery]:
        fresh = []
        for recipient in recipients:
            fresh += self.record_delivered((message,), recipient, now)
        return fresh

    def _unread_by_conversation(self, user_id: str) -> dict[str, int]:
        """The unread count of every conversation of ``user_id``, in one query."""
        rows = self.db.execute(_UNREAD_OF_USER_SQL, (user_id,)).fetchall()
        return {conversation_id: int(count) for conversation_id, count in rows}

    def _last_messages(self, user_id: str) -> dict[str, StoredMessage]:
        """The last message of every conversation of ``user_id`` that has one, in one query."""
        rows = self.db.execute(
            f"SELECT {_MESSAGE_COLUMNS_M} FROM participants p JOIN conversations c ON c.id = p.conversation_id "
            "JOIN messages m ON m.conversation_id = c.id AND m.seq = c.last_seq "
            "WHERE p.user_id = ? AND c.closed_at IS NULL",
            (user_id,)).fetchall()
        return {row[0]: _message(row) for row in rows}

    def unread_summaries(self, user_id: str) -> list[UnreadSummary]:
        """Every conversation of ``user_id`` with unread messages, with its last message."""
        counts = {c: n for c, n in self._unread_by_conversation(user_id).items() if n > 0}
        if not counts:
            return []
        lasts = self._last_messages(user_id)
        return [UnreadSummary(c, n, lasts.get(c)) for c, n in sorted(counts.items())]

    def list_conversations(self, user_id: str) -> list[ConversationListing]:
        """The user's open conversations: participants (those hidden from the user, §12, marked
        ``hidden``), unread count, last message — five queries whatever their number."""
        people: dict[str, list[tuple[str, str, str | None, float | None]]] = {}
        for conversation_id, uid, name, avatar, seen in self.db.execute(
                "SELECT p.conversation_id, p.user_id, u.username, u.avatar_url, u.last_seen_at "
                "FROM participants me JOIN conversations c ON c.id = me.conversation_id "
                "JOIN participants p ON p.conversation_id = me.conversation_id "
                "LEFT JOIN users u ON u.id = p.user_id WHERE me.user_id = ? AND c.closed_at IS NULL "
                "ORDER BY p.conversation_id, p.user_id", (user_id,)):
            people.setdefault(conversation_id, []).append((uid, name or uid, avatar, seen))
        hidden = self.hidden_from(user_id, {uid for ps in people.values() for uid, *_ in ps})
        counts = self._unread_by_conversation(user_id)
        lasts = self._last_messages(user_id)
        return [ConversationListing(c, tuple(Person(uid, name, avatar, seen, uid in hidden)
                                             for uid, name, avatar, seen in ps), counts.get(c, 0), lasts.get(c))
                for c, ps in people.items()]

    # --- rate-limit state (GCRA, persisted) --------------------------------------------

    def _count_messages(self, sender_id: str, rates: tuple[Rate, ...], now: float) -> None:
        """Refuse (``RATE_LIMITED``) or count one message against every window."""
        updates = []
        for rate in rates:
            if not rate.count:
                continue
            key = f"{sender_id}\x1fmessages/{rate.period}"
            row = self.db.execute("SELECT tat FROM rate_state WHERE key = ?" + self.db.dialect.for_update,
                                  (key,)).fetchone()
            allowed, tat, retry_after = gcra(row[0] if row else None, now, rate)
            if not allowed:
                raise rate_limited(rate, retry_after, "messages")
            updates.append((key, tat))
        self.db.executemany("INSERT INTO rate_state (key, tat) VALUES (?, ?) ON CONFLICT (key) "
                            "DO UPDATE SET tat = excluded.tat", updates)

    def _count_conversation(self, creator: str, per_day: int, now: float) -> None:
        """An exact sliding day window, read from the conversations themselves (one node at a
        time per creator)."""
        one_at_a_time(self.db, f"conversations_per_day\x1f{creator}")
        day = PERIODS["day"]
        rows = self.db.execute("SELECT created_at FROM conversations WHERE created_by = ? AND "
                               "created_at > ? ORDER BY created_at DESC LIMIT ?",
                               (creator, now - day, per_day)).fetchall()
        if len(rows) >= per_day:
            raise rate_limited(Rate(per_day, "day"), rows[-1][0] + day - now, "new conversations")
