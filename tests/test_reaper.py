"""The reaper actor on a real store (either engine, the writer inline, MockClock): it erases
what is due, and a store failure does not end it (it runs unsupervised among the server's
actors: its exception stopped the whole node)."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from conftest import make_settings

from winkr.actor import Mailbox
from winkr.ids import message_id
from winkr.reaper import STORE_RETRY_SECONDS, open_reaper_channel, run_reaper
from winkr.records import SendItem
from winkr.room import RoomHandle, RoomMessage, SystemDeleted
from winkr.store.engine import open_engine
from winkr.store.store import Store
from winkr.store.writer import StoreHandle, run_inline, run_store_writer

NOW = 1_767_225_600.0


def _ephemeral_message_due(store: Store) -> str:
    conversation, _ = store.create_conversation("alice", ["bob"], is_service=False, max_participants=0, now=NOW)
    sent = store.insert_message(conversation.id, SendItem("alice", "text", "soon gone", {}, None, ()), NOW)
    store.db.execute("UPDATE messages SET expires_at = ? WHERE conversation_id = ? AND seq = ?",
                     (NOW - 1, conversation.id, sent.message.seq))
    return conversation.id


async def test_the_reaper_outlives_a_store_failure_and_erases_what_is_due_when_the_store_is_back(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A cluster node's reaper polls the store every 30 s; when its database connection had
    dropped (PostgreSQL restarted, a proxy closed an idle connection) that poll failed with
    INTERNAL_ERROR and the node exited ("winkr stopped on an unexpected error")."""
    settings = make_settings(tmp_path)
    db = open_engine(settings.database).open_writer()
    rooms: dict[str, Mailbox[RoomMessage]] = {}

    async def get_room(conversation_id: str) -> RoomHandle:
        return RoomHandle(conversation_id, rooms[conversation_id])

    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(run_store_writer, Store(db), run_inline)
            conversation_id = await store.call(_ephemeral_message_due)
            rooms[conversation_id] = Mailbox(8)
            # The store fails every request that reads messages (a real failure of a real store).
            await store.call(lambda s: s.db.execute("ALTER TABLE messages RENAME TO messages_away"))
            _, nudges = open_reaper_channel()
            nursery.start_soon(partial(run_reaper, store, get_room, lambda: NOW, nudges))
            await trio.testing.wait_all_tasks_blocked()  # the reaper asked, failed and waits
            assert not len(rooms[conversation_id])
            assert any("reaper" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
            await store.call(lambda s: s.db.execute("ALTER TABLE messages_away RENAME TO messages"))
            with trio.fail_after(2 * STORE_RETRY_SECONDS):  # MockClock: no real wait
                erased = await rooms[conversation_id].receive()
            assert erased == SystemDeleted(message_id(conversation_id, 1), NOW)
            nursery.cancel_scope.cancel()
    finally:
        db.close()

