"""Delivery positions (issue 10, proposal 5): a conversation's ``delivered_seq`` (everything up
to it is delivered to everyone) and a participant's (to them; their position is the larger of
the two) instead of a delivery row per message and recipient; rows only for deliveries past a
gap. What a client sees does not change: a ``message:delivered`` goes out
once per (message, recipient), at its first delivery, however that comes (the room, a catch-up
after a reconnect, history pages read out of order, another node's room). Both engines."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_support import pair_across, running_cluster
from conftest import (
    RATE_LIMITS_OFF,
    Harness,
    history,
    join,
    joined_pair,
    make_settings,
    query,
    send_text,
    settle,
)

from winkr.config import Settings
from winkr.records import SendItem, StoredMessage
from winkr.store import maintenance
from winkr.store.engine import Database, open_engine
from winkr.store.schema import migration_sql
from winkr.store.store import Store


def delivered(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((e["data"]["message_id"], e["data"]["recipient_id"])
                  for e in events if e["event"] == "message:delivered")


def positions(settings: Settings, conv: str) -> dict[str, int]:
    """Each participant's position: the larger of the conversation's and their own."""
    return {str(user): int(seq) for user, seq in query(
        settings, "SELECT p.user_id, CASE WHEN p.delivered_seq > c.delivered_seq THEN p.delivered_seq "
                  "ELSE c.delivered_seq END FROM participants p JOIN conversations c ON c.id = p.conversation_id "
                  "WHERE p.conversation_id = ?", (conv,))}


def own_positions(settings: Settings, conv: str) -> dict[str, int]:
    return {str(user): int(seq) for user, seq in query(
        settings, "SELECT user_id, delivered_seq FROM participants WHERE conversation_id = ?", (conv,))}


def rows(settings: Settings, conv: str) -> list[tuple[str, int]]:
    return [(str(user), int(seq)) for user, seq in query(
        settings, "SELECT user_id, seq FROM deliveries WHERE conversation_id = ? ORDER BY user_id, seq", (conv,))]


async def test_a_quiet_pair_moves_the_conversations_position_and_writes_no_delivery(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    for sender, receiver in [(alice, bob), (bob, alice), (alice, bob), (alice, bob)]:
        sent = await send_text(sender, conv)
        receipt = await sender.expect("message:delivered")
        assert (receipt["data"]["message_id"], receipt["data"]["recipient_id"]) == (sent["id"], receiver.user_id)
    assert positions(harness.settings, conv) == {"alice": 4, "bob": 4}
    assert own_positions(harness.settings, conv) == {"alice": 0, "bob": 0}  # the send moved last_seq's row only
    assert rows(harness.settings, conv) == []
    await history(bob, conv)
    await history(alice, conv)
    assert delivered(await alice.nothing_more() + await bob.nothing_more()) == []


async def test_catch_up_and_history_pages_out_of_order_deliver_each_message_once_and_close_the_gap(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    await join(alice, conv)
    ids = [(await send_text(alice, conv, f"m{n}"))["id"] for n in range(1, 8)]  # bob is away: nothing delivered
    assert delivered(await alice.nothing_more()) == []

    bob = await harness.connect("bob")  # the catch-up shows bob the last message only
    assert delivered(await alice.nothing_more()) == [(ids[6], "bob")]
    await history(bob, conv, limit=2)  # 6 and 7: 6 is new
    assert delivered(await alice.nothing_more()) == [(ids[5], "bob")]
    await history(bob, conv, before_seq=3, limit=1)  # 2, before 1 was ever seen
    assert delivered(await alice.nothing_more()) == [(ids[1], "bob")]
    assert positions(harness.settings, conv) == {"alice": 0, "bob": 0}  # alice's own: nothing to deliver to her
    assert rows(harness.settings, conv) == [("bob", 2), ("bob", 6), ("bob", 7)]

    await history(bob, conv, before_seq=6)  # 1 to 5: 1, 3, 4 and 5 are new; no gap is left
    assert delivered(await alice.nothing_more()) == [(ids[n], "bob") for n in (0, 2, 3, 4)]
    assert positions(harness.settings, conv) == {"alice": 0, "bob": 7}
    assert rows(harness.settings, conv) == []

    await join(bob, conv)
    await settle(alice, bob)
    m8 = await send_text(alice, conv)
    assert delivered(await alice.nothing_more()) == [(m8["id"], "bob")]
    await history(bob, conv, limit=100)
    assert delivered(await alice.nothing_more()) == []
    assert positions(harness.settings, conv) == {"alice": 8, "bob": 8}
    assert rows(harness.settings, conv) == []


async def test_a_position_passes_over_ones_own_and_deleted_messages(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    await send_text(bob, conv, "mine")  # 1
    await bob.close()
    await trio.sleep(10)  # mock time: bob's departure is known everywhere
    doomed = await send_text(alice, conv, "oops")  # 2
    last = await send_text(alice, conv, "this one")  # 3
    reply = await alice.request("message:delete", {"conversation_id": conv, "message_id": doomed["id"]})
    assert reply["event"] == "message:deleted", reply
    assert positions(harness.settings, conv) == {"alice": 1, "bob": 1}
    await alice.nothing_more()

    bob = await harness.connect("bob")  # catch-up: 3 reaches bob, and 2 never will (deleted)
    assert delivered(await alice.nothing_more()) == [(last["id"], "bob")]
    assert positions(harness.settings, conv) == {"alice": 1, "bob": 3}
    assert rows(harness.settings, conv) == []
    await join(bob, conv)
    await settle(alice, bob)
    m4 = await send_text(alice, conv)
    assert delivered(await alice.nothing_more()) == [(m4["id"], "bob")]
    assert positions(harness.settings, conv) == {"alice": 4, "bob": 4}
    assert rows(harness.settings, conv) == []


async def test_a_deleted_message_never_delivered_does_not_hold_a_position_back(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    await join(alice, conv)
    doomed = await send_text(alice, conv, "oops")  # bob is away
    reply = await alice.request("message:delete", {"conversation_id": conv, "message_id": doomed["id"]})
    assert reply["event"] == "message:deleted", reply
    bob = await harness.connect("bob")  # nothing unread: no catch-up delivery, bob's position stays at 0
    await join(bob, conv)
    await settle(alice, bob)
    assert positions(harness.settings, conv) == {"alice": 0, "bob": 0}

    sent = await send_text(alice, conv)  # nothing bob still needs lies before it: the position moves
    assert delivered(await alice.nothing_more()) == [(sent["id"], "bob")]
    assert positions(harness.settings, conv) == {"alice": 2, "bob": 2}
    assert rows(harness.settings, conv) == []


async def test_in_a_group_a_recipient_away_keeps_its_position_and_catches_up_by_history(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob = await harness.connect("alice"), await harness.connect("bob")
    conv = await harness.conversation(alice, "bob", "carol")
    await join(alice, conv)
    await join(bob, conv)
    await settle(alice, bob)
    first = await send_text(alice, conv)
    second = await send_text(bob, conv)
    assert delivered(await alice.nothing_more() + await bob.nothing_more()) == [
        (first["id"], "bob"), (second["id"], "alice")]
    assert positions(harness.settings, conv) == {"alice": 2, "bob": 1, "carol": 0}  # bob's own 2 is not counted yet

    carol = await harness.connect("carol")  # catch-up: the last message, past carol's gap
    assert delivered(await bob.nothing_more()) == [(second["id"], "carol")]
    assert rows(harness.settings, conv) == [("carol", 2)]
    await history(carol, conv)
    assert delivered(await alice.nothing_more() + await bob.nothing_more()) == [(first["id"], "carol")]
    assert positions(harness.settings, conv) == {"alice": 2, "bob": 1, "carol": 2}
    assert rows(harness.settings, conv) == []

    await join(carol, conv)
    await settle(alice, bob, carol)
    third = await send_text(alice, conv)  # nobody misses anything: the conversation's position catches up
    assert delivered(await alice.nothing_more()) == [(third["id"], "bob"), (third["id"], "carol")]
    assert positions(harness.settings, conv) == {"alice": 3, "bob": 3, "carol": 3}
    assert query(harness.settings, "SELECT delivered_seq FROM conversations WHERE id = ?", (conv,)) == [(3,)]
    fourth = await send_text(bob, conv)
    assert delivered(await bob.nothing_more()) == [(fourth["id"], "alice"), (fourth["id"], "carol")]
    assert own_positions(harness.settings, conv) == {"alice": 3, "bob": 3, "carol": 3}  # only the conversation's moved
    assert positions(harness.settings, conv) == {"alice": 4, "bob": 4, "carol": 4}


async def test_on_two_nodes_the_first_to_record_a_delivery_sends_the_receipt(
        autojump_clock: Any, tmp_path: Any) -> None:
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF)
    async with running_cluster(settings) as cluster:
        alice = await cluster.node(0).connect("alice")
        conv = await cluster.node(0).conversation(alice, "bob")
        await join(alice, conv)
        away = [await send_text(alice, conv, f"away {n}") for n in (1, 2)]
        bob = await cluster.node(1).connect("bob")  # catch-up on node 1: 2, past the gap at 1
        assert delivered(await alice.nothing_more()) == [(away[1]["id"], "bob")]
        await join(bob, conv)
        bob_here = await cluster.node(0).connect("bob")  # bob joined on both nodes
        await join(bob_here, conv)
        await settle(alice, bob, bob_here)

        third = await send_text(alice, conv)  # recorded by node 0 with the insert (a row: bob is behind)
        assert delivered(await alice.nothing_more()) == [(third["id"], "bob")]
        await history(bob, conv)  # on node 1: 1 is new, and the gap closes
        assert delivered(await alice.nothing_more()) == [(away[0]["id"], "bob")]
        assert positions(settings, conv) == {"alice": 0, "bob": 3}
        assert rows(settings, conv) == []

        fourth = await send_text(alice, conv)  # node 0 moves bob's position; node 1's room finds it recorded
        assert delivered(await alice.nothing_more()) == [(fourth["id"], "bob")]
        await bob_here.close()
        await settle(alice, bob)
        fifth = await send_text(alice, conv)  # now only node 1's room has bob: it records and tells
        assert delivered(await alice.nothing_more() + await bob.nothing_more()) == [(fifth["id"], "bob")]
        assert positions(settings, conv) == {"alice": 4, "bob": 5}
        assert rows(settings, conv) == []


async def test_a_service_account_in_the_room_on_two_nodes_gets_one_receipt_per_message(
        autojump_clock: Any, tmp_path: Any) -> None:
    """A service account is no participant (no position): its deliveries stay rows, also when
    the participants' delivery moves only the conversation's position."""
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF)
    async with running_cluster(settings) as cluster:
        alice, bob, conv = await joined_pair(cluster.node(0))
        watchers = [await cluster.node(n).connect("matchmaker", service=True) for n in (0, 1)]
        for watcher in watchers:
            await join(watcher, conv)
        await settle(alice, bob, *watchers)
        sent = await send_text(alice, conv)
        assert delivered(await alice.nothing_more()) == [(sent["id"], "bob"), (sent["id"], "matchmaker")]
        assert positions(settings, conv) == {"alice": 1, "bob": 1}
        assert rows(settings, conv) == [("matchmaker", 1)]


async def test_on_two_nodes_a_pair_writes_no_delivery_rows(autojump_clock: Any, tmp_path: Any) -> None:
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF)
    async with running_cluster(settings) as cluster:
        alice, bob, conv = await pair_across(cluster)
        for sender, receiver in [(alice, bob), (bob, alice), (alice, bob)]:
            sent = await send_text(sender, conv)
            await receiver.expect("message:new")
            assert delivered(await sender.nothing_more() + await receiver.nothing_more()) == [
                (sent["id"], receiver.user_id)]
        assert positions(settings, conv) == {"alice": 2, "bob": 3}  # each node moves its recipient's own
        assert rows(settings, conv) == []


# --- the migration: rows without a gap from the start become positions -----------------------------

def _v5_database(settings: Settings) -> None:
    """A database as winkr left it at schema 5 (delivery rows only), on the test's engine."""
    database = settings.database
    if database.engine == "sqlite":
        db = sqlite3.connect(database.path, isolation_level=None)
        try:
            for number in range(5):
                for statement in migration_sql(number, "sqlite").split(";\n"):
                    if statement.strip():
                        db.execute(statement)
            db.execute("PRAGMA user_version = 5")
        finally:
            db.close()
        return
    import psycopg

    with psycopg.connect(database.conninfo, autocommit=True) as connection:
        connection.execute("CREATE TABLE schema_migrations (version bigint PRIMARY KEY, "
                           "applied_at double precision NOT NULL)")
        for number in range(5):
            connection.execute(migration_sql(number, "postgresql"))
            connection.execute("INSERT INTO schema_migrations VALUES (%s, 0)", (number + 1,))


