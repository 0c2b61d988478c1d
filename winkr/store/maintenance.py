"""Data tools behind ``winkr db backup`` and ``winkr db check``: plain synchronous functions.

Both open the database read-only, never create it and never migrate it, so they are safe to
run while the server is writing (WAL: readers do not block the writer). A database written by
a newer winkr is refused with :class:`SchemaTooNew`, as the server does.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from winkr.store.schema import SCHEMA_VERSION, SchemaTooNew


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
    return {
        "path": str(Path(path).absolute()),
        "ok": integrity == ["ok"] and not foreign_keys,
        "integrity": integrity,
        "foreign_key_violations": foreign_keys,
        "schema_version": version,
        "code_schema_version": SCHEMA_VERSION,
        "needs_migration": version < SCHEMA_VERSION,
        "tables": tables,
    }
