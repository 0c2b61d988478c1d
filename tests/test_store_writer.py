"""The store writer's own thread (production): group commit across callers, an answer only
after the commit, the inbox bound, and what is queued when it stops. Real threads, a real
database on either engine, the real clock."""
from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import make_settings, query

from winkr.errors import INTERNAL_ERROR, INVALID_MESSAGE_TYPE, ProtocolError
from winkr.metrics import Metrics
from winkr.store.engine import SqliteDatabase, open_engine
from winkr.store.store import Store
from winkr.store.writer import StoreHandle, run_store_writer


def _upsert(user_id: str, store: Store) -> str:
    store.upsert_user(user_id, user_id, None)
    return user_id


def _refuse(store: Store) -> None:
    store.upsert_user("ghost", "ghost", None)  # rolled back with its savepoint
    raise ProtocolError(INVALID_MESSAGE_TYPE, "no")


def _users(settings: Any) -> set[str]:
    return {row[0] for row in query(settings, "SELECT id FROM users")}


async def test_the_writer_thread_answers_each_caller_after_its_commit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db = open_engine(settings.database).open_writer()
    metrics = Metrics()
    seen_committed: dict[str, bool] = {}
    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(partial(run_store_writer, Store(db), trio.to_thread.run_sync,
                                                             metrics=metrics))

            async def caller(user_id: str) -> None:
                assert await store.call(partial(_upsert, user_id)) == user_id
                # The answer means durable: another connection sees the row already.
                seen_committed[user_id] = user_id in await trio.to_thread.run_sync(_users, settings)

            async with trio.open_nursery() as callers:
                for i in range(40):
                    callers.start_soon(caller, f"user{i}")
            with pytest.raises(ProtocolError):
                await store.call(_refuse)
            await store.fire(partial(_upsert, "background"))
            assert await store.call(partial(_upsert, "last")) == "last"  # after the fire, in order
            nursery.cancel_scope.cancel()
    finally:
        db.close()
    assert seen_committed == {f"user{i}": True for i in range(40)}
    assert _users(settings) == {f"user{i}" for i in range(40)} | {"background", "last"}
    # 40 concurrent callers shared commits (they were queued while a transaction ran).
    assert sum(metrics.commit_batch.counts) < 43