def test_the_migration_turns_delivery_rows_without_a_gap_into_positions_and_keeps_the_rest(
        tmp_path: Path, engine: Any) -> None:
    settings = make_settings(tmp_path)
    _v5_database(settings)
    # 1 alice, 2 bob, 3 alice (deleted), 4 alice, 5 bob, 6 alice, 7 bob
    senders = ["alice", "bob", "alice", "alice", "bob", "alice", "bob"]
    query(settings, "INSERT INTO conversations (id, created_at, created_by, last_seq) VALUES ('c', 0, 'alice', 7) "
                    "RETURNING id")
    for user in ("alice", "bob", "carol"):
        query(settings, "INSERT INTO participants (conversation_id, user_id) VALUES ('c', ?) RETURNING user_id",
              (user,))
    for seq, sender in enumerate(senders, start=1):
        query(settings, "INSERT INTO messages (conversation_id, seq, sender_id, type, content, metadata, created_at, "
                        "updated_at, deleted_at) VALUES ('c', ?, ?, 'text', 'x', '{}', 0, 0, ?) RETURNING seq",
              (seq, sender, 1.0 if seq == 3 else None))
    delivered_rows = {"alice": [2, 7],  # 5 is missing: alice's own 1, 3, 4 count, up to 4
                      "bob": [1, 4, 6],  # own 2, 5, 7 and the deleted 3: no gap at all
                      "carol": [1, 2, 5, 7]}  # 4 is missing: up to 3 (the deleted 3 counts); 5 and 7 stay rows
    for user, seqs in delivered_rows.items():
        for seq in seqs:
            query(settings, "INSERT INTO deliveries (conversation_id, seq, user_id, delivered_at) "
                            "VALUES ('c', ?, ?, 0) RETURNING seq", (seq, user))

    db = open_engine(settings.database).open_writer()  # migrates
    try:
        assert positions(settings, "c") == {"alice": 4, "bob": 7, "carol": 3}
        assert rows(settings, "c") == [("alice", 7), ("carol", 5), ("carol", 7)]
        report = maintenance.check_database(settings.database)
        assert report["ok"] is True and report["needs_migration"] is False, report

        # The kept rows still answer: 5 and 7 were delivered to carol, 4 and 6 were not.
        store = Store(db)
        message = [StoredMessage("c", seq, sender, "text", "x", {}, None, 0, 0)
                   for seq, sender in enumerate(senders, start=1)]
        db.begin()
        fresh = store.record_delivered([message[6], message[4], message[3]], "carol", 5.0)
        db.commit()
        assert [d.seq for d in fresh] == [4]
        assert positions(settings, "c")["carol"] == 5  # 6 is alice's, not yet delivered to carol
        assert rows(settings, "c") == [("alice", 7), ("carol", 7)]
        db.begin()
        assert [d.seq for d in store.record_delivered([message[5]], "carol", 6.0)] == [6]
        assert store.record_delivered([message[5], message[6]], "carol", 6.0) == []
        db.commit()
        assert positions(settings, "c") == {"alice": 4, "bob": 7, "carol": 7}
        assert rows(settings, "c") == [("alice", 7)]
    finally:
        db.close()


