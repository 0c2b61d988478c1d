"""Versioned migrations, tracked with ``PRAGMA user_version``; forward only."""
from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
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
    """
    ALTER TABLE conversations ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
    UPDATE conversations SET last_seq = coalesce(
        (SELECT max(seq) FROM messages m WHERE m.conversation_id = conversations.id), 0);
    UPDATE conversations SET pair_key = json_array(
        substr(pair_key, 1, instr(pair_key, char(31)) - 1),
        substr(pair_key, instr(pair_key, char(31)) + 1)) WHERE pair_key IS NOT NULL;
    """,
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
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was written by a newer winkr; refuse rather than corrupt it."""


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION``; each step in its own transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"database schema {version} is newer than this code ({SCHEMA_VERSION})")
    for number in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number].split(";\n"):
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