class BlockedFirst:
    """A request that holds the writer's thread inside its transaction (``entered`` once it is
    there) until ``release``; then it upserts the user "first"."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def work(self, store: Store) -> str:
        self.entered.set()
        self.release.wait(30)
        return _upsert("first", store)

async def test_a_full_writer_inbox_makes_callers_wait_and_a_stop_still_answers_what_was_queued(
        tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db = open_engine(settings.database).open_writer()
    blocked = BlockedFirst()
    answered: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(partial(run_store_writer, Store(db), trio.to_thread.run_sync,
                                                             inbox_size=2))

            async def caller(work: Any) -> None:
                answered.append(await store.call(work))

            third = trio.Event()

            async def submit_third() -> None:
                await store.fire(partial(_upsert, "third"))
                third.set()

            async with trio.open_nursery() as callers:
                callers.start_soon(caller, blocked.work)
                await trio.to_thread.run_sync(blocked.entered.wait, 30)  # the thread is inside the first transaction
                callers.start_soon(caller, partial(_upsert, "second"))
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(submit_third)
                await trio.testing.wait_all_tasks_blocked()
                assert not third.is_set()  # two requests outstanding: the third waits for room
                blocked.release.set()
            assert third.is_set()
            nursery.cancel_scope.cancel()  # the writer stops after what was queued (the third)
    finally:
        db.close()
    assert sorted(answered) == ["first", "second"]
    assert _users(settings) == {"first", "second", "third"}


def _insert_user_raw(user_id: str, store: Store) -> str:
    """A plain INSERT: a second one for the same id breaks the primary key (the database's
    own IntegrityError / UniqueViolation, not a ProtocolError)."""
    store.db.execute("INSERT INTO users (id, username) VALUES (?, ?)", (user_id, user_id))
    return user_id


async def test_a_request_the_database_refuses_fails_only_its_caller_in_a_shared_batch(tmp_path: Path) -> None:
    """Three requests queued behind a running transaction go into one batch; the middle one
    breaks a constraint. Its caller gets the database's error; the two around it commit in
    the same batch, and the thread goes on serving."""
    settings = make_settings(tmp_path)
    db = open_engine(settings.database).open_writer()
    metrics = Metrics()
    blocked = BlockedFirst()
    outcomes: dict[str, object] = {}

    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(partial(run_store_writer, Store(db), trio.to_thread.run_sync,
                                                             metrics=metrics))
            assert await store.call(partial(_insert_user_raw, "taken")) == "taken"

            async def caller(name: str, work: Any) -> None:
                try:
                    outcomes[name] = await store.call(work)
                except Exception as exc:  # noqa: BLE001 - what the caller was told
                    outcomes[name] = exc

            async with trio.open_nursery() as callers:
                callers.start_soon(caller, "blocked", blocked.work)
                await trio.to_thread.run_sync(blocked.entered.wait, 30)
                callers.start_soon(caller, "before", partial(_insert_user_raw, "before"))
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(caller, "clash", partial(_insert_user_raw, "taken"))
                await trio.testing.wait_all_tasks_blocked()
                callers.start_soon(caller, "after", partial(_insert_user_raw, "after"))
                await trio.testing.wait_all_tasks_blocked()
                blocked.release.set()
            assert await store.call(partial(_upsert, "later")) == "later"  # the thread lives on
            nursery.cancel_scope.cancel()
    finally:
        db.close()
    assert outcomes["blocked"] == "first" and outcomes["before"] == "before" and outcomes["after"] == "after"
    clash = outcomes["clash"]
    assert isinstance(clash, Exception) and not isinstance(clash, ProtocolError), clash
    assert _users(settings) == {"taken", "first", "before", "after", "later"}


@pytest.mark.sqlite_only
async def test_a_lone_request_runs_without_a_savepoint_and_its_failure_rolls_back_everything(
        tmp_path: Path) -> None:
    """The quiet conversation's batch is one request: BEGIN, its statements, COMMIT (no
    SAVEPOINT/RELEASE around it); when it fails, the whole transaction is rolled back, which
    is all its own work, and the thread goes on serving."""
    settings = make_settings(tmp_path)
    db = open_engine(settings.database).open_writer()
    assert isinstance(db, SqliteDatabase)
    statements: list[str] = []
    db.connection.set_trace_callback(statements.append)  # runs on the writer's thread
    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(partial(run_store_writer, Store(db), trio.to_thread.run_sync))
            assert await store.call(partial(_upsert, "alone")) == "alone"
            ran_alone = list(statements)
            with pytest.raises(ProtocolError):
                await store.call(_refuse)
            assert await store.call(partial(_upsert, "after")) == "after"
            nursery.cancel_scope.cancel()
    finally:
        db.close()
    assert ran_alone[0] == "BEGIN IMMEDIATE" and ran_alone[-1] == "COMMIT"
    assert not [s for s in statements if "SAVEPOINT" in s or "RELEASE" in s], statements
    assert "ROLLBACK" in statements
    assert _users(settings) == {"alone", "after"}  # the refused request's upsert ("ghost") is gone


def _lose_the_connection(store: Store) -> None:
    """A request whose database connection dies under it (the server ends the session)."""
    store.db.execute("SELECT pg_terminate_backend(pg_backend_pid())")


@pytest.mark.postgres_only
async def test_a_lone_request_whose_connection_breaks_fails_as_a_storage_failure(tmp_path: Path) -> None:
    """Alone in its batch, a request that loses the connection is answered as one in a shared
    batch is (where its ROLLBACK TO meets the broken connection): INTERNAL_ERROR, "storage
    failure", not the driver's error; the writer connects again and goes on."""
    settings = make_settings(tmp_path)
    db = open_engine(settings.database).open_writer()
    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(partial(run_store_writer, Store(db), trio.to_thread.run_sync))
            with pytest.raises(ProtocolError) as failed:
                await store.call(_lose_the_connection)
            assert failed.value.code == INTERNAL_ERROR
            assert await store.call(partial(_upsert, "after")) == "after"
            nursery.cancel_scope.cancel()
    finally:
        db.close()
    assert _users(settings) == {"after"}
