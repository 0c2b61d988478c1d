"""Conversations over the real server: create, list, join/leave and the room limit, who may
touch a conversation, group and multi-device scenarios (contract §4, §5, §11)."""
from __future__ import annotations

import re
from typing import Any

import pytest
import trio
from conftest import Client, Harness, assert_error, concerning, make_settings, settle

# --- shared helpers -------------------------------------------------------------------

TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


class _Timestamp:
    """Equal to any RFC 3339 UTC timestamp with milliseconds and ``Z`` (contract §11.11)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and TS_RE.fullmatch(other) is not None

    def __repr__(self) -> str:
        return "<RFC3339 .mmmZ>"


TS = _Timestamp()

@pytest.fixture
def settings(request: Any, tmp_path: Any, engine: Any) -> Any:
    """The default settings, or overrides given with ``parametrize("settings", [...], indirect=True)``."""
    return make_settings(tmp_path, **getattr(request, "param", {}))


def text(conversation_id: str, content: str = "hello there") -> dict[str, Any]:
    return {"conversation_id": conversation_id, "content": content, "type": "text", "metadata": {}}


async def send(client: Client, conversation_id: str, content: str = "hello there") -> dict[str, Any]:
    """Send a text message; return the acknowledged message object."""
    reply = await client.request("message:send", text(conversation_id, content))
    assert reply["event"] == "message:new", reply
    return reply["data"]["message"]


async def join(client: Client, conversation_id: str) -> dict[str, Any]:
    reply = await client.request("conversation:join", {"conversation_id": conversation_id})
    assert reply["event"] == "conversation:joined", reply
    return reply


async def listing(client: Client) -> dict[str, dict[str, Any]]:
    """``conversation:list`` indexed by conversation id."""
    reply = await client.request("conversation:list", {})
    assert reply["event"] == "conversation:list", reply
    return {c["id"]: c for c in reply["data"]["conversations"]}


# --- conversation:create --------------------------------------------------------------

async def test_create_replies_with_ref_and_tells_the_other_participants(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob_phone = await harness.connect("bob")
    bob_laptop = await harness.connect("bob")

    ref = await alice.send("conversation:create", {"participant_ids": ["bob", "carol"]})
    reply = await alice.expect("conversation:created", ref=ref)
    conversation = reply["data"]["conversation"]
    assert conversation.keys() == {"id", "participant_ids", "created_at"}
    assert sorted(conversation["participant_ids"]) == ["alice", "bob", "carol"]
    assert conversation["created_at"] == TS
    for bob in (bob_phone, bob_laptop):
        got = await bob.expect("conversation:created")
        assert "ref" not in got and got["data"] == {"conversation": conversation}


@pytest.mark.parametrize("participant_ids", [["bob"], ["alice", "bob"]], ids=["caller_omitted", "caller_listed"])
async def test_create_always_includes_the_caller(
        autojump_clock: Any, harness: Harness, participant_ids: list[str]) -> None:
    alice = await harness.connect("alice")
    reply = await alice.request("conversation:create", {"participant_ids": participant_ids})
    assert reply["event"] == "conversation:created", reply
    assert sorted(reply["data"]["conversation"]["participant_ids"]) == ["alice", "bob"]


async def test_create_of_an_existing_pair_returns_the_same_conversation(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    first = await harness.conversation(alice, "bob")
    assert await harness.conversation(alice, "bob") == first
    assert await harness.conversation(bob, "alice") == first
    assert list(await listing(alice)) == [first]


@pytest.mark.parametrize("others, outcome", [(9, "conversation:created"), (10, "CONVERSATION_FULL")])
async def test_create_counts_the_caller_toward_max_participants(
        autojump_clock: Any, harness: Harness, others: int, outcome: str) -> None:
    alice = await harness.connect("alice")
    reply = await alice.request("conversation:create", {"participant_ids": [f"user{i}" for i in range(others)]})
    if outcome == "CONVERSATION_FULL":  # request() returns only the reply that echoes our ref
        assert_error(reply, "CONVERSATION_FULL", None, "conversation:create")
    else:
        assert reply["event"] == "conversation:created", reply
        assert len(reply["data"]["conversation"]["participant_ids"]) == 10


@pytest.mark.parametrize("data", [
    {"participant_ids": "bob"},
    {"participant_ids": {"id": "bob"}},
    {"participant_ids": None},
    {"participant_ids": []},
    {},
], ids=["string", "object", "null", "empty", "missing"])
async def test_create_rejects_participant_ids_that_are_not_a_list_of_users(
        autojump_clock: Any, harness: Harness, data: dict[str, Any]) -> None:
    alice = await harness.connect("alice")
    ref = await alice.send("conversation:create", data)
    reply = await alice.expect("error", ref=ref)
    assert_error(reply, "VALIDATION_ERROR", "participant_ids", "conversation:create", ref)
    assert await listing(alice) == {}


# --- conversation:list ----------------------------------------------------------------

async def test_list_shows_participants_unread_count_and_last_message(
        autojump_clock: Any, harness: Harness) -> None:
    carol = await harness.connect("carol")
    await carol.close()
    await trio.sleep(10)  # mock time: past carol's offline grace period, so last_seen_at is stored
    alice = await harness.connect("alice")
    bob = await harness.connect("bob", token=harness.token("bob", avatar_url="https://example.com/b.png"))
    with_bob = await harness.conversation(alice, "bob")
    with_carol = await harness.conversation(alice, "carol")
    group = await harness.conversation(alice, "bob", "carol")
    await send(bob, with_bob, "one")
    last_from_bob = await send(bob, with_bob, "two")
    mine = await send(alice, group, "my own")

    convs = await listing(alice)
    assert convs.keys() == {with_bob, with_carol, group}
    people = {p["id"]: p for p in convs[group]["participants"]}
    assert people.keys() == {"alice", "bob", "carol"}
    assert all(p.keys() == {"id", "username", "avatar_url", "online", "last_seen_at"} for p in people.values())
    assert (people["bob"]["username"], people["bob"]["avatar_url"], people["bob"]["online"]) == (
        "name-bob", "https://example.com/b.png", True)
    assert (people["carol"]["username"], people["carol"]["online"], people["carol"]["last_seen_at"]) == (
        "name-carol", False, TS)
    assert people["alice"]["online"] is True
    assert (convs[with_bob]["unread_count"], convs[with_bob]["last_message"]["id"]) == (2, last_from_bob["id"])
    assert convs[with_bob]["last_message"]["content"] == "two"
    assert (convs[group]["unread_count"], convs[group]["last_message"]["id"]) == (0, mine["id"])
    assert (convs[with_carol]["unread_count"], convs[with_carol]["last_message"]) == (0, None)


# --- conversation:join / conversation:leave -------------------------------------------

async def test_join_and_leave_reply_with_ref(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")

    ref = await alice.send("conversation:join", {"conversation_id": conv})
    joined = await alice.expect("conversation:joined", ref=ref)
    assert joined["data"] == {"conversation_id": conv, "joined_at": TS}
    ref = await alice.send("conversation:leave", {"conversation_id": conv})
    left = await alice.expect("conversation:left", ref=ref)
    assert left["data"] == {"conversation_id": conv, "left_at": TS}


async def test_leave_without_join_still_replies_left(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    reply = await alice.request("conversation:leave", {"conversation_id": conv})
    assert reply["event"] == "conversation:left", reply
    assert reply["data"]["conversation_id"] == conv


async def test_after_leave_messages_arrive_as_unread_not_message_new(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await join(bob, conv)
    await send(alice, conv, "while joined")
    assert (await bob.expect("message:new"))["data"]["message"]["content"] == "while joined"

    await bob.request("conversation:leave", {"conversation_id": conv})
    await settle(bob)
    later = await send(alice, conv, "after leaving")
    got = concerning(await bob.nothing_more(), conv)
    assert [e["event"] for e in got] == ["conversation:unread"]
    assert got[0]["data"]["last_message"]["id"] == later["id"]


@pytest.mark.parametrize("settings", [{"max_room_connections": 2}], indirect=True, ids=["room_of_2"])
async def test_join_beyond_max_room_connections_is_conversation_full(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    bob_laptop = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await join(alice, conv)
    await join(bob, conv)
    await join(alice, conv)  # joining again takes no second slot

    ref = await bob_laptop.send("conversation:join", {"conversation_id": conv})
    assert_error(await bob_laptop.expect("error", ref=ref), "CONVERSATION_FULL", None, "conversation:join", ref)
    await settle(bob_laptop)
    await send(alice, conv)
    assert [e["event"] for e in concerning(await bob_laptop.nothing_more(), conv)] == ["conversation:unread"]

    await bob.request("conversation:leave", {"conversation_id": conv})
    await join(bob_laptop, conv)  # a slot is free again


# --- authorization --------------------------------------------------------------------

CONVERSATION_EVENTS = [
    ("message:send", lambda c, m: text(c)),
    ("message:read", lambda c, m: {"conversation_id": c, "message_id": m}),
    ("message:delete", lambda c, m: {"conversation_id": c, "message_id": m}),
    ("message:history", lambda c, m: {"conversation_id": c}),
    ("typing:start", lambda c, m: {"conversation_id": c}),
    ("typing:stop", lambda c, m: {"conversation_id": c}),
    ("conversation:join", lambda c, m: {"conversation_id": c}),
    ("conversation:leave", lambda c, m: {"conversation_id": c}),
]
EVENT_IDS = [name for name, _ in CONVERSATION_EVENTS]


async def private_conversation(harness: Harness) -> tuple[Client, Client, str, str]:
    """alice and bob, joined, with one message; returns (alice, bob, conversation, message id)."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await join(alice, conv)
    await join(bob, conv)
    message = await send(alice, conv, "just us")
    await settle(alice, bob)
    return alice, bob, conv, message["id"]


