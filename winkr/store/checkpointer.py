"""The checkpointer: moves the WAL into the database file from its own connection and thread.

SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold, on the
writer's thread, and with ``synchronous=NORMAL`` it fsyncs: every few thousand messages the
writer stalled for 100+ ms and every acknowledgement behind it waited (p99 451 ms at
1,000 msgs/s; 25 ms without). A PASSIVE checkpoint from another connection never blocks the
writer, so the writer's own automatic checkpoint is only a distant backstop.

Every second, not every five: a checkpoint's CPU (copying the WAL's new pages) runs on the same
core as the trio thread, so its length is a stall the messages behind it see. At 1,000 msgs/s
a 5 s round moved thousands of frames in 20-140 ms and was most of winkr's p99 on a quiet
machine (4.4-15.7 ms against the relay's 0.5-0.7 ms); 1 s rounds gave 2.3-2.8 ms
(docs/performance.md, issue 10, phase 3).
"""
from __future__ import annotations

import logging
import sqlite3

import trio

from winkr.store.writer import RunSync

log = logging.getLogger("winkr.store")



def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def _checkpoint(db: sqlite3.Connection, mode: str) -> None:
    db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()


async def run_checkpointer(path: str, run_sync: RunSync, *, interval: float = 1.0) -> None:
    """Checkpoint every ``interval`` seconds until cancelled; a last TRUNCATE on the way out."""
    db = await run_sync(_open, path)
    try:
        while True:
            await trio.sleep(interval)
            try:
                await run_sync(_checkpoint, db, "PASSIVE")
            except sqlite3.Error as exc:  # busy or I/O trouble: the next round tries again
                log.warning("checkpoint failed: %s", exc)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await run_sync(_checkpoint, db, "TRUNCATE")
            except sqlite3.Error:
                pass
            await run_sync(db.close)
