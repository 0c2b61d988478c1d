"""The SQL of safety between users (contract §12) and of the server API's reads (§13):
blocks, closing conversations, reports, privacy settings and token revocations.

A mixin of :class:`winkr.store.store.Store` (which inherits it), so that these statements run
on the writer's one connection inside its transactions like every other; kept in its own
module because it is its own subject. Methods return records, never wire dicts, and raise
``ProtocolError`` for what the caller got wrong (the writer then rolls the request back).
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from itertools import combinations
from typing import TYPE_CHECKING, Any

import orjson

from winkr.errors import FORBIDDEN, NOT_FOUND, VALIDATION_ERROR, ProtocolError
from winkr.ids import parse_message_id
from winkr.ratelimit import PERIODS, Rate, rate_limited
from winkr.records import (
    BlockEntry,
    BlockResult,
    ClosedConversation,
    ConversationState,
    Report,
    StoredMessage,
    UserSettings,
)
from winkr.store.engine import Database, one_at_a_time

SERVICE_CLOSER = "service"
"""``closed_by`` of a conversation closed through the server API (or a service account)."""


class SafetyQueries:
    db: Database

    if TYPE_CHECKING:  # provided by Store
        def participants(self, conversation_id: str) -> tuple[str, ...] | None: ...

    # --- blocks ------------------------------------------------------------------------

    def is_blocked_pair(self, user_a: str, user_b: str) -> bool:
        """Whether either of the two has blocked the other."""
        row = self.db.execute(
            "SELECT 1 FROM blocks WHERE (blocker_id = ? AND blocked_id = ?) OR (blocker_id = ? AND blocked_id = ?)",
            (user_a, user_b, user_b, user_a)).fetchone()
        return row is not None

    def block(self, blocker: str, blocked: str, now: float) -> BlockResult:
        """Store the block and close every open two-person conversation of the pair, in this
        transaction. Blocking again changes nothing and returns the first ``blocked_at``."""
        if blocker == blocked:
            raise ProtocolError(VALIDATION_ERROR, "you cannot block yourself", field="user_id")
        row = self.db.execute(
            "INSERT INTO blocks (blocker_id, blocked_id, blocked_at) VALUES (?, ?, ?) "
            "ON CONFLICT (blocker_id, blocked_id) DO NOTHING RETURNING blocked_at",
            (blocker, blocked, now)).fetchone()
        if row is None:
            (blocked_at,) = self.db.execute("SELECT blocked_at FROM blocks WHERE blocker_id = ? AND blocked_id = ?",
                                            (blocker, blocked)).fetchone()
            return BlockResult(blocker, blocked, blocked_at, False, ())
        pair = orjson.dumps(sorted((blocker, blocked))).decode()
        open_ids = [r[0] for r in self.db.execute(
            "SELECT id FROM conversations WHERE pair_key = ? AND closed_at IS NULL", (pair,)).fetchall()]
        closed = []
        for conversation_id in open_ids:
            done = self.close_conversation(conversation_id, blocker, now)
            if done is not None:
                closed.append(done)
        return BlockResult(blocker, blocked, now, True, tuple(closed))

    def unblock(self, blocker: str, blocked: str) -> bool:
        """Remove the block; ``False`` when there was none. Closed conversations stay closed."""
        return self.db.execute("DELETE FROM blocks WHERE blocker_id = ? AND blocked_id = ?",
                               (blocker, blocked)).rowcount > 0

    def blocks(self, blocker: str) -> list[BlockEntry]:
        """The blocks ``blocker`` made (never who blocked them: contract §17.3), oldest first."""
        return [BlockEntry(user, at) for user, at in self.db.execute(
            "SELECT blocked_id, blocked_at FROM blocks WHERE blocker_id = ? ORDER BY blocked_at, blocked_id",
            (blocker,))]

    def blocked_either_way(self, user_id: str) -> set[str]:
        """Users ``user_id`` blocked or was blocked by (presence keeps them apart)."""
        return {row[0] for row in self.db.execute(
            "SELECT blocked_id FROM blocks WHERE blocker_id = ? "
            "UNION SELECT blocker_id FROM blocks WHERE blocked_id = ?",
            (user_id, user_id))}

    def hidden_from(self, viewer: str, user_ids: Iterable[str]) -> set[str]:
        """Who of ``user_ids`` the viewer must see offline with no last-seen time: blocked
        either way, or with ``online_status`` off (the viewer never hides from themself)."""
        others = [u for u in set(user_ids) if u != viewer]
        if not others:
            return set()
        marks = ",".join("?" * len(others))
        hidden = {row[0] for row in self.db.execute(
            f"SELECT blocked_id FROM blocks WHERE blocker_id = ? AND blocked_id IN ({marks}) UNION "
            f"SELECT blocker_id FROM blocks WHERE blocked_id = ? AND blocker_id IN ({marks}) UNION "
            f"SELECT user_id FROM user_settings WHERE online_status = 0 AND user_id IN ({marks})",
            (viewer, *others, viewer, *others, *others))}
        return hidden

    # --- closing -----------------------------------------------------------------------

    def closed_at(self, conversation_id: str) -> float | None:
        row = self.db.execute("SELECT closed_at FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return None if row is None else row[0]

    def require_open(self, conversation_id: str) -> None:
        """``NOT_FOUND`` for a closed conversation (the writer serialises transactions: a
        request that runs after a close committed sees it)."""
        if self.closed_at(conversation_id) is not None:
            raise ProtocolError(NOT_FOUND, "conversation not found (it was closed)", field="conversation_id")

    def close_conversation(self, conversation_id: str, closed_by: str, now: float) -> ClosedConversation | None:
        """Close an open conversation (its pair key goes, so it is never found again);
        ``None`` when it is unknown or already closed."""
        row = self.db.execute(
            "UPDATE conversations SET closed_at = ?, closed_by = ?, pair_key = NULL "
            "WHERE id = ? AND closed_at IS NULL RETURNING id", (now, closed_by, conversation_id)).fetchone()
        if row is None:
            return None
        participants = self.participants(conversation_id) or ()
        apart = tuple((a, b) for a, b in combinations(participants, 2) if not self.share_open_conversation(a, b))
        return ClosedConversation(conversation_id, participants, now, closed_by, apart)

    def share_open_conversation(self, user_a: str, user_b: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM participants p JOIN participants o ON o.conversation_id = p.conversation_id "
            "JOIN conversations c ON c.id = p.conversation_id "
            "WHERE p.user_id = ? AND o.user_id = ? AND c.closed_at IS NULL LIMIT 1", (user_a, user_b)).fetchone()
        return row is not None

    def conversation_state(self, conversation_id: str) -> ConversationState:
        """The conversation, open or closed; ``NOT_FOUND`` for an unknown id."""
        row = self.db.execute("SELECT created_at, closed_at, last_seq FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()
        participants = self.participants(conversation_id)
        if row is None or participants is None:
            raise ProtocolError(NOT_FOUND, "conversation not found", field="conversation_id")
        return ConversationState(conversation_id, participants, row[0], row[1], row[2])

    # --- reports -----------------------------------------------------------------------

    def report(self, reporter: str, conversation_id: str, message_id_: str, reason: str, note: str | None,
               plaintext: str | None, now: float, per_day: int) -> Report:
        """Keep a report with a snapshot of the message as stored now. Works in a closed
        conversation. ``NOT_FOUND`` / ``FORBIDDEN`` (not a participant, your own message),
        ``VALIDATION_ERROR`` (plaintext for a message that is not encrypted), ``RATE_LIMITED``."""
        participants = self.participants(conversation_id)
        if participants is None:
            raise ProtocolError(NOT_FOUND, "conversation not found", field="conversation_id")
        if reporter not in participants:
            raise ProtocolError(FORBIDDEN, "only a participant can report a message of this conversation",
                                field="conversation_id")
        seq = parse_message_id(conversation_id, message_id_)
        row = None if seq is None else self.db.execute(
            "SELECT sender_id, type, content, metadata, client_message_id, created_at, updated_at, deleted_at "
            "FROM messages WHERE conversation_id = ? AND seq = ?", (conversation_id, seq)).fetchone()
        if seq is None or row is None:
            raise ProtocolError(NOT_FOUND, "message not found", field="message_id")
        sender, type_, content, metadata, client_id, created, updated, deleted = row
        if sender == reporter:
            raise ProtocolError(FORBIDDEN, "you cannot report your own message", field="message_id")
        meta: dict[str, Any] = orjson.loads(metadata)
        if plaintext is not None and meta.get("encrypted") is not True:
            raise ProtocolError(VALIDATION_ERROR, "plaintext is only for an encrypted message (metadata.encrypted)",
                                field="plaintext")
        if per_day:
            self._count_report(reporter, per_day, now)
        report_id = str(uuid.uuid4())
        self.db.execute(
            "INSERT INTO reports (id, reporter_id, conversation_id, seq, reason, note, plaintext, reported_at, "
            "message_sender_id, message_type, message_content, message_metadata, message_client_id, "
            "message_created_at, message_updated_at, message_deleted) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (report_id, reporter, conversation_id, seq, reason, note, plaintext, now, sender, type_, content,
             metadata, client_id, created, updated, int(deleted is not None)))
        snapshot = StoredMessage(conversation_id, seq, sender, type_, content, meta, client_id, created, updated,
                                 deleted is not None)
        return Report(report_id, reporter, reason, note, snapshot, now)

    def _count_report(self, reporter: str, per_day: int, now: float) -> None:
        """An exact sliding day window, read from the reports themselves (survives restarts; one
        node at a time per reporter)."""
        one_at_a_time(self.db, f"reports_per_day\x1f{reporter}")
        day = PERIODS["day"]
        rows = self.db.execute("SELECT reported_at FROM reports WHERE reporter_id = ? AND reported_at > ? "
                               "ORDER BY reported_at DESC LIMIT ?", (reporter, now - day, per_day)).fetchall()
        if len(rows) >= per_day:
            raise rate_limited(Rate(per_day, "day"), rows[-1][0] + day - now, "reports")

    # --- privacy settings --------------------------------------------------------------

    def user_settings(self, user_id: str) -> UserSettings:
        row = self.db.execute("SELECT read_receipts, online_status, updated_at FROM user_settings WHERE user_id = ?",
                              (user_id,)).fetchone()
        return UserSettings() if row is None else UserSettings(bool(row[0]), bool(row[1]), row[2])

    def update_settings(self, user_id: str, read_receipts: bool | None, online_status: bool | None,
                        now: float) -> UserSettings:
        """Change the given settings (``None``: keep); returns all of them."""
        current = self.user_settings(user_id)
        updated = UserSettings(current.read_receipts if read_receipts is None else read_receipts,
                               current.online_status if online_status is None else online_status, now)
        self.db.execute(
            "INSERT INTO user_settings (user_id, read_receipts, online_status, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id) DO UPDATE SET read_receipts = excluded.read_receipts, "
            "online_status = excluded.online_status, updated_at = excluded.updated_at",
            (user_id, int(updated.read_receipts), int(updated.online_status), now))
        return updated

    def last_seen_at(self, user_id: str) -> float | None:
        """When the user was last seen (their last connection closed, or they went invisible)."""
        row = self.db.execute("SELECT last_seen_at FROM users WHERE id = ?", (user_id,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # --- token revocations -------------------------------------------------------------

    def revoke_tokens(self, user_id: str, at: float) -> None:
        """Refuse from now on every token of ``user_id`` issued at or before ``at``."""
        self.db.execute(
            "INSERT INTO token_revocations (user_id, revoked_at) VALUES (?, ?) ON CONFLICT (user_id) "
            "DO UPDATE SET revoked_at = CASE WHEN excluded.revoked_at > token_revocations.revoked_at "
            "THEN excluded.revoked_at ELSE token_revocations.revoked_at END", (user_id, at))

    def token_revocations(self) -> dict[str, float]:
        """Every user's revocation time (loaded once at start)."""
        return dict(self.db.execute("SELECT user_id, revoked_at FROM token_revocations").fetchall())

    def revoked_at(self, user_id: str) -> float | None:
        row = self.db.execute("SELECT revoked_at FROM token_revocations WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else float(row[0])
