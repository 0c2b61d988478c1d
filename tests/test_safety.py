"""Safety between users over the real server (contract §12, §17.2-3, §17.6): blocks, unmatch
(conversation:close), reports and privacy settings — every effect on the WebSocket path.
Real server code over in-memory streams, a real SQLite file, MockClock."""
from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from conftest import Client, Harness, assert_error, concerning, make_settings, query, running, settle
from test_conversations import TS

from winkr.store.store import Store


@pytest.fixture
def settings(request: Any, tmp_path: Any) -> Any:
    return make_settings(tmp_path, **getattr(request, "param", {}))


def text(conversation_id: str, content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"conversation_id": conversation_id, "content": content, "type": "text", "metadata": {}, **extra}


async def send(client: Client, conversation_id: str, content: str = "hello there") -> dict[str, Any]:
    reply = await client.request("message:send", text(conversation_id, content))
    assert reply["event"] == "message:new", reply
    return reply["data"]["message"]


async def join(client: Client, conversation_id: str) -> None:
    reply = await client.request("conversation:join", {"conversation_id": conversation_id})
    assert reply["event"] == "conversation:joined", reply


async def listing(client: Client) -> dict[str, dict[str, Any]]:
    reply = await client.request("conversation:list", {})
    assert reply["event"] == "conversation:list", reply
    return {c["id"]: c for c in reply["data"]["conversations"]}


async def block(client: Client, user_id: str) -> dict[str, Any]:
    reply = await client.request("user:block", {"user_id": user_id})
    assert reply["event"] == "user:blocked", reply
    return reply


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


# --- user:block ----------------------------------------------------------------------------------

async def test_block_closes_the_pair_conversation_for_every_connection_of_both(
        autojump_clock: Any, harness: Harness) -> None:
    alice_phone = await harness.connect("alice")
    alice_laptop = await harness.connect("alice")
    bob_phone = await harness.connect("bob")
    bob_laptop = await harness.connect("bob")
    conv = await harness.conversation(alice_phone, "bob")
    await join(bob_phone, conv)  # joined or not, every connection is told
    await settle(alice_phone, alice_laptop, bob_phone, bob_laptop)

    ref = await alice_phone.send("user:block", {"user_id": "bob"})
    reply = await alice_phone.expect("user:blocked", ref=ref)
    assert reply["data"] == {"user_id": "bob", "blocked_at": TS}
    for client in (alice_phone, alice_laptop, bob_phone, bob_laptop):
        closed = await client.expect("conversation:closed")
        assert "ref" not in closed, closed  # the requester's reply is user:blocked (§17.6)
        assert closed["data"] == {"conversation_id": conv, "reason": "unmatched", "closed_at": TS}
    for client in (alice_phone, alice_laptop, bob_phone, bob_laptop):
        assert named(await client.nothing_more(), "conversation:closed") == []  # once each


