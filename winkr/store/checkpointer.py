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

With real threads the checkpointer is a thread of its own at the lowest CPU priority (nice
19, :data:`BACKGROUND_NICE`): a checkpoint is background work that can wait, so when the trio
thread wakes it takes the core at once instead of sharing it with the copying (issue 10,
phase 4: the realistic p99). A trio worker thread cannot be used for this: its priority
would stay lowered for whatever job it runs next, and an unprivileged process cannot raise it
again. The last TRUNCATE is not background work (the server waits for it before it closes the
store): it runs on a trio worker thread at normal priority once the checkpointer's thread has
stopped (a round under way is interrupted).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading

import trio

from winkr.store.writer import RunSync

log = logging.getLogger("winkr.store")

BACKGROUND_NICE = 19  # the lowest priority a thread can give itself (Linux: per thread)


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def _checkpoint(db: sqlite3.Connection, mode: str) -> None:
    db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()


async def run_checkpointer(path: str, run_sync: RunSync, *, interval: float = 1.0,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Checkpoint every ``interval`` seconds until cancelled; a last TRUNCATE on the way out.
    With ``trio.to_thread.run_sync`` on a low-priority thread of its own (see the module's
    docstring); with any other ``run_sync`` (``run_inline`` under MockClock) from this task.
    Started (``nursery.start``) once its connection is open; raises what opening it raises."""
    if run_sync is trio.to_thread.run_sync:
        await _run_checkpoint_thread(_CheckpointThread(path, interval), task_status)
        return
    db = await run_sync(_open, path)
    task_status.started()
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


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> None:
    """Give the calling thread the CPU priority ``nice`` on Linux, where a thread's id names
    it to ``setpriority`` (elsewhere the id may not name a thread at all; there, or where it is
    refused, the thread keeps its priority)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:  # no per-thread priority here: a checkpoint still runs
        log.debug("checkpointer keeps its priority (%s)", type(exc).__name__)


class _CheckpointThread:
    """The checkpointer's own thread: opens its connection, checkpoints every ``interval``
    seconds until stopped. The last TRUNCATE and the close are :meth:`finish`'s, on a thread of
    normal priority: the server waits for them, so they are not background work (at nice 19 a
    machine busy with other processes stretched a SIGTERM from 0.2 s to seconds)."""

    def __init__(self, path: str, interval: float) -> None:
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self.opened = threading.Event()
        self.open_error: BaseException | None = None
        self.db: sqlite3.Connection | None = None  # set before ``opened``; closed by finish()
        self.thread = threading.Thread(target=self._serve, name="winkr-checkpointer", daemon=True)

    def _serve(self) -> None:
        lower_thread_priority()
        try:
            db = _open(self._path)
        except BaseException as exc:  # noqa: BLE001 - handed to the trio side, which raises it
            self.open_error = exc
            self.opened.set()
            return
        self.db = db
        self.opened.set()
        while not self._stop.wait(self._interval):
            try:
                _checkpoint(db, "PASSIVE")
            except sqlite3.Error as exc:  # busy or I/O trouble: the next round tries again
                if self._stop.is_set():
                    break  # stop() interrupted it
                log.warning("checkpoint failed: %s", exc)

    def stop(self) -> None:
        """End the rounds; a round under way is interrupted (what it copied stays copied)."""
        self._stop.set()
        if self.db is not None:
            self.db.interrupt()

    def finish(self) -> None:
        """Once the thread is joined: the last TRUNCATE, then close the connection."""
        db, self.db = self.db, None
        if db is None:
            return
        try:
            _checkpoint(db, "TRUNCATE")
        except sqlite3.Error:
            pass
        finally:
            db.close()


async def _run_checkpoint_thread(checkpointer: _CheckpointThread,
                                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    checkpointer.thread.start()
    try:
        with trio.CancelScope(shield=True):  # the thread is started: it must be stopped and joined
            await trio.to_thread.run_sync(checkpointer.opened.wait)
        if checkpointer.open_error is not None:
            raise checkpointer.open_error
        task_status.started()
        await trio.sleep_forever()
    finally:
        checkpointer.stop()
        # Shielded: the last TRUNCATE must finish before the server closes the store. On a
        # trio worker thread: normal priority.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(checkpointer.thread.join)
            await trio.to_thread.run_sync(checkpointer.finish)
