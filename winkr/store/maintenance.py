"""Data tools behind ``winkr db backup`` and ``winkr db check``: plain synchronous functions.

Both open the database read-only, never create it and never migrate it, so they are safe to
run while the server is writing (WAL: readers do not block the writer; on PostgreSQL a
read-only transaction). A database written by a newer winkr is refused with
:class:`SchemaTooNew`, as the server does. ``backup`` is SQLite's: PostgreSQL has pg_dump.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from winkr.store.schema import SCHEMA_VERSION, SchemaTooNew, postgres_version, too_new
from winkr.store.url import SQLITE, DatabaseUrl

# `seq` has no gaps and the counter is never behind: every conversation has exactly
# `last_seq` messages numbered 1..last_seq (deleted ones stay as tombstones).
_SEQ_PROBLEMS_SQL = """
SELECT c.id, c.last_seq, count(m.seq), coalesce(max(m.seq), 0)
FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id
GROUP BY c.id, c.last_seq
HAVING count(m.seq) != c.last_seq OR coalesce(max(m.seq), 0) != c.last_seq
ORDER BY c.id LIMIT 100"""
SEQ_COUNTER_VERSION = 2  # the schema version that brought conversations.last_seq


def _seq_problems(rows: Any) -> list[dict[str, Any]]:
    return [{"conversation_id": conv, "last_seq": last_seq, "messages": count, "max_seq": max_seq}
            for conv, last_seq, count, max_seq in rows]


@contextlib.contextmanager
def _open_readonly(path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no database at {source}")
    db = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"database schema {version} is newer than this code ({SCHEMA_VERSION}); "
                               "upgrade winkr to use it")
        yield db
    finally:
        db.close()


def _tables(db: sqlite3.Connection) -> list[str]:
    rows = db.execute("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                      "ORDER BY name").fetchall()
    return [name for (name,) in rows]


def _count(db: sqlite3.Connection, table: str) -> int:
    count: int = db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    return count


def backup(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str], *,
           force: bool = False) -> dict[str, Any]:
    """Copy the database to ``dst_path`` through SQLite's online backup API.

    The copy is one consistent snapshot (a single backup step under one read transaction),
    written to a temporary file beside the target, synced, and renamed into place, so the
    target is either absent or complete. Refuses an existing target unless ``force``.
    """
    target = Path(dst_path).absolute()
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists (use --force to overwrite)")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"no folder {target.parent}")
    with _open_readonly(src_path) as src:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            dst = sqlite3.connect(tmp, isolation_level=None)
            try:
                src.backup(dst)  # pages=-1: everything in one step, one snapshot
                dst.execute("PRAGMA journal_mode = DELETE")  # the copy is one self-contained file
                messages = _count(dst, "messages") if "messages" in _tables(dst) else 0
                version = dst.execute("PRAGMA user_version").fetchone()[0]
            finally:
                dst.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if force:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # fails if the target appeared meanwhile: never overwrite
                tmp.unlink()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    with contextlib.suppress(OSError):  # make the rename durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return {"path": str(target), "messages": messages, "schema_version": version,
            "bytes": target.stat().st_size}


def check(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Integrity check, foreign-key check, schema version and row counts; ``ok`` sums it up.

    A database older than the code is ``ok`` (the server migrates it on start) and says so
    with ``needs_migration``.
    """
    with _open_readonly(path) as db:
        integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
        foreign_keys = [{"table": table, "rowid": rowid, "parent": parent, "fk": fk}
                        for table, rowid, parent, fk in db.execute("PRAGMA foreign_key_check")]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {table: _count(db, table) for table in _tables(db)}
        seq_problems = _seq_problems(db.execute(_SEQ_PROBLEMS_SQL)) if version >= SEQ_COUNTER_VERSION else []
    return {
        "engine": "sqlite",
        "path": str(Path(path).absolute()),
        "ok": integrity == ["ok"] and not foreign_keys and not seq_problems,
        "integrity": integrity,
        "foreign_key_violations": foreign_keys,
        "seq_problems": seq_problems,
        "schema_version": version,
        "code_schema_version": SCHEMA_VERSION,
        "needs_migration": version < SCHEMA_VERSION,
        "tables": tables,
    }


def _pg_count(db: Any, table: str) -> int:
    count: int = db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    return count


def check_postgres(conninfo: str, shown_as: str) -> dict[str, Any]:
    """``check`` for PostgreSQL, in one read-only snapshot: schema version, row counts and the
    ``seq`` invariant. (PostgreSQL enforces foreign keys itself; for page-level checks there is
    pg_amcheck.) Raises psycopg's error when it cannot connect."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as db:
        db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        version = postgres_version(db)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"{too_new(version)}; upgrade winkr to use it")
        names = [name for (name,) in db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename")]
        tables = {name: _pg_count(db, name) for name in names}
        seq_problems = _seq_problems(db.execute(_SEQ_PROBLEMS_SQL)) if version >= SEQ_COUNTER_VERSION else []
        db.execute("ROLLBACK")
    return {
        "engine": "postgresql",
        "database": shown_as,
        "ok": not seq_problems,
        "seq_problems": seq_problems,
        "schema_version": version,
        "code_schema_version": SCHEMA_VERSION,
        "needs_migration": version < SCHEMA_VERSION,
        "tables": tables,
    }


def check_database(url: DatabaseUrl) -> dict[str, Any]:
    """``winkr db check`` on either engine (see ``check`` and ``check_postgres``)."""
    if url.engine == SQLITE:
        return check(url.path)
    return check_postgres(url.conninfo, url.redacted())
