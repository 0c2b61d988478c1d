"""Versioned migrations for both engines; forward only.

Each step is either one portable SQL text, run on both engines (on PostgreSQL after
:func:`postgres_ddl` has mapped SQLite's type names, see docs/architecture.md "Dialect rules"),
or ``{"sqlite": ..., "postgresql": ...}`` where the engines differ. SQLite tracks the version
in ``PRAGMA user_version``, each step in its own ``BEGIN IMMEDIATE`` transaction; PostgreSQL in
the ``schema_migrations`` table, every missing step in one transaction under
``pg_advisory_xact_lock``, so nodes that start together on an empty database wait for the
first one's migration and then find nothing left to do.
"""
from __future__ import annotations

import re
import sqlite3
import time
from typing import Any

Migration = str | dict[str, str]

MIGRATIONS: list[Migration] = [
    # 1: the core schema
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        avatar_url TEXT,
        last_seen_at REAL
    );
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        pair_key TEXT UNIQUE            -- 'a\x1fb' for two-person conversations: find-or-create
    );
    CREATE INDEX conversations_created_by ON conversations (created_by, created_at);
    CREATE TABLE participants (
        conversation_id TEXT NOT NULL REFERENCES conversations (id),
        user_id TEXT NOT NULL,
        last_read_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (conversation_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX participants_by_user ON participants (user_id, conversation_id);
    CREATE TABLE messages (
        conversation_id TEXT NOT NULL REFERENCES conversations (id),
        seq INTEGER NOT NULL,
        sender_id TEXT NOT NULL,
        type TEXT NOT NULL,
        content TEXT NOT NULL,
        metadata TEXT NOT NULL,          -- JSON object
        client_message_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        deleted_at REAL,
        deleted_by TEXT,
        expires_at REAL,                 -- photo_ephemeral: erase at this wall-clock time
        PRIMARY KEY (conversation_id, seq)
    ) WITHOUT ROWID;
    -- A message's id is "<conversation_id>.<seq>": the primary key finds it, and an insert
    -- appends to its conversation's range instead of touching a random index page.
    CREATE UNIQUE INDEX messages_client_id ON messages (conversation_id, sender_id, client_message_id)
        WHERE client_message_id IS NOT NULL;
    CREATE INDEX messages_by_sender ON messages (conversation_id, sender_id, seq);
    CREATE INDEX messages_deleted ON messages (conversation_id, seq) WHERE deleted_at IS NOT NULL;
    CREATE INDEX messages_expiring ON messages (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE deliveries (
        conversation_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        delivered_at REAL NOT NULL,
        PRIMARY KEY (conversation_id, seq, user_id),
        FOREIGN KEY (conversation_id, seq) REFERENCES messages (conversation_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE rate_state (
        key TEXT PRIMARY KEY,           -- 'user\x1flimit'
        tat REAL NOT NULL               -- GCRA theoretical arrival time (wall clock)
    ) WITHOUT ROWID;
    """,
    # 2: seq from a per-conversation counter updated in the insert's transaction (so a rolled
    # back insert rolls its seq back too); pair keys as a JSON array (injective, whatever the ids)
    {"sqlite": """
    ALTER TABLE conversations ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
    UPDATE conversations SET last_seq = coalesce(
        (SELECT max(seq) FROM messages m WHERE m.conversation_id = conversations.id), 0);
    UPDATE conversations SET pair_key = json_array(
        substr(pair_key, 1, instr(pair_key, char(31)) - 1),
        substr(pair_key, instr(pair_key, char(31)) + 1)) WHERE pair_key IS NOT NULL;
    """,
     # No PostgreSQL database predates this step (PostgreSQL support came later), so there are
     # no old pair keys to rewrite.
     "postgresql": """
    ALTER TABLE conversations ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
    UPDATE conversations SET last_seq = coalesce(
        (SELECT max(seq) FROM messages m WHERE m.conversation_id = conversations.id), 0);
    """},
    # 3: the webhook outbox (contract §14), written in the transaction of the change it reports
    """
    CREATE TABLE webhook_events (
        id TEXT PRIMARY KEY,             -- the webhook-id header: the same on every attempt
        type TEXT NOT NULL,
        payload TEXT NOT NULL,           -- the exact JSON body sent: {"type", "timestamp", "data"}
        created_at REAL NOT NULL,        -- when the event happened (wall clock): max age counts from it
        next_attempt_at REAL NOT NULL,   -- wall clock; pushed ahead while an attempt is in flight
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at);
    CREATE INDEX webhook_events_age ON webhook_events (created_at);  -- the oldest, for the age gauge
    """,
    # 4: safety between users (contract §12) and the server API (§13). A closed conversation
    # keeps its messages but loses its pair key, so find-or-create only ever finds an open one.
    """
    ALTER TABLE conversations ADD COLUMN closed_at REAL;
    ALTER TABLE conversations ADD COLUMN closed_by TEXT;
    CREATE TABLE blocks (
        blocker_id TEXT NOT NULL,
        blocked_id TEXT NOT NULL,
        blocked_at REAL NOT NULL,
        PRIMARY KEY (blocker_id, blocked_id)
    );
    CREATE INDEX blocks_by_blocked ON blocks (blocked_id, blocker_id);
    CREATE TABLE reports (
        id TEXT PRIMARY KEY,
        reporter_id TEXT NOT NULL,
        conversation_id TEXT NOT NULL REFERENCES conversations (id),
        seq INTEGER NOT NULL,
        reason TEXT NOT NULL,
        note TEXT,
        plaintext TEXT,                  -- the reporter's own copy of an encrypted message
        reported_at REAL NOT NULL,
        -- the message as stored when it was reported (it may be erased later)
        message_sender_id TEXT NOT NULL,
        message_type TEXT NOT NULL,
        message_content TEXT NOT NULL,
        message_metadata TEXT NOT NULL,  -- JSON object
        message_client_id TEXT,
        message_created_at REAL NOT NULL,
        message_updated_at REAL NOT NULL,
        message_deleted INTEGER NOT NULL
    );
    CREATE INDEX reports_by_reporter ON reports (reporter_id, reported_at);
    CREATE TABLE user_settings (
        user_id TEXT PRIMARY KEY,
        read_receipts INTEGER NOT NULL,  -- 0 or 1
        online_status INTEGER NOT NULL,  -- 0 or 1
        updated_at REAL NOT NULL
    );
    CREATE TABLE token_revocations (
        user_id TEXT PRIMARY KEY,
        revoked_at REAL NOT NULL         -- tokens issued (iat) at or before this, or without iat, are refused
    );
    """,
    # 5: an ephemeral photo's time to live in a column of its own (filled at insert), so that
    # marking it read needs no JSON function (json_extract is SQLite's, ->> PostgreSQL's)
    {"sqlite": """
    ALTER TABLE messages ADD COLUMN ttl_seconds REAL;
    UPDATE messages SET ttl_seconds = json_extract(metadata, '$.ttl_seconds')
        WHERE type = 'photo_ephemeral' AND deleted_at IS NULL;
    """,
     "postgresql": """
    ALTER TABLE messages ADD COLUMN ttl_seconds double precision;
    UPDATE messages SET ttl_seconds = (metadata::jsonb ->> 'ttl_seconds')::double precision
        WHERE type = 'photo_ephemeral' AND deleted_at IS NULL;
    """},
    # 6: delivery positions (issue 10): a participant's messages up to delivered_seq are all
    # delivered (a conversation's: to everyone), so a delivery in order moves a number instead
    # of adding a row; rows stay only for deliveries past a gap (a history page read out of
    # order, the last message of a catch-up). Existing rows become positions where they run
    # without a gap from the start (one's own and deleted messages need no delivery, so they
    # are no gap); the rest stay.
    """
    ALTER TABLE conversations ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE participants ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0;
    UPDATE participants SET delivered_seq = coalesce(
        (SELECT min(m.seq) - 1 FROM messages m
         WHERE m.conversation_id = participants.conversation_id AND m.sender_id != participants.user_id
           AND m.deleted_at IS NULL AND NOT EXISTS (
               SELECT 1 FROM deliveries d WHERE d.conversation_id = m.conversation_id AND d.seq = m.seq
                 AND d.user_id = participants.user_id)),
        (SELECT c.last_seq FROM conversations c WHERE c.id = participants.conversation_id));
    DELETE FROM deliveries WHERE seq <= (
        SELECT p.delivered_seq FROM participants p
        WHERE p.conversation_id = deliveries.conversation_id AND p.user_id = deliveries.user_id);
    UPDATE conversations SET delivered_seq = coalesce(
        (SELECT min(p.delivered_seq) FROM participants p WHERE p.conversation_id = conversations.id), 0);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was written by a newer winkr; refuse rather than corrupt it."""


def migration_sql(number: int, dialect: str) -> str:
    """The SQL of step ``number`` (0-based) for ``dialect`` ("sqlite" or "postgresql")."""
    step = MIGRATIONS[number]
    if isinstance(step, dict):
        return step[dialect]
    return postgres_ddl(step) if dialect == "postgresql" else step


def too_new(version: int) -> SchemaTooNew:
    return SchemaTooNew(f"database schema {version} is newer than this code ({SCHEMA_VERSION})")


# SQLite's type names in portable DDL, as PostgreSQL needs them: INTEGER is 64 bits in SQLite
# (int4 in PostgreSQL), REAL is a double (float4 in PostgreSQL), an INTEGER PRIMARY KEY
# column numbers itself, and TEXT compares byte by byte (as SQLite's BINARY collation does,
# whatever the database's locale: ORDER BY gives the same order on both engines).
_PG_TYPES = [
    (re.compile(r"\bTEXT\b", re.I), 'text COLLATE "C"'),
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b", re.I),
     "bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.I), "bigint"),
    (re.compile(r"\bREAL\b", re.I), "double precision"),
    (re.compile(r"\bBLOB\b", re.I), "bytea"),
    (re.compile(r"\)\s*WITHOUT\s+ROWID\b", re.I), ")"),
]
_PG_LEXEMES = re.compile(r"('(?:[^']|'')*'|\"[^\"]*\"|--[^\n]*)")


def postgres_ddl(sql: str) -> str:
    """Portable DDL written with SQLite's type names, for PostgreSQL: TEXT → text COLLATE "C",
    INTEGER → bigint, REAL → double precision, BLOB → bytea, INTEGER PRIMARY KEY → an identity
    column, WITHOUT ROWID dropped. String literals, quoted names and comments are left alone."""
    pieces = _PG_LEXEMES.split(sql)
    for i in range(0, len(pieces), 2):  # even pieces are outside literals and comments
        for pattern, replacement in _PG_TYPES:
            pieces[i] = pattern.sub(replacement, pieces[i])
    return "".join(pieces)


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION``; each step in its own transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise too_new(version)
    for number in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in migration_sql(number, "sqlite").split(";\n"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def open_database(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """One connection in autocommit mode (transactions are explicit), WAL, foreign keys on."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA cache_size = -65536")  # 64 MiB: the hot end of every conversation stays in memory
    # The checkpointer (winkr/store/checkpointer.py) keeps the WAL short from its own thread.
    db.execute("PRAGMA wal_autocheckpoint = 20000")
    migrate(db)
    return db


# --- PostgreSQL ------------------------------------------------------------------------------

MIGRATION_LOCK = 0x77696E6B  # "wink": pg_advisory_xact_lock(MIGRATION_LOCK, hashtext(current_schema()))


def postgres_version(db: Any) -> int:
    """The schema version of a PostgreSQL database (0: no winkr tables yet). ``db`` is a
    psycopg connection."""
    row = db.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    version: int = db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
    return version


def migrate_postgres(db: Any) -> int:
    """Bring a PostgreSQL schema to ``SCHEMA_VERSION`` in one transaction under an advisory
    lock (per schema). ``db`` is a psycopg connection in autocommit mode. Raises
    :class:`SchemaTooNew` for a newer database."""
    db.execute("BEGIN")
    try:
        db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version bigint PRIMARY KEY, "
                   "applied_at double precision NOT NULL)")
        version = postgres_version(db)
        if version > SCHEMA_VERSION:
            raise too_new(version)
        for number in range(version, SCHEMA_VERSION):
            db.execute(migration_sql(number, "postgresql"))  # no parameters: several statements at once
            db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                       (number + 1, time.time()))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION
