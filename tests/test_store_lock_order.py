"""The store writer runs a batch in conversation order (winkr/store/writer.py): two nodes'
writers then take their conversation row locks in one order and do not deadlock each other,
and every answer still reaches the request it belongs to."""
from __future__ import annotations

from functools import partial
from typing import Any

import trio
from conftest import make_settings

from winkr.store.engine import open_engine
from winkr.store.store import Store
from winkr.store.writer import StoreHandle, run_inline, run_store_writer


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
