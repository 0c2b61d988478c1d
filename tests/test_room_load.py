"""A room that cannot load its conversation when it wakes (the store failing for a moment:
SQLite's write lock held by another process past busy_timeout, PostgreSQL's connection
dropped) waits and loads it again; the requests waiting for it are then answered. Its load
ran outside every exception barrier, in the hub's nursery: the whole server exited ("winkr
stopped on an unexpected error: database is locked")."""
from __future__ import annotations

from typing import Any

import trio
import trio.testing
from conftest import make_settings, query, running

from winkr.room import ROOM_LOAD_RETRY_SECONDS


async def test_a_room_whose_load_fails_loads_again_and_answers_what_waited(
        autojump_clock: Any, tmp_path: Any, watchdog: dict[str, Any]) -> None:
    settings = make_settings(tmp_path)
    async with running(settings, watchdog) as harness:
        alice = await harness.connect("alice")
        conv = await harness.conversation(alice, "bob")
        store = harness.server.gateway.services.store
        # A real failure of the real store: every read of the conversations table fails.
        await store.call(lambda s: s.db.execute("ALTER TABLE conversations RENAME TO conversations_away"))
        replies: list[dict[str, Any]] = []

        async def send() -> None:
            replies.append(await alice.request("message:send", {
                "conversation_id": conv, "type": "text", "content": "waited", "client_message_id": "w1"}))

        with trio.fail_after(2 * ROOM_LOAD_RETRY_SECONDS):  # MockClock: no real wait
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()  # the room woke, its load failed; it waits
                assert not replies
                await store.call(lambda s: s.db.execute("ALTER TABLE conversations_away RENAME TO conversations"))
        (reply,) = replies
        assert reply["event"] == "message:new" and reply["data"]["message"]["seq"] == 1, reply
        assert harness.server.gateway is not None  # the server lives on
    assert query(settings, "SELECT seq, content FROM messages") == [(1, "waited")]
