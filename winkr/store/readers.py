"""Reads beside the writer: a bounded set of connections, used from worker threads.

SQLite: extra WAL connections (a reader never blocks the writer, nor the writer a reader);
PostgreSQL: a ``psycopg_pool.ConnectionPool``. A read sees everything committed before it
began, so whatever was acknowledged, but not a background write still queued at the
writer. At most ``size`` reads run at once (a ``trio.CapacityLimiter``); the rest wait.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from winkr.store.engine import Database, Readers
from winkr.store.store import Store
from winkr.store.writer import RunSync

T = TypeVar("T")
READERS = 4  # connections; a read is a few index probes, so a handful keep up with many clients


class ReaderHandle:
    def __init__(self, readers: Readers, run_sync: RunSync) -> None:
        self._readers = readers
        self._run_sync = run_sync
        self._limiter = trio.CapacityLimiter(readers.size)

    async def call(self, work: Callable[[Store], T]) -> T:
        """Run ``work`` on a reader's :class:`Store` in one read-only snapshot and return its
        result; raises what it raised. Cancelling the wait does not stop a read under way."""
        def run(db: Database) -> T:
            return work(Store(db))

        async with self._limiter:
            result: T = await self._run_sync(self._readers.run, run)
            return result