async def test_a_block_closing_a_conversation_whose_room_sleeps_still_tells_both(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    never_woken = await harness.conversation(alice, "bob")
    await send(alice, await harness.conversation(alice, "bob", "carol"), "keeps the connections busy")
    await settle(alice, bob)
    await block(bob, "alice")
    for client in (alice, bob):
        assert (await client.expect("conversation:closed"))["data"]["conversation_id"] == never_woken


async def test_after_a_block_every_event_naming_the_conversation_is_not_found_for_both(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    message = await send(bob, conv, "before the block")
    await block(alice, "bob")
    for client in (alice, bob):
        for event, data in (("message:send", text(conv)),
                            ("message:read", {"conversation_id": conv, "message_id": message["id"]}),
                            ("message:delete", {"conversation_id": conv, "message_id": message["id"]}),
                            ("message:history", {"conversation_id": conv}),
                            ("conversation:join", {"conversation_id": conv}),
                            ("typing:start", {"conversation_id": conv}),
                            ("conversation:close", {"conversation_id": conv})):
            reply = await client.request(event, data)
            assert_error(reply, "NOT_FOUND", "conversation_id", event)
        assert conv not in await listing(client)


async def test_a_closed_conversation_is_left_out_of_the_unread_summary(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    closed = await harness.conversation(alice, "bob")
    group = await harness.conversation(alice, "bob", "carol")
    await send(alice, closed, "unread in the closed one")
    await send(alice, group, "unread in the group")
    await bob.close()
    await block(alice, "bob")

    bob = await harness.connect("bob")
    summary = named(await bob.nothing_more(), "conversation:unread")
    assert [e["data"]["conversation_id"] for e in summary] == [group]


async def test_the_blocked_room_forgets_its_members_and_typing_ends_silently(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await join(alice, conv)
    await join(bob, conv)
    await bob.send("typing:start", {"conversation_id": conv})
    await alice.expect("typing:indicator")
    await settle(alice, bob)

    await block(bob, "alice")
    got = await alice.nothing_more(10.0)  # past the 6 s typing expiry too
    assert [e["event"] for e in concerning(got, conv)] == ["conversation:closed"]


async def test_blocking_again_is_a_no_op_success_with_the_first_time(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    await harness.conversation(alice, "bob")
    first = await block(alice, "bob")
    await settle(alice)
    await trio.sleep(5)
    again = await block(alice, "bob")
    assert again["data"] == first["data"]
    assert named(await alice.nothing_more(), "conversation:closed") == []


@pytest.mark.parametrize("user_id, field", [("alice", "user_id"), ("", "user_id"), (None, "user_id"),
                                            ("x" * 65, "user_id"), (" bob", "user_id")])
async def test_block_input_is_validated(autojump_clock: Any, harness: Harness, user_id: Any, field: str) -> None:
    alice = await harness.connect("alice")
    for event in ("user:block", "user:unblock"):
        assert_error(await alice.request(event, {"user_id": user_id}), "VALIDATION_ERROR", field, event)
    assert_error(await alice.request("user:block", {}), "VALIDATION_ERROR", "user_id", "user:block")


async def test_a_blocked_pair_cannot_create_a_two_person_conversation_either_way(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    service = await harness.connect("moderation-bot", service=True)
    await block(alice, "bob")
    for client, other in ((alice, ["bob"]), (bob, ["alice"]), (service, ["alice", "bob"])):
        reply = await client.request("conversation:create", {"participant_ids": other})
        assert_error(reply, "FORBIDDEN", "participant_ids", "conversation:create")
    group = await alice.request("conversation:create", {"participant_ids": ["bob", "carol"]})
    assert group["event"] == "conversation:created", group  # groups are not refused


async def test_blocks_and_their_effects_survive_a_restart(autojump_clock: Any, settings: Any) -> None:
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        conv = await harness.conversation(alice, "bob")
        await block(alice, "bob")
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        bob = await harness.connect("bob")
        reply = await alice.request("user:blocks", {})
        assert reply["data"] == {"blocks": [{"user_id": "bob", "blocked_at": TS}]}
        assert_error(await bob.request("conversation:create", {"participant_ids": ["alice"]}),
                     "FORBIDDEN", "participant_ids", "conversation:create")
        assert_error(await bob.request("message:send", text(conv)), "NOT_FOUND", "conversation_id", "message:send")


async def test_user_blocks_lists_only_the_callers_own_blocks(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await block(alice, "bob")
    await trio.sleep(1)
    await block(alice, "carol")
    mine = await alice.request("user:blocks", {})
    assert mine["event"] == "user:blocks"
    assert [b["user_id"] for b in mine["data"]["blocks"]] == ["bob", "carol"]
    assert all(b.keys() == {"user_id", "blocked_at"} and b["blocked_at"] == TS for b in mine["data"]["blocks"])
    theirs = await bob.request("user:blocks", {})  # nothing tells bob who blocked him (§17.3)
    assert theirs["data"] == {"blocks": []}


async def test_a_blocked_pair_hears_nothing_of_each_others_presence(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    carol = await harness.connect("carol")
    group = await harness.conversation(alice, "bob", "carol")
    await block(bob, "alice")
    await settle(alice, bob, carol)

    reply = await bob.request("user:status", {"status": "away"})
    assert reply["event"] == "user:status_updated"
    await bob.request("user:status", {"status": "offline"})
    await bob.close()
    second_bob = await harness.connect("bob")
    await second_bob.close()
    late_alice = await harness.connect("alice")  # alice comes online: bob... is offline now; carol hears it
    await trio.sleep(10)  # past every grace period
    heard = await alice.nothing_more() + await late_alice.nothing_more()
    assert [e for e in heard if e["event"].startswith("user:") and e["data"].get("user_id") == "bob"] == []
    assert any(e["event"] == "user:offline" and e["data"]["user_id"] == "bob" for e in await carol.nothing_more())

    people = {p["id"]: p for p in (await listing(alice))[group]["participants"]}
    assert (people["bob"]["online"], people["bob"]["last_seen_at"]) == (False, None)
    assert people["carol"]["online"] is True
    # The group stays open: messages between them still go through it.
    await send(alice, group, "still here")


async def test_a_blocked_user_online_in_a_shared_group_shows_offline(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    group = await harness.conversation(alice, "bob", "carol")
    await block(alice, "bob")
    for viewer, other in ((alice, "bob"), (bob, "alice")):
        people = {p["id"]: p for p in (await listing(viewer))[group]["participants"]}
        assert (people[other]["online"], people[other]["last_seen_at"]) == (False, None)
    await bob.close()
    await trio.sleep(10)
    bob = await harness.connect("bob")
    assert [e for e in await alice.nothing_more() if e["event"] in ("user:online", "user:offline")] == []


async def test_unblock_keeps_closed_conversations_closed_and_create_makes_a_new_one(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    old = await harness.conversation(alice, "bob")
    await block(alice, "bob")
    ref = await alice.send("user:unblock", {"user_id": "bob"})
    reply = await alice.expect("user:unblocked", ref=ref)
    assert reply["data"] == {"user_id": "bob", "unblocked_at": TS}
    assert_error(await alice.request("message:send", text(old)), "NOT_FOUND", "conversation_id", "message:send")
    new = await harness.conversation(bob, "alice")
    assert new != old
    assert list(await listing(alice)) == [new]
    await send(bob, new, "hello again")
    # Presence flows again between them (they share an open conversation).
    await settle(alice)
    await bob.close()
    offline = await alice.expect("user:offline")
    assert offline["data"]["user_id"] == "bob"


async def test_unblock_while_the_other_still_blocks_keeps_them_apart(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await harness.conversation(alice, "bob", "carol")
    await block(alice, "bob")
    await block(bob, "alice")
    reply = await alice.request("user:unblock", {"user_id": "bob"})
    assert reply["event"] == "user:unblocked"
    assert_error(await alice.request("conversation:create", {"participant_ids": ["bob"]}),
                 "FORBIDDEN", "participant_ids", "conversation:create")
    await settle(alice)
    await bob.close()
    await trio.sleep(10)
    assert named(await alice.nothing_more(), "user:offline") == []


@pytest.mark.parametrize("settings", [{"limits": {"messages_per_minute": 0}}], indirect=True, ids=["no_limit"])
async def test_no_message_commits_after_the_block(autojump_clock: Any, harness: Harness) -> None:
    """Sends racing a block: each gets exactly one answer; what was acknowledged is exactly what
    is stored, and nothing is stored after the conversation closed."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    refs = [await alice.send("message:send", text(conv, f"m{i}")) for i in range(20)]
    block_ref = await bob.send("user:block", {"user_id": "alice"})
    refs += [await alice.send("message:send", text(conv, f"n{i}")) for i in range(20)]
    closed = await bob.expect("user:blocked", ref=block_ref)
    answers = {}
    for ref in refs:
        answers[ref] = await _answer(alice, ref)
    acknowledged = [a["data"]["message"] for a in answers.values() if a["event"] == "message:new"]
    refused = [a for a in answers.values() if a["event"] == "error"]
    assert all(a["data"]["code"] == "NOT_FOUND" for a in refused)
    assert len(acknowledged) + len(refused) == 40 and refused  # the later ones at least
    await harness.server.gateway.services.store.call(lambda store: None)  # everything committed
    stored = await harness.server.gateway.services.store.call(
        lambda store: store.history(conv, "alice", None, None, 100)[0])
    assert [m.seq for m in stored] == [m["seq"] for m in acknowledged] == list(range(1, len(acknowledged) + 1))
    assert all(m.created_at <= orjson_time(closed["data"]["blocked_at"]) for m in stored)


async def _answer(client: Client, ref: str) -> dict[str, Any]:
    for i, msg in enumerate(client.backlog):
        if msg.get("ref") == ref:
            return client.backlog.pop(i)
    while True:
        msg = await client._next()
        if msg.get("ref") == ref:
            return msg
        client.backlog.append(msg)


def orjson_time(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() + 0.001


def test_the_store_refuses_sends_into_a_closed_conversation(tmp_path: Any) -> None:
    """The writer serialises transactions: a send whose transaction runs after the close sees
    ``closed_at`` (whatever its room believed) — and writes nothing, not even its rate state."""
    from winkr.ratelimit import Rate
    from winkr.records import SendItem
    from winkr.store.schema import open_database

    store = Store(open_database(str(tmp_path / "w.db")))
    conversation, _ = store.create_conversation("alice", ["bob"], is_service=False, max_participants=10, now=1.0)
    item = SendItem("alice", "text", "hi", {}, None, ())
    rates = (Rate(30, "minute"),)
    assert store.block("bob", "alice", 2.0).closed[0].id == conversation.id
    results = store.insert_messages(conversation.id, [item, item], now=3.0, rates=rates)
    assert [getattr(r, "code", None) for r in results] == ["NOT_FOUND", "NOT_FOUND"]
    assert store.last_seq(conversation.id) == 0
    assert store.db.execute("SELECT count(*) FROM rate_state").fetchone()[0] == 0


# --- conversation:close ---------------------------------------------------------------------------

async def test_close_replies_with_ref_and_tells_both_users_every_connection(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    alice_laptop = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await settle(alice, alice_laptop, bob)
    ref = await alice.send("conversation:close", {"conversation_id": conv})
    reply = await alice.expect("conversation:closed", ref=ref)
    assert reply["data"] == {"conversation_id": conv, "reason": "unmatched", "closed_at": TS}
    for client in (alice_laptop, bob):
        got = await client.expect("conversation:closed")
        assert "ref" not in got and got["data"] == reply["data"]
    assert named(await alice.nothing_more(), "conversation:closed") == []
    assert_error(await bob.request("message:send", text(conv)), "NOT_FOUND", "conversation_id", "message:send")
    new = await harness.conversation(bob, "alice")
    assert new != conv  # never reused
    # No block: they may talk again in the new one.
    await send(alice, new, "a second chance")


async def test_close_is_for_participants_of_two_person_conversations(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    mallory = await harness.connect("mallory")
    pair = await harness.conversation(alice, "bob")
    group = await harness.conversation(alice, "bob", "carol")
    assert_error(await alice.request("conversation:close", {"conversation_id": group}),
                 "FORBIDDEN", "conversation_id", "conversation:close")
    assert_error(await mallory.request("conversation:close", {"conversation_id": pair}),
                 "FORBIDDEN", "conversation_id", "conversation:close")
    assert_error(await alice.request("conversation:close", {"conversation_id": "no-such-conversation"}),
                 "NOT_FOUND", "conversation_id", "conversation:close")
    assert_error(await alice.request("conversation:close", {}), "VALIDATION_ERROR", "conversation_id",
                 "conversation:close")
    await send(alice, group, "the group is still open")


async def test_after_an_unmatch_the_pair_hears_no_more_presence(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await alice.request("conversation:close", {"conversation_id": conv})
    await settle(alice, bob)
    await bob.close()
    await trio.sleep(10)
    assert named(await alice.nothing_more(), "user:offline") == []


# --- message:report -------------------------------------------------------------------------------

async def test_report_replies_and_keeps_a_snapshot_that_outlives_deletion(
        autojump_clock: Any, settings: Any) -> None:
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        bob = await harness.connect("bob")
        conv = await harness.conversation(alice, "bob")
        message = await send(bob, conv, "something nasty")
        ref = await alice.send("message:report", {"conversation_id": conv, "message_id": message["id"],
                                                  "reason": "harassment", "note": "again and again"})
        reply = await alice.expect("message:reported", ref=ref)
        data = reply["data"]
        assert data.keys() == {"report_id", "conversation_id", "message_id", "reported_at"}
        assert (data["conversation_id"], data["message_id"], data["reported_at"]) == (conv, message["id"], TS)
        deleted = await bob.request("message:delete", {"conversation_id": conv, "message_id": message["id"]})
        assert deleted["event"] == "message:deleted"
    rows = query(settings, "SELECT reporter_id, reason, note, message_sender_id, message_content, message_deleted "
                 "FROM reports WHERE id = ?", (data["report_id"],))
    assert rows == [("alice", "harassment", "again and again", "bob", "something nasty", 0)]
    assert query(settings, "SELECT content FROM messages") == [("",)]  # erased; the report keeps it


@pytest.mark.parametrize("data, code, field", [
    ({"reason": "rude"}, "VALIDATION_ERROR", "reason"),
    ({"reason": None}, "VALIDATION_ERROR", "reason"),
    ({}, "VALIDATION_ERROR", "reason"),
    ({"reason": "spam", "note": "x" * 501}, "VALIDATION_ERROR", "note"),
    ({"reason": "spam", "note": 7}, "VALIDATION_ERROR", "note"),
    ({"reason": "spam", "plaintext": "not encrypted"}, "VALIDATION_ERROR", "plaintext"),
    ({"reason": "spam", "message_id": "nope"}, "NOT_FOUND", "message_id"),
    ({"reason": "spam", "conversation_id": "no-such-conversation"}, "NOT_FOUND", "conversation_id"),
], ids=["unknown_reason", "null_reason", "no_reason", "long_note", "note_type", "plaintext_not_encrypted",
        "unknown_message", "unknown_conversation"])
async def test_report_refusals(autojump_clock: Any, harness: Harness, data: dict[str, Any], code: str,
                               field: str) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    message = await send(bob, conv)
    request = {"conversation_id": conv, "message_id": message["id"], **data}
    assert_error(await alice.request("message:report", request), code, field, "message:report")


async def test_only_participants_report_and_not_their_own_messages(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    mallory = await harness.connect("mallory")
    conv = await harness.conversation(alice, "bob")
    mine = await send(alice, conv)
    request = {"conversation_id": conv, "message_id": mine["id"], "reason": "spam"}
    assert_error(await alice.request("message:report", request), "FORBIDDEN", "message_id", "message:report")
    assert_error(await mallory.request("message:report", request), "FORBIDDEN", "conversation_id", "message:report")


async def test_report_takes_plaintext_for_an_encrypted_message(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    reply = await bob.request("message:send", {"conversation_id": conv, "type": "text", "content": "Q2lwaGVy",
                                               "metadata": {"encrypted": True}})
    message = reply["data"]["message"]
    ok = await alice.request("message:report", {"conversation_id": conv, "message_id": message["id"],
                                                "reason": "scam", "plaintext": "send me money"})
    assert ok["event"] == "message:reported", ok
    too_long = await alice.request("message:report", {"conversation_id": conv, "message_id": message["id"],
                                                      "reason": "scam", "plaintext": "x" * 8001})
    assert_error(too_long, "VALIDATION_ERROR", "plaintext", "message:report")


async def test_block_first_then_report_in_the_closed_conversation(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    message = await send(bob, conv, "creepy")
    await block(alice, "bob")
    reply = await alice.request("message:report", {"conversation_id": conv, "message_id": message["id"],
                                                   "reason": "inappropriate"})
    assert reply["event"] == "message:reported", reply


@pytest.mark.parametrize("settings", [{"limits": {"reports_per_day": 2}}], indirect=True, ids=["2_per_day"])
async def test_reports_per_day_holds_across_a_restart(autojump_clock: Any, settings: Any) -> None:
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        bob = await harness.connect("bob")
        conv = await harness.conversation(alice, "bob")
        message = await send(bob, conv)
        request = {"conversation_id": conv, "message_id": message["id"], "reason": "spam"}
        for _ in range(2):
            assert (await alice.request("message:report", request))["event"] == "message:reported"
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        refused = await alice.request("message:report", request)
        assert_error(refused, "RATE_LIMITED", None, "message:report")
        assert refused["data"]["details"]["limit"] == "2/day"
        assert 0 < refused["data"]["details"]["retry_after"] <= 86400
        await alice.close()
        await trio.sleep(refused["data"]["details"]["retry_after"])
        alice = await harness.connect("alice")  # (the first token expired meanwhile)
        assert (await alice.request("message:report", request))["event"] == "message:reported"


# --- user:settings ----------------------------------------------------------------------------------

async def test_settings_reply_persist_and_come_with_connection_established(
        autojump_clock: Any, settings: Any) -> None:
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        ref = await alice.send("user:settings", {"read_receipts": False})
        reply = await alice.expect("user:settings_updated", ref=ref)
        assert reply["data"] == {"read_receipts": False, "online_status": True, "updated_at": TS}
        reply = await alice.request("user:settings", {"online_status": False})
        assert reply["data"] == {"read_receipts": False, "online_status": False, "updated_at": TS}
    async with running(settings) as harness:
        alice = await harness.connect("alice", established=False)
        hello = await alice.recv()
        assert hello["data"]["settings"] == {"read_receipts": False, "online_status": False}


@pytest.mark.parametrize("data, field", [({"read_receipts": "no"}, "read_receipts"),
                                         ({"online_status": 0}, "online_status"),
                                         ({"read_receipts": None, "online_status": []}, "online_status")])
async def test_settings_are_booleans(autojump_clock: Any, harness: Harness, data: dict[str, Any], field: str) -> None:
    alice = await harness.connect("alice")
    assert_error(await alice.request("user:settings", data), "VALIDATION_ERROR", field, "user:settings")


async def test_read_receipts_off_for_the_reader(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob_phone = await harness.connect("bob")
    bob_laptop = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await bob_phone.request("user:settings", {"read_receipts": False})  # applies to the laptop too
    message = await send(alice, conv)
    await settle(alice)
    reply = await bob_laptop.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
    assert reply["event"] == "message:viewed"  # the reader's own reply is unchanged
    assert named(await alice.nothing_more(), "message:viewed") == []


async def test_read_receipts_off_for_the_sender(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await alice.request("user:settings", {"read_receipts": False})
    message = await send(alice, conv)
    await settle(alice)
    await bob.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
    assert named(await alice.nothing_more(), "message:viewed") == []
    await alice.request("user:settings", {"read_receipts": True})
    second = await send(alice, conv)
    await bob.request("message:read", {"conversation_id": conv, "message_id": second["id"]})
    assert (await alice.expect("message:viewed"))["data"]["message_id"] == second["id"]


async def test_online_status_off_hides_presence_and_switching_tells_contacts_at_once(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await settle(alice, bob)

    await bob.request("user:settings", {"online_status": False})
    assert (await alice.expect("user:offline"))["data"]["user_id"] == "bob"
    people = {p["id"]: p for p in (await listing(alice))[conv]["participants"]}
    assert (people["bob"]["online"], people["bob"]["last_seen_at"]) == (False, None)
    await bob.request("user:status", {"status": "online"})  # a status does not reveal them
    bob_laptop = await harness.connect("bob")
    await bob_laptop.close()
    assert [e for e in await alice.nothing_more() if e["event"] in ("user:online", "user:offline")] == []

    await bob.request("user:settings", {"online_status": True})
    assert (await alice.expect("user:online"))["data"]["user_id"] == "bob"


async def test_online_status_off_from_the_first_connection(autojump_clock: Any, settings: Any) -> None:
    async with running(settings) as harness:
        bob = await harness.connect("bob")
        await bob.request("user:settings", {"online_status": False})
        await harness.conversation(bob, "alice")
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        await settle(alice)
        bob = await harness.connect("bob")
        await bob.close()
        await trio.sleep(10)
        assert [e for e in await alice.nothing_more() if e["event"] in ("user:online", "user:offline")] == []


# --- webhook events, recorded in the transaction of their cause (§14, §17.7) -------------------------

WEBHOOKS_ON = {"webhook_url": "http://127.0.0.1:9/hooks",  # nothing listens: the events stay waiting
               "webhook_secret": "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}


@pytest.mark.parametrize("settings", [WEBHOOKS_ON], indirect=True)
async def test_webhook_events_are_written_in_the_transaction_of_their_cause(
        autojump_clock: Any, harness: Harness, settings: Any) -> None:
    """Each change writes its §14 event into the webhook outbox in its own transaction (the
    rows are read back from the database: the endpoint is down, so they wait there)."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    pair = await harness.conversation(alice, "bob")
    unmatched = await harness.conversation(alice, "carol")
    message = await send(bob, pair, "report me")
    await alice.request("conversation:close", {"conversation_id": unmatched})
    await block(alice, "bob")
    await alice.request("message:report", {"conversation_id": pair, "message_id": message["id"], "reason": "spam"})

    rows = query(settings, "SELECT type, payload FROM webhook_events WHERE type != 'message.created'")
    bodies = [orjson.loads(payload) for _, payload in rows]
    assert all(body["type"] == type_ and body["timestamp"] == TS for (type_, _), body in zip(rows, bodies))
    by_type: dict[str, list[dict[str, Any]]] = {}
    for body in bodies:
        by_type.setdefault(body["type"], []).append(body["data"])
    assert sorted(by_type) == ["conversation.closed", "message.reported", "user.blocked"]
    assert sorted(by_type["conversation.closed"], key=lambda d: d["conversation_id"] != unmatched) == [
        {"conversation_id": unmatched, "closed_by": "alice", "closed_at": TS},
        {"conversation_id": pair, "closed_by": "alice", "closed_at": TS}]
    assert by_type["user.blocked"] == [{"blocker_id": "alice", "blocked_id": "bob", "closed_conversation_ids": [pair],
                                        "blocked_at": TS}]
    [reported] = by_type["message.reported"]
    assert reported.keys() == {"report_id", "reporter_id", "reason", "note", "conversation_id", "message",
                               "reported_at"}
    assert (reported["reporter_id"], reported["reason"], reported["note"]) == ("alice", "spam", None)
    assert reported["message"]["id"] == message["id"] and reported["message"]["content"] == "report me"
