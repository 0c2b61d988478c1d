"""Two nodes' writers on one PostgreSQL: the store writer runs a batch in conversation order
(winkr/store/writer.py), so their conversation row locks are taken in one order and every
answer still reaches its request; and a daily limit counted from rows (conversations, reports)
is counted by one node at a time (winkr.store.engine.one_at_a_time)."""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import pytest
import trio
from conftest import make_settings, query

from winkr.errors import ProtocolError
from winkr.ids import message_id as message_id_of
from winkr.records import SendItem
from winkr.store.engine import open_engine
from winkr.store.store import Store
from winkr.store.writer import StoreHandle, run_inline, run_store_writer

NOW = 1_767_225_600.0


def note(ran: list[str], label: str, store: Store, conversation_id: str = "") -> str:
    assert store.db.in_transaction
    ran.append(conversation_id)
    return label


async def test_a_batch_runs_in_conversation_order_and_answers_each_request(tmp_path: Any) -> None:
    settings = make_settings(tmp_path)
    db = open_engine(settings.database).open_writer()
    ran: list[str] = []
    hops: list[object] = []
    answers: dict[str, str] = {}

    async def counting(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await run_inline(fn, *args)

    async def ask(store: StoreHandle, label: str, conversation: str | None) -> None:
        work = (partial(note, ran, label) if conversation is None
                else partial(note, ran, label, conversation_id=conversation))
        answers[label] = await store.call(work)

    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(run_store_writer, Store(db), counting)
            async with trio.open_nursery() as callers:
                # Started together: all are waiting in the inbox when the writer wakes (one batch).
                for label, conversation in [("a", "c3"), ("b", None), ("c", "c1"), ("d", "c2"), ("e", "c1")]:
                    callers.start_soon(ask, store, label, conversation)
            nursery.cancel_scope.cancel()
    finally:
        db.close()
    assert len(hops) == 1  # one transaction
    assert ran == ["", "c1", "c1", "c2", "c3"]
    assert answers == {"a": "a", "b": "b", "c": "c", "d": "d", "e": "e"}


@pytest.mark.postgres_only
@pytest.mark.parametrize("limit", ["conversations", "reports"])
def test_two_nodes_at_a_daily_limit_do_not_both_get_the_last_one(tmp_path: Any, engine: Any, limit: str) -> None:
    # Two writers (two nodes) on one database, alice one below her daily limit on both: node 1
    # takes the last one and has not committed when node 2 asks. Node 2 must wait for node 1
    # and then refuse; counting at once, both would see one free and both would write.
    settings = make_settings(tmp_path)
    database = open_engine(settings.database)
    node1, node2 = database.open_writer(), database.open_writer()
    setup = Store(node1)
    node1.begin()
    conv = setup.create_conversation("alice", ["bob"], is_service=False, max_participants=10, now=NOW)[0].id
    stored = setup.insert_messages(conv, [SendItem("bob", "text", "hello", {}, None, ())], NOW)[0]
    assert not isinstance(stored, ProtocolError)
    node1.commit()
    message_id = message_id_of(conv, stored.message.seq)

    def take_the_last(store: Store) -> object:
        if limit == "conversations":
            return store.create_conversation("alice", ["carol", "dave"], is_service=False, max_participants=10,
                                             now=NOW + 1, per_day=2)
        return store.report("alice", conv, message_id, "spam", None, None, NOW + 1, per_day=1)

    outcome: dict[str, object] = {}

    def second_node() -> None:
        node2.begin()
        try:
            outcome["result"] = take_the_last(Store(node2))
        except ProtocolError as exc:
            outcome["error"] = exc.code
        node2.commit()

    try:
        node1.begin()
        take_the_last(Store(node1))  # the last one, not committed yet
        thread = threading.Thread(target=second_node, daemon=True)
        thread.start()
        # Until node 2 either finished (counting at once: the bug) or waits for node 1's lock.
        deadline = time.monotonic() + 10
        while thread.is_alive() and not waiting_for_a_lock(settings) and time.monotonic() < deadline:
            time.sleep(0.01)
        node1.commit()
        thread.join(10)
        assert outcome == {"error": "RATE_LIMITED"}
    finally:
        node1.close()
        node2.close()


def waiting_for_a_lock(settings: Any) -> bool:
    return bool(query(settings, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")[0][0])
