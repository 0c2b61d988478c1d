"""The SQLite checkpointer with real threads: a thread of its own at the lowest CPU priority,
its connection open before it counts as started, and the WAL emptied into the database file
when it stops. A real database file, the real clock."""
from __future__ import annotations

import os
import sqlite3
import threading
from functools import partial
from pathlib import Path

import pytest
import trio

from winkr.store.checkpointer import BACKGROUND_NICE, _CheckpointThread, _run_checkpoint_thread, run_checkpointer
from winkr.store.schema import open_database


def _wal_size(path: str) -> int:
    return Path(path + "-wal").stat().st_size


def _threads_named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


@pytest.mark.sqlite_only
async def test_the_checkpointer_runs_on_its_own_low_priority_thread_and_truncates_the_wal_when_it_stops(
        tmp_path: Path) -> None:
    path = str(tmp_path / "winkr.db")
    writer = open_database(path)  # WAL, with the writer's own automatic checkpoint far away
    try:
        writer.executemany("INSERT INTO users (id, username) VALUES (?, ?)", [(f"u{i}", f"u{i}") for i in range(200)])
        assert _wal_size(path) > 0
        async with trio.open_nursery() as nursery:
            # An hour between rounds: only the last TRUNCATE runs in this test.
            await nursery.start(partial(run_checkpointer, path, trio.to_thread.run_sync, interval=3600.0))
            (thread,) = _threads_named("winkr-checkpointer")
            assert thread.native_id is not None
            assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == BACKGROUND_NICE
            assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != BACKGROUND_NICE  # ours is untouched
            nursery.cancel_scope.cancel()
        assert not _threads_named("winkr-checkpointer")  # joined before run_checkpointer returned
        assert _wal_size(path) == 0
        reader = sqlite3.connect(path)
        try:
            assert reader.execute("SELECT count(*) FROM users").fetchone()[0] == 200
        finally:
            reader.close()
    finally:
        writer.close()


@pytest.mark.sqlite_only
async def test_a_checkpointer_that_cannot_open_the_database_fails_to_start(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-folder" / "winkr.db")
    with pytest.raises(sqlite3.OperationalError):
        await run_checkpointer(missing, trio.to_thread.run_sync)
    assert not _threads_named("winkr-checkpointer")


@pytest.mark.sqlite_only
async def test_the_last_truncate_runs_at_normal_priority_so_a_busy_machine_does_not_stall_the_stop(
        tmp_path: Path) -> None:
    """The server waits for the last TRUNCATE before it closes the store: it is not background
    work. At nice 19 a machine busy with other work gave it next to no CPU, and a SIGTERM took
    1.2-3.3 s instead of 0.23 s (an 80 MB WAL, three busy processes on two cores). So the
    checkpointer's own thread only ends its rounds; the TRUNCATE and the close run on a thread
    of normal priority once it is joined."""
    path = str(tmp_path / "winkr.db")
    writer = open_database(path)
    seen: list[tuple[str, int]] = []  # (statement, the priority of the thread that ran it)

    def trace(statement: str) -> None:
        seen.append((statement, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    try:
        writer.executemany("INSERT INTO users (id, username) VALUES (?, ?)", [(f"u{i}", f"u{i}") for i in range(200)])
        checkpointer = _CheckpointThread(path, interval=3600.0)  # only the last TRUNCATE runs
        async with trio.open_nursery() as nursery:
            await nursery.start(_run_checkpoint_thread, checkpointer)
            assert checkpointer.db is not None
            checkpointer.db.set_trace_callback(trace)  # the connection is idle until the stop
            nursery.cancel_scope.cancel()
        assert not _threads_named("winkr-checkpointer")
        assert [statement for statement, _ in seen] == ["PRAGMA wal_checkpoint(TRUNCATE)"]
        assert seen[0][1] != BACKGROUND_NICE
        assert _wal_size(path) == 0
    finally:
        writer.close()