@pytest.mark.parametrize("event, make_data", CONVERSATION_EVENTS, ids=EVENT_IDS)
async def test_outsider_is_forbidden(
        autojump_clock: Any, harness: Harness, event: str, make_data: Any) -> None:
    alice, bob, conv, message_id = await private_conversation(harness)
    mallory = await harness.connect("mallory")
    ref = await mallory.send(event, make_data(conv, message_id))
    assert_error(await mallory.expect("error", ref=ref), "FORBIDDEN", "conversation_id", event, ref)
    assert concerning(await alice.nothing_more(), conv) == []
    page = await alice.request("message:history", {"conversation_id": conv})
    assert [m["id"] for m in page["data"]["messages"]] == [message_id]  # nothing was stored


@pytest.mark.parametrize("event, make_data", CONVERSATION_EVENTS, ids=EVENT_IDS)
async def test_unknown_conversation_is_not_found(
        autojump_clock: Any, harness: Harness, event: str, make_data: Any) -> None:
    alice = await harness.connect("alice")
    ref = await alice.send(event, make_data("no-such-conversation", "no-such-message"))
    assert_error(await alice.expect("error", ref=ref), "NOT_FOUND", "conversation_id", event, ref)


async def test_outsider_never_hears_of_the_conversation(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv, message_id = await private_conversation(harness)
    mallory = await harness.connect("mallory")
    for event, make_data in CONVERSATION_EVENTS:  # every attempt refused, the join included
        reply = await mallory.request(event, make_data(conv, message_id))
        assert reply["data"]["code"] == "FORBIDDEN", reply

    await alice.send("typing:start", {"conversation_id": conv})
    second = await send(alice, conv, "still just us")
    await alice.send("typing:stop", {"conversation_id": conv})
    await bob.request("message:read", {"conversation_id": conv, "message_id": second["id"]})
    await bob.request("message:delete", {"conversation_id": conv, "message_id": message_id})
    await bob.request("conversation:leave", {"conversation_id": conv})
    await bob.close()
    await trio.sleep(10)  # mock time: past bob's offline grace period
    assert await mallory.nothing_more() == []


# --- scenarios ------------------------------------------------------------------------

async def test_group_of_three_fans_out_and_receipts_name_each_recipient(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, carol = [await harness.connect(u) for u in ("alice", "bob", "carol")]
    conv = await harness.conversation(alice, "bob", "carol")
    for client in (alice, bob, carol):
        await join(client, conv)
    await settle(alice, bob, carol)

    message = await send(alice, conv, "hi both")
    for other in (bob, carol):
        assert (await other.expect("message:new"))["data"]["message"]["id"] == message["id"]
    receipts = [(await alice.expect("message:delivered"))["data"] for _ in range(2)]
    assert sorted(r["recipient_id"] for r in receipts) == ["bob", "carol"]
    assert {r["message_id"] for r in receipts} == {message["id"]}

    for reader in (bob, carol):
        await reader.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
        viewed = await alice.expect("message:viewed")
        assert (viewed["data"]["message_id"], viewed["data"]["reader_id"]) == (message["id"], reader.user_id)
    reply = await send(bob, conv, "hi alice")
    for other in (alice, carol):
        assert (await other.expect("message:new"))["data"]["message"]["id"] == reply["id"]
    assert concerning(await bob.nothing_more(), conv, "message:viewed") == []


async def test_one_user_on_two_devices_sees_everything_on_both(autojump_clock: Any, harness: Harness) -> None:
    phone = await harness.connect("alice")
    laptop = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(phone, "bob")
    for client in (phone, laptop, bob):
        await join(client, conv)
    await settle(phone, laptop, bob)

    mine = await send(phone, conv, "from my phone")
    echoed = await laptop.expect("message:new")
    assert "ref" not in echoed and echoed["data"]["message"]["id"] == mine["id"]
    from_bob = await send(bob, conv, "hello alice")
    await bob.request("message:read", {"conversation_id": conv, "message_id": mine["id"]})
    for device in (phone, laptop):
        assert (await device.expect("message:new"))["data"]["message"]["id"] == from_bob["id"]
        assert (await device.expect("message:viewed"))["data"]["reader_id"] == "bob"

    await laptop.request("conversation:leave", {"conversation_id": conv})
    await settle(phone, laptop)
    later = await send(bob, conv, "still there?")
    assert (await phone.expect("message:new"))["data"]["message"]["id"] == later["id"]
    unread = await laptop.expect("conversation:unread")
    assert (unread["data"]["unread_count"], unread["data"]["last_message"]["id"]) == (2, later["id"])

    await phone.close()
    await trio.sleep(10)  # mock time: well past the offline grace period
    assert [e["event"] for e in await bob.nothing_more() if e["event"].startswith("user:")] == []