@contextmanager
def _writer_with_a_pair(settings: Settings) -> Iterator[tuple[Database, Store, str]]:
    """A writer's connection (closed on the way out), its ``Store`` and a new, committed
    alice-bob conversation."""
    db = open_engine(settings.database).open_writer()
    try:
        store = Store(db)
        db.begin()
        conv = store.create_conversation("alice", ["bob"], is_service=False, max_participants=10,
                                         now=time.time())[0].id
        db.commit()
        yield db, store, conv
    finally:
        db.close()


@pytest.mark.postgres_only
def test_a_send_passes_over_a_position_another_node_holds_and_the_next_send_moves_it(
        tmp_path: Path, engine: Any) -> None:
    """A send holds its conversation's lock; waiting for a participant's row that another
    node's delivery recording holds could close a cycle (that node's batch may go on to send
    in this conversation). So the send records that delivery as a row, and the position moves
    at the next send, once the row is free."""
    import psycopg

    settings = make_settings(tmp_path)
    with _writer_with_a_pair(settings) as (db, store, conv):

        def send(reached: tuple[str, ...]) -> int:
            db.begin()
            result = store.insert_messages(conv, [SendItem("alice", "text", "hi", {}, None, reached)], time.time())[0]
            db.commit()
            assert not isinstance(result, Exception)
            assert [(d.seq, d.recipient_id) for d in result.deliveries] == [(result.message.seq, r) for r in reached]
            return result.message.seq

        def first_deliveries(seq: int) -> list[int]:
            db.begin()
            fresh = store.record_delivered([StoredMessage(conv, seq, "alice", "text", "hi", {}, None, 0, 0)],
                                           "bob", time.time())
            db.commit()
            return [d.seq for d in fresh]

        assert send(()) == 1  # bob is not in the room: the conversation's position stays at 0
        assert first_deliveries(1) == [1]  # bob's own position moves (bob outside the room)
        db.execute("SET lock_timeout = '5s'")  # waiting would fail the test instead of hanging it
        with psycopg.connect(settings.database.conninfo, autocommit=True) as other_node:
            other_node.execute("BEGIN")
            other_node.execute("SELECT delivered_seq FROM participants WHERE conversation_id = %s "
                               "AND user_id = 'bob' FOR UPDATE", (conv,))
            assert send(("bob",)) == 2
            other_node.execute("COMMIT")
        assert positions(settings, conv) == {"alice": 0, "bob": 1}
        assert rows(settings, conv) == [("bob", 2)]
        assert send(("bob",)) == 3  # nothing missing for either: both move, and the conversation's
        assert positions(settings, conv) == {"alice": 3, "bob": 3}
        assert query(settings, "SELECT delivered_seq FROM conversations WHERE id = ?", (conv,)) == [(3,)]
        assert first_deliveries(2) == []  # the row below the position says nothing more


