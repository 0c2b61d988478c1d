"""Messages over the real server: send, fan-out, seq, idempotency, read, delete, delivery
receipts, history and durability across a restart (contract §4, §5, §11)."""
from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import (
    TS,
    Client,
    Harness,
    TaskSteps,
    assert_error,
    concerning,
    history,
    join,
    joined_pair,
    send_text,
    settle,
    start_server,
    text,
)

# --- shared helpers -------------------------------------------------------------------

MESSAGE_FIELDS = {"id", "conversation_id", "sender_id", "content", "type", "created_at", "updated_at",
                  "is_read", "metadata", "seq"}


def timestamps(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every ``timestamp`` / ``*_at`` value anywhere in a frame."""
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if (key == "timestamp" or key.endswith("_at")) and value is not None:
                found.append((f"{path}{key}", value))
            found += timestamps(value, f"{path}{key}.")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += timestamps(value, f"{path}{i}.")
    return found


# --- message:send ---------------------------------------------------------------------

async def test_send_acks_sender_with_ref_and_broadcasts_to_joined_connections_without_ref(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    alice2 = await harness.connect("alice")
    await join(alice2, conv)
    await settle(alice, bob, alice2)

    ref = await alice.send("message:send", text(conv, "hi bob"))
    ack = await alice.expect("message:new")
    assert ack["ref"] == ref
    for other in (bob, alice2):
        got = await other.expect("message:new")
        assert "ref" not in got
        assert got["data"] == ack["data"]
        assert concerning(await other.nothing_more(), conv, "conversation:unread") == []  # joined: no unread


async def test_a_send_with_every_connection_in_the_room_needs_no_presence_step(
        autojump_clock: Any, harness: Harness) -> None:
    """Both ends joined, no other connection: presence has nothing to do for the send (no
    unread counts, no receipts elsewhere), so it is not asked (issue 10: a hop per message).
    Once bob has a connection outside the room, it is: that connection gets the unread count."""
    alice, bob, conv = await joined_pair(harness)
    steps = TaskSteps("run_presence")
    trio.lowlevel.add_instrument(steps)
    try:
        for n in range(5):
            await send_text(alice, conv, f"quiet {n}")
            await bob.expect("message:new")
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.steps == 0

    bob_elsewhere = await harness.connect("bob")
    await settle(bob_elsewhere)
    await send_text(alice, conv, "now bob has a connection outside the room")
    unread = await bob_elsewhere.expect("conversation:unread")
    assert unread["data"]["conversation_id"] == conv and unread["data"]["unread_count"] == 6, unread


@pytest.mark.parametrize("client_message_id", [None, "cm-0001"])
async def test_message_object_has_the_contract_fields(
        autojump_clock: Any, harness: Harness, client_message_id: str | None) -> None:
    token = harness.token("alice", avatar_url="https://example.com/a.png")
    alice = await harness.connect("alice", token=token)
    conv = await harness.conversation(alice, "bob")
    extra = {} if client_message_id is None else {"client_message_id": client_message_id}

    message = await send_text(alice, conv, "how are you?", **extra)
    assert MESSAGE_FIELDS <= message.keys(), message
    assert isinstance(message["id"], str) and message["id"]
    assert message["conversation_id"] == conv
    assert message["sender_id"] == "alice"
    assert message["content"] == "how are you?"
    assert message["type"] == "text"
    assert message["is_read"] is False
    assert message["metadata"] == {}
    assert message["seq"] == 1
    assert message["created_at"] == TS and message["updated_at"] == TS
    if client_message_id is None:
        assert "client_message_id" not in message
    else:
        assert message["client_message_id"] == client_message_id


async def test_message_new_carries_the_sender(autojump_clock: Any, harness: Harness) -> None:
    token = harness.token("alice", username="alice_w", avatar_url="https://example.com/a.png")
    alice = await harness.connect("alice", token=token)
    conv = await harness.conversation(alice, "bob")
    bob = await harness.connect("bob")
    await join(bob, conv)

    reply = await alice.request("message:send", text(conv))
    expected = {"id": "alice", "username": "alice_w", "avatar_url": "https://example.com/a.png"}
    assert reply["data"]["sender"] == expected
    assert (await bob.expect("message:new"))["data"]["sender"] == expected


async def test_every_timestamp_is_rfc3339_utc_with_milliseconds(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    bob_outside = await harness.connect("bob")
    m1 = await send_text(alice, conv, "one")
    await send_text(alice, conv, "two")
    for event, data in [("message:read", {"conversation_id": conv, "message_id": m1["id"]}),
                        ("message:delete", {"conversation_id": conv, "message_id": m1["id"]}),
                        ("message:history", {"conversation_id": conv}),
                        ("conversation:list", {}),
                        ("conversation:leave", {"conversation_id": conv})]:
        await bob.send(event, data)  # the replies stay in the stream, for the check below
    frames = [*await alice.nothing_more(), *await bob.nothing_more(), *await bob_outside.nothing_more()]

    names = {f["event"] for f in frames}
    assert {"message:new", "message:viewed", "message:deleted", "message:delivered", "message:history",
            "conversation:list", "conversation:left", "conversation:unread"} <= names
    stamps = [(f["event"], path, value) for f in frames for path, value in timestamps(f)]
    assert [s for s in stamps if s[2] != TS] == []
    assert all("timestamp" in f for f in frames)


async def test_non_joined_participant_gets_conversation_unread_instead_of_message_new(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness, bob_joined=False)

    first = await send_text(alice, conv, "first")
    second = await send_text(alice, conv, "second")
    got = concerning(await bob.nothing_more(), conv)
    assert [e["event"] for e in got] == ["conversation:unread", "conversation:unread"]
    assert [e["data"]["unread_count"] for e in got] == [1, 2]
    assert all(e["data"]["conversation_id"] == conv for e in got)
    last = got[1]["data"]["last_message"]
    assert {k: last[k] for k in ("id", "content", "type", "sender_id", "created_at")} == {
        "id": second["id"], "content": "second", "type": "text", "sender_id": "alice",
        "created_at": second["created_at"]}
    assert got[0]["data"]["last_message"]["id"] == first["id"]


async def test_sender_own_non_joined_connection_gets_nothing(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")  # bob is offline: no delivery receipts
    await join(alice, conv)
    alice_outside = await harness.connect("alice")
    await settle(alice, alice_outside)

    await send_text(alice, conv)
    assert await alice_outside.nothing_more() == []


async def test_unread_summary_follows_connection_established(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv_two = await harness.conversation(alice, "bob")
    conv_one = await harness.conversation(alice, "bob", "carol")
    conv_none = await harness.conversation(alice, "bob", "dave")
    await send_text(alice, conv_two, "a")
    last_two = await send_text(alice, conv_two, "b")
    last_one = await send_text(alice, conv_one, "c")
    already_read = await send_text(alice, conv_none, "read on another device")
    bob_earlier = await harness.connect("bob")
    await bob_earlier.request("message:read", {"conversation_id": conv_none, "message_id": already_read["id"]})
    await bob_earlier.close()

    bob = await harness.connect("bob")  # connection:established already consumed
    summaries = [await bob.recv(), await bob.recv()]
    assert [s["event"] for s in summaries] == ["conversation:unread"] * 2
    by_conv = {s["data"]["conversation_id"]: s["data"] for s in summaries}
    assert by_conv.keys() == {conv_two, conv_one}
    assert by_conv[conv_two]["unread_count"] == 2
    assert by_conv[conv_two]["last_message"]["id"] == last_two["id"]
    assert by_conv[conv_one]["unread_count"] == 1
    assert by_conv[conv_one]["last_message"]["id"] == last_one["id"]
    assert concerning(await bob.nothing_more(), conv_none, "conversation:unread") == []


# --- seq ------------------------------------------------------------------------------

async def test_seq_counts_per_conversation_independently(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    with_bob = await harness.conversation(alice, "bob")
    with_carol = await harness.conversation(alice, "carol")

    seqs = [(c, (await send_text(alice, c))["seq"]) for c in (with_bob, with_bob, with_carol, with_bob, with_carol)]
    assert seqs == [(with_bob, 1), (with_bob, 2), (with_carol, 1), (with_bob, 3), (with_carol, 2)]


async def test_concurrent_senders_are_seen_in_ascending_seq_everywhere(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    carol = await harness.connect("carol")
    conv = await harness.conversation(alice, "bob", "carol")
    for client in (alice, bob, carol):
        await join(client, conv)
    await settle(alice, bob, carol)

    async def blast(client: Client) -> None:
        for i in range(20):
            await client.send("message:send", text(conv, f"{client.user_id} says {i}"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blast, alice)
        nursery.start_soon(blast, bob)
    for client in (alice, bob, carol):
        seqs = [(await client.expect("message:new"))["data"]["message"]["seq"] for _ in range(40)]
        assert seqs == list(range(1, 41)), (client.user_id, seqs)


# --- client_message_id ----------------------------------------------------------------

async def test_resent_client_message_id_returns_original_to_sender_only(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    original = await send_text(alice, conv, "once", client_message_id="cm-1")
    await settle(alice, bob)

    again = await send_text(alice, conv, "once", client_message_id="cm-1")
    assert (again["id"], again["seq"]) == (original["id"], original["seq"])
    assert concerning(await bob.nothing_more(), conv) == []
    assert [m["id"] for m in (await history(alice, conv))["messages"]] == [original["id"]]
    assert (await send_text(alice, conv, "next"))["seq"] == 2


async def test_same_client_message_id_from_another_sender_is_a_new_message(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    from_alice = await send_text(alice, conv, "mine", client_message_id="cm-1")
    from_bob = await send_text(bob, conv, "mine too", client_message_id="cm-1")
    assert from_bob["id"] != from_alice["id"]
    assert from_bob["seq"] == 2


# --- message:read ---------------------------------------------------------------------

async def test_read_notifies_reader_senders_and_readers_other_connections(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    alice_outside = await harness.connect("alice")
    bob_outside = await harness.connect("bob")
    await send_text(alice, conv, "m1")
    await send_text(bob, conv, "the reader's own message, inside the range read")
    m2, m3 = [await send_text(alice, conv, f"m{i}") for i in (2, 3)]
    await settle(alice, bob, alice_outside, bob_outside)

    ref = await bob.send("message:read", {"conversation_id": conv, "message_id": m2["id"]})
    reply = await bob.expect("message:viewed")
    expected = {"message_id": m2["id"], "conversation_id": conv, "reader_id": "bob", "viewed_at": TS}
    assert reply["ref"] == ref
    assert reply["data"] == expected
    for sender_conn in (alice, alice_outside):
        viewed = await sender_conn.expect("message:viewed")
        assert "ref" not in viewed and viewed["data"] == expected
    unread = await bob_outside.expect("conversation:unread")
    assert unread["data"]["conversation_id"] == conv
    assert unread["data"]["unread_count"] == 1
    assert unread["data"]["last_message"]["id"] == m3["id"]
    assert concerning(await bob.nothing_more(), conv) == []  # the reader's own connection: only its reply
    assert concerning(await bob_outside.nothing_more(), conv) == []  # bob is no sender of what he read


async def test_read_drops_the_unread_count_to_what_is_left(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness, bob_joined=False)
    m1, m2, m3 = [await send_text(alice, conv, f"m{i}") for i in (1, 2, 3)]
    await send_text(bob, conv, "bob's own message does not count")

    async def unread_count() -> int:
        listing = await bob.request("conversation:list", {})
        return next(c["unread_count"] for c in listing["data"]["conversations"] if c["id"] == conv)

    assert await unread_count() == 3
    await bob.request("message:read", {"conversation_id": conv, "message_id": m2["id"]})
    assert await unread_count() == 1
    await bob.request("message:read", {"conversation_id": conv, "message_id": m3["id"]})
    assert await unread_count() == 0
    late = await harness.connect("bob")
    assert concerning(await late.nothing_more(), conv, "conversation:unread") == []


async def test_reading_again_is_a_noop_success_with_nothing_to_the_senders(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    m1, m2 = [await send_text(alice, conv, f"m{i}") for i in (1, 2)]
    await bob.request("message:read", {"conversation_id": conv, "message_id": m2["id"]})
    await settle(alice, bob)

    for message in (m2, m1):
        reply = await bob.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
        assert reply["event"] == "message:viewed", reply
        assert reply["data"]["message_id"] == message["id"]
    assert concerning(await alice.nothing_more(), conv) == []


async def test_read_of_unknown_message_is_not_found(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    ref = await bob.send("message:read", {"conversation_id": conv, "message_id": "no-such-message"})
    assert_error(await bob.expect("error"), "NOT_FOUND", "message_id", "message:read", ref)


# --- message:delete -------------------------------------------------------------------

@pytest.mark.parametrize("deleter", ["alice", "bob"], ids=["sender", "recipient"])
async def test_any_participant_may_delete_and_joined_connections_hear_it(
        autojump_clock: Any, harness: Harness, deleter: str) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_text(alice, conv, "oops")
    requester = await harness.connect(deleter)  # not joined
    await settle(alice, bob, requester)

    ref = await requester.send("message:delete", {"conversation_id": conv, "message_id": message["id"]})
    reply = await requester.expect("message:deleted")
    expected = {"message_id": message["id"], "conversation_id": conv, "deleted_by": deleter, "deleted_at": TS}
    assert reply["ref"] == ref
    assert reply["data"] == expected
    for joined in (alice, bob):
        got = await joined.expect("message:deleted")
        assert "ref" not in got and got["data"] == expected


@pytest.mark.parametrize("type_, content, metadata", [
    ("text", "secret words", {}),
    ("photo", "a caption", {"url": "https://example.com/p.jpg"}),
])
async def test_deleted_message_stays_as_an_erased_tombstone(
        autojump_clock: Any, harness: Harness, type_: str, content: str, metadata: dict[str, Any]) -> None:
    alice, bob, conv = await joined_pair(harness)
    reply = await alice.request("message:send", {"conversation_id": conv, "type": type_, "content": content,
                                                 "metadata": metadata})
    assert reply["event"] == "message:new", reply
    doomed = reply["data"]["message"]
    kept = await send_text(alice, conv, "still here")
    deleted = await bob.request("message:delete", {"conversation_id": conv, "message_id": doomed["id"]})
    assert deleted["event"] == "message:deleted", deleted

    first, second = (await history(bob, conv))["messages"]
    assert (first["id"], first["is_deleted"], first["content"], first["metadata"]) == (doomed["id"], True, "", {})
    assert (second["id"], second["is_deleted"], second["content"]) == (kept["id"], False, "still here")


@pytest.mark.parametrize("case", ["deleted_twice", "unknown_id"])
async def test_delete_of_deleted_or_unknown_message_is_not_found(
        autojump_clock: Any, harness: Harness, case: str) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_text(alice, conv)
    if case == "deleted_twice":
        await alice.request("message:delete", {"conversation_id": conv, "message_id": message["id"]})
        target = message["id"]
    else:
        target = "no-such-message"
    ref = await bob.send("message:delete", {"conversation_id": conv, "message_id": target})
    assert_error(await bob.expect("error"), "NOT_FOUND", "message_id", "message:delete", ref)


# --- message:delivered ----------------------------------------------------------------

def delivered(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["data"]["message_id"], e["data"]["recipient_id"])
            for e in events if e["event"] == "message:delivered"]


async def test_delivered_once_when_recipient_gets_message_new(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    bob2 = await harness.connect("bob")
    alice2 = await harness.connect("alice")
    await join(bob2, conv)
    await settle(alice, bob, bob2, alice2)

    message = await send_text(alice, conv)
    receipt = await alice.expect("message:delivered")
    assert receipt["data"] == {"message_id": message["id"], "conversation_id": conv,
                               "recipient_id": "bob", "delivered_at": TS}
    assert (await alice2.expect("message:delivered"))["data"] == receipt["data"]
    await history(bob, conv)
    assert delivered(await alice.nothing_more()) == []


async def test_the_room_sends_the_receipt_with_the_ack_and_every_connection_gets_it_once(
        autojump_clock: Any, harness: Harness) -> None:
    """The receipt of a delivery recorded with the message reaches the sender's joined
    connections from the room, right behind the acknowledgement (issue 10: one write for
    both), and the sender's other connections from presence: once each, never twice."""
    alice, bob, conv = await joined_pair(harness)
    alice_joined_too = await harness.connect("alice")
    await join(alice_joined_too, conv)
    alice_elsewhere = await harness.connect("alice")
    await settle(alice, bob, alice_joined_too, alice_elsewhere)

    ref = await alice.send("message:send", text(conv, "hi"))
    ack = await alice.recv()
    assert ack["event"] == "message:new" and ack["ref"] == ref
    receipt = await alice.recv()  # next on the wire: nothing comes between
    assert receipt["event"] == "message:delivered"
    assert receipt["data"]["message_id"] == ack["data"]["message"]["id"]
    assert receipt["data"]["recipient_id"] == "bob"
    expected = [(ack["data"]["message"]["id"], "bob")]
    assert delivered(await alice.nothing_more()) == []
    assert delivered(await alice_joined_too.nothing_more()) == expected
    assert delivered(await alice_elsewhere.nothing_more()) == expected


async def test_delivered_when_recipient_gets_conversation_unread(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness, bob_joined=False)
    message = await send_text(alice, conv)
    assert (await bob.expect("conversation:unread"))["data"]["last_message"]["id"] == message["id"]
    receipt = await alice.expect("message:delivered")
    assert (receipt["data"]["message_id"], receipt["data"]["recipient_id"]) == (message["id"], "bob")

    await join(bob, conv)
    await history(bob, conv)
    assert delivered(await alice.nothing_more()) == []


async def test_delivered_when_offline_recipient_catches_up(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    m1 = await send_text(alice, conv, "while you were away")
    m2 = await send_text(alice, conv, "still away?")
    assert delivered(await alice.nothing_more()) == []

    bob = await harness.connect("bob")  # the unread summary carries m2 as last_message
    assert delivered(await alice.nothing_more()) == [(m2["id"], "bob")]
    await history(bob, conv)  # m1 reaches bob only now
    assert delivered(await alice.nothing_more()) == [(m1["id"], "bob")]
    await history(bob, conv)
    assert delivered(await alice.nothing_more()) == []


# --- message:history ------------------------------------------------------------------

@pytest.mark.parametrize("query, seqs, has_more", [
    ({"limit": 3}, [5, 6, 7], True),
    ({"limit": 7}, [1, 2, 3, 4, 5, 6, 7], False),
    ({"limit": 100}, [1, 2, 3, 4, 5, 6, 7], False),
    ({"before_seq": 5, "limit": 2}, [3, 4], True),
    ({"before_seq": 3, "limit": 5}, [1, 2], False),
    ({"before_seq": 1}, [], False),
    ({"after_seq": 2, "limit": 3}, [3, 4, 5], True),
    ({"after_seq": 4, "limit": 3}, [5, 6, 7], False),
    ({"after_seq": 7}, [], False),
    ({"after_seq": 1, "before_seq": 6}, [2, 3, 4, 5], False),
    ({"after_seq": 1, "before_seq": 6, "limit": 4}, [2, 3, 4, 5], False),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
async def test_history_pages(
        autojump_clock: Any, harness: Harness, query: dict[str, Any], seqs: list[int],
        has_more: bool) -> None:
    alice, bob, conv = await joined_pair(harness)
    sent = [await send_text(alice, conv, f"m{i}") for i in range(1, 8)]

    page = await history(bob, conv, **query)
    assert page["conversation_id"] == conv
    assert [m["seq"] for m in page["messages"]] == seqs
    assert [m["id"] for m in page["messages"]] == [sent[s - 1]["id"] for s in seqs]
    assert page["has_more"] is has_more


async def test_history_with_both_cursors_and_a_small_limit_stays_in_range(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    for i in range(1, 8):
        await send_text(alice, conv, f"m{i}")
    page = await history(bob, conv, after_seq=1, before_seq=6, limit=2)
    seqs = [m["seq"] for m in page["messages"]]
    assert len(seqs) == 2 and seqs == sorted(seqs) and set(seqs) <= {2, 3, 4, 5}
    assert page["has_more"] is True


@pytest.mark.parametrize("settings", [{"limits": {"messages_per_minute": 0}}], indirect=True,
                         ids=["no_rate_limit"])
async def test_history_default_limit_is_the_newest_50(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    for i in range(52):
        await send_text(alice, conv, f"m{i}")
    page = await history(bob, conv)
    assert [m["seq"] for m in page["messages"]] == list(range(3, 53))
    assert page["has_more"] is True


@pytest.mark.parametrize("limit", [0, 101, "x", -1, 1.5])
async def test_history_rejects_a_limit_outside_1_to_100(
        autojump_clock: Any, harness: Harness, limit: Any) -> None:
    alice, bob, conv = await joined_pair(harness)
    ref = await bob.send("message:history", {"conversation_id": conv, "limit": limit})
    assert_error(await bob.expect("error"), "VALIDATION_ERROR", "limit", "message:history", ref)


# --- durability -----------------------------------------------------------------------

async def test_acknowledged_messages_survive_a_restart_and_seq_continues(
        autojump_clock: Any, settings: Any, watchdog: dict[str, Any]) -> None:
    watchdog["token"] = trio.lowlevel.current_trio_token()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, settings)
            first = Harness(server, nursery, settings)
            alice = await first.connect("alice")
            conv = await first.conversation(alice, "bob")
            sent = [await send_text(alice, conv, f"m{i}") for i in range(5)]
            server.request_shutdown()
            closed = await alice.expect("connection:closed")
            assert closed["data"] == {"reason": "server_shutdown", "code": 1001, "timestamp": TS}

        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, settings)
            bob = await Harness(server, nursery, settings).connect("bob")
            page = await history(bob, conv)
            assert [(m["id"], m["seq"], m["content"]) for m in page["messages"]] == [
                (m["id"], m["seq"], m["content"]) for m in sent]
            assert (await send_text(bob, conv, "after the restart"))["seq"] == 6
            server.request_shutdown()
            await bob.expect("connection:closed")