def test_a_runs_counter_and_position_end_where_its_stored_messages_end(tmp_path: Path, engine: Any) -> None:
    """The send's first statement reads the counter (SQLite) or claims it for the whole run
    reaching everyone (PostgreSQL: UPDATE … RETURNING); either way the counter ends at the run's
    last stored message and the position moves only over messages everyone got: a retried
    ``client_message_id``, a refused send, nobody reached, a position behind, a closed
    conversation."""
    from winkr.errors import ProtocolError
    from winkr.ratelimit import Rate

    settings = make_settings(tmp_path)
    with _writer_with_a_pair(settings) as (db, store, conv):

        def run(*items: SendItem, rates: tuple[Rate, ...] = ()) -> list[int | str]:
            """Each item's seq (negative: a duplicate of that seq) or error code."""
            db.begin()
            results = store.insert_messages(conv, items, time.time(), rates)
            db.commit()
            return [r.code if isinstance(r, ProtocolError) else -r.message.seq if r.duplicate else r.message.seq
                    for r in results]

        def counter() -> tuple[int, int]:
            ((last, position),) = query(settings, "SELECT last_seq, delivered_seq FROM conversations WHERE id = ?",
                                        (conv,))
            return int(last), int(position)

        def to_bob(text: str, cmid: str | None = None, counted: bool = True) -> SendItem:
            return SendItem("alice", "text", text, {}, cmid, ("bob",), counted)

        assert run(to_bob("a", "x"), to_bob("b")) == [1, 2]
        assert counter() == (2, 2)
        assert run(to_bob("c"), to_bob("a again", "x"), to_bob("d")) == [3, -1, 4]  # the retry takes no seq
        assert counter() == (4, 4)
        assert run(to_bob("a once more", "x")) == [-1]  # nothing stored: nothing moves
        assert counter() == (4, 4)
        one_a_minute = (Rate(1, "minute"),)
        assert run(to_bob("e"), to_bob("refused"), to_bob("system", counted=False), rates=one_a_minute) == [
            5, "RATE_LIMITED", 6]
        assert counter() == (6, 6)
        assert run(SendItem("alice", "text", "f", {}, None, ())) == [7]  # bob away: the position stays
        assert counter() == (7, 6)
        assert run(to_bob("g")) == [8]  # bob got 8 but not 7: a row, and the position stays behind
        assert counter() == (8, 6)
        assert rows(settings, conv) == [("bob", 8)]
        assert store.record_delivered([StoredMessage(conv, 7, "alice", "text", "f", {}, None, 0, 0)], "bob",
                                      time.time())
        assert positions(settings, conv) == {"alice": 6, "bob": 8}
        db.begin()
        db.execute("UPDATE conversations SET closed_at = 1 WHERE id = ?", (conv,))
        db.commit()
        assert run(to_bob("h"), to_bob("i", "y")) == ["NOT_FOUND", "NOT_FOUND"]
        assert counter() == (8, 6)
        assert query(settings, "SELECT count(*) FROM messages WHERE conversation_id = ?", (conv,)) == [(8,)]
