"""Abuse and heavy honest use (issue 8): each test is one reported input, driven through the
real server over in-memory streams under MockClock, asserting the contract's outcome.

Kinds: outbound flow control, inbound cost control, canonical identifiers, token claims,
protocol violations, appear-offline privacy, the seq invariant, tracebacks per kind.
"""
from __future__ import annotations

import logging
import math
import struct
from functools import partial
from typing import Any

import jwt
import orjson
import pytest
import trio
from conftest import (
    RATE_LIMITS_OFF,
    SECRET,
    Client,
    Harness,
    assert_error,
    assert_refused,
    bearer,
    make_settings,
    metric,
    named,
    refused,
    running,
    until,
)
from trio_websocket import ConnectionClosed
from wire_clients import RawClient, over_slow_link

import winkr.handlers.messages
from winkr.logs import ThrottledLog
from winkr.records import SendItem
from winkr.store.store import Store


async def read_all(client: Client, wait: float = 5.0, pace: float = 0.0) -> tuple[list[dict[str, Any]], int | None]:
    """Everything that arrives until ``wait`` mock seconds of silence, read one event every
    ``pace`` seconds, and the close code if the server closed the connection."""
    events = list(client.backlog)
    client.backlog.clear()
    try:
        while True:
            with trio.move_on_after(wait) as quiet:
                events.append(orjson.loads(await client.ws.get_message()))
            if quiet.cancelled_caught:
                return events, None
            if pace:
                await trio.sleep(pace)
    except ConnectionClosed as closed:
        return events, closed.reason.code


# --- 1. outbound flow control -------------------------------------------------------------------

async def test_a_user_with_300_unread_conversations_connects_and_gets_every_summary(tmp_path: Any) -> None:
    """Once: a popular profile (more than ~256 conversations holding unread messages) was closed
    as slow_consumer at every connect, because the summary filled its outbox at once."""
    async with running(make_settings(tmp_path, limits=RATE_LIMITS_OFF)) as harness:
        matchmaker = await harness.connect("matchmaker", service=True)
        for n in range(300):
            conv = await harness.conversation(matchmaker, "popular", f"fan{n}")
            sent = await matchmaker.request("message:send", {"conversation_id": conv, "type": "system",
                                                             "content": f"you matched with fan{n}"})
            assert sent["event"] == "message:new", sent
        popular = await over_slow_link(harness, "popular", capacity=8192)
        events, closed = await read_all(popular)
        assert closed is None, events[-3:]
        unread = named(events, "conversation:unread")
        assert len(unread) == 300
        assert {e["data"]["unread_count"] for e in unread} == {1}
        assert (await popular.request("conversation:list"))["event"] == "conversation:list"


async def test_a_group_sender_who_reads_gets_every_ack_and_receipt(harness: Harness) -> None:
    """Once: in a 10-person group a member sending 30 messages back to back while reading
    was sometimes closed: 30 acks + 270 message:delivered against a 256-frame bound."""
    members = [f"m{n}" for n in range(10)]
    others = [await harness.connect(user) for user in members[1:]]
    first = await harness.connect(members[0])
    conv = await harness.conversation(first, *members[1:])
    for client in others:
        assert (await client.request("conversation:join", {"conversation_id": conv}))["event"] == "conversation:joined"
        harness.nursery.start_soon(read_all, client, math.inf)  # the others read everything, always
    await first.close()
    sender = await over_slow_link(harness, members[0], capacity=1024)  # reads, but through a narrow pipe
    assert (await sender.request("conversation:join", {"conversation_id": conv}))["event"] == "conversation:joined"
    for _ in range(3):  # it used to happen only sometimes (5 runs out of 6): three bursts
        for n in range(30):
            await sender.send("message:send", {"conversation_id": conv, "type": "text", "content": f"hi {n}"})
        events, closed = await read_all(sender, pace=0.01)  # a phone reading 100 events a second
        assert closed is None
        assert len([e for e in named(events, "message:new") if e.get("ref")]) == 30
        delivered = named(events, "message:delivered")
        assert len({(e["data"]["message_id"], e["data"]["recipient_id"]) for e in delivered}) == 270
        await trio.sleep(60)  # the next burst within the 30/minute limit


async def test_a_client_that_never_reads_cannot_grow_the_server(tmp_path: Any) -> None:
    """Once: a client that never read and asked for 270 large history pages grew the server by
    ~460 MiB before it was closed (the bound counted frames, not bytes). Replies now wait for
    room in the outbox, so the server stops reading its requests; it is closed once its socket
    has not drained for a while."""
    async with running(make_settings(tmp_path, limits=RATE_LIMITS_OFF)) as harness:
        alice = await harness.connect("alice")
        conv = await harness.conversation(alice, "bob")
        for n in range(100):
            await alice.request("message:send", {"conversation_id": conv, "type": "text",
                                                 "content": f"{n} " + "x" * 1900})
        bob = await over_slow_link(harness, "bob", capacity=65536)
        for _ in range(270):
            await bob.send("message:history", {"conversation_id": conv, "limit": 100})
        await trio.sleep(60)  # bob reads nothing
        handled = metric(harness.server.metrics.text(), "winkr_events_received_total", event="message:history")
        assert handled <= 30, handled  # about 4 MiB of pages at most, of 270 asked for (~53 MiB)
        assert metric(harness.server.metrics.text(), "winkr_connections_closed_total", reason="slow_consumer") == 1
        assert (await alice.request("conversation:list"))["event"] == "conversation:list"


async def test_status_flapping_reaches_a_slow_contact_as_its_latest_state(tmp_path: Any) -> None:
    """Once: flapping user:status 1,500 times got a contact on a slow link closed. Presence
    frames are coalesced per contact: only the latest state waits in the contact's outbox."""
    async with running(make_settings(tmp_path, limits=RATE_LIMITS_OFF)) as harness:
        alice = await harness.connect("alice")
        await harness.conversation(alice, "bob")
        bob = await over_slow_link(harness, "bob", capacity=512)
        for n in range(1500):
            reply = await alice.request("user:status", {"status": "offline" if n % 2 == 0 else "online"})
            assert reply["event"] == "user:status_updated"
        events, closed = await read_all(bob)
        assert closed is None
        presence = [e for e in events if e["event"] in ("user:online", "user:offline")]
        assert 1 <= len(presence) <= 10, len(presence)
        assert presence[-1]["event"] == "user:online"  # the last flap: online


# --- 2. inbound cost control ----------------------------------------------------------------------

async def test_sends_over_the_limit_are_refused_before_the_content_policy(harness: Harness,
                                                                         monkeypatch: Any) -> None:
    """Once: 3,029 of 3,160 pipelined sends padded with PII-looking digits were refused
    RATE_LIMITED yet each paid the full filter and PII cost, and other users' round trips went
    from 2.5 ms to 207 ms. The limit is now checked first; the policy runs for a few only."""
    policy_runs = 0
    real_check = winkr.handlers.messages.check_message

    def counting_check(*args: Any, **kwargs: Any) -> Any:
        nonlocal policy_runs
        policy_runs += 1
        return real_check(*args, **kwargs)

    monkeypatch.setattr(winkr.handlers.messages, "check_message", counting_check)
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    padded = "call 415 555 2671 " * 40
    for _ in range(3160):
        await alice.send("message:send", {"conversation_id": conv, "type": "text", "content": padded})
    events, closed = await read_all(alice, wait=30)
    assert closed is None
    replies = [e for e in events if e.get("ref")]
    assert len(replies) == 3160
    acks = named(replies, "message:new")
    assert len(acks) <= 30 + math.ceil(trio.current_time() / 2) + 1  # 30/minute: a burst, then one per 2 s
    assert all(e["data"]["code"] == "RATE_LIMITED" and e["data"]["details"]["retry_after"] > 0
               for e in named(replies, "error"))
    assert policy_runs <= len(acks) + 1, policy_runs
    assert (await alice.request("conversation:list"))["event"] == "conversation:list"


async def test_every_connection_has_an_inbound_budget(harness: Harness) -> None:
    """A flood of any event is refused RATE_LIMITED (per second) and the connection stays
    usable; after a refusal the server reads no more from that client until the budget allows,
    so the flood waits in the client's buffers, not in the server's CPU."""
    alice = await harness.connect("alice")
    started = trio.current_time()
    for _ in range(700):
        await alice.send("conversation:list")
    events, closed = await read_all(alice)
    assert closed is None
    refusals = named(events, "error")
    assert refusals and all(e["data"]["code"] == "RATE_LIMITED" for e in refusals)
    assert refusals[0]["data"]["details"]["limit"] == "50/second"
    assert len(named(events, "conversation:list")) + len(refusals) == 700
    # 500 units of burst at 10 units per list, then 5 lists per second: it took mock time.
    assert trio.current_time() - started > 10
    assert (await alice.request("conversation:list"))["event"] == "conversation:list"


async def test_joins_of_unknown_conversations_leave_nothing_behind(tmp_path: Any) -> None:
    """Once: 5,000 joins of unknown ids grew memory and cost quadratically, and the refused ids
    were kept (and left one by one at close, waking a room each)."""
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF | {"joined_per_connection": 2})
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        for n in range(5000):
            await alice.send("conversation:join", {"conversation_id": f"nope-{n}"})
        events, closed = await read_all(alice)
        assert closed is None and len(events) == 5000
        assert {e["data"]["code"] for e in events} == {"NOT_FOUND"}
        await trio.sleep(5)
        assert metric(harness.server.metrics.text(), "winkr_rooms") == 0  # rooms of unknown ids went back to sleep
        # The refused ids were not kept: two real joins still fit under the cap of two.
        for other in ("bob", "carol"):
            conv = await harness.conversation(alice, other)
            assert (await alice.request("conversation:join", {"conversation_id": conv}))["event"] == \
                "conversation:joined"
        third = await harness.conversation(alice, "dave")
        assert_error(await alice.request("conversation:join", {"conversation_id": third}),
                     "CONVERSATION_FULL", "conversation_id", "conversation:join")
        await alice.close()
        await until(lambda: metric(harness.server.metrics.text(), "winkr_connections") == 0)
        assert metric(harness.server.metrics.text(), "winkr_rooms") <= 2  # leaving woke no room for a refused id


# --- 3. canonical identifiers ------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["\u0661", "01", "\u00b2", "+1", " 1", "1 ", "1.0", "0x1", "\uff11", "1_0"])
@pytest.mark.parametrize("event", ["message:delete", "message:read"])
async def test_a_message_id_has_one_spelling(harness: Harness, spelling: str, event: str) -> None:
    """Once: ``<conversation>.١`` (Arabic-Indic one) erased message 1 and broadcast the spelled
    id, ``.01`` was accepted, and ``.²`` answered INTERNAL_ERROR with a traceback."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    for client in (alice, bob):
        await client.request("conversation:join", {"conversation_id": conv})
    sent = await alice.request("message:send", {"conversation_id": conv, "type": "text", "content": "keep me"})
    assert sent["data"]["message"]["id"] == f"{conv}.1"
    reader = bob if event == "message:read" else alice
    reply = await reader.request(event, {"conversation_id": conv, "message_id": f"{conv}.{spelling}"})
    assert_error(reply, "NOT_FOUND", "message_id", event)
    page = await bob.request("message:history", {"conversation_id": conv})
    assert page["data"]["messages"][0]["content"] == "keep me"
    assert page["data"]["messages"][0]["is_read"] is False
    assert named(await bob.nothing_more(), "message:deleted") == []


@pytest.mark.parametrize("user_id", ["bob\x1fcarol", "bob\x00", "\u202ebob", "bob\u200b", " bob", "b\nob",
                                     "x" * 65, ""])
async def test_participant_ids_must_be_canonical(harness: Harness, user_id: str) -> None:
    """User ids with control, format or surrounding white space are refused: two different
    participant sets can no longer share a conversation key."""
    alice = await harness.connect("alice")
    reply = await alice.request("conversation:create", {"participant_ids": [user_id]})
    assert_error(reply, "VALIDATION_ERROR", "participant_ids.0", "conversation:create")


@pytest.mark.parametrize("frame,field,ref,event", [
    ('{"event":"conversation:create","ref":"s","data":{"participant_ids":["b\\ud800"]}}', "participant_ids.0",
     "s", "conversation:create"),
    ('{"event":"message:send","ref":"m","data":{"conversation_id":"c","type":"text","content":"hi \\udfff"}}',
     "content", "m", "message:send"),
    ('{"event":"message:send","ref":"k","data":{"metadata":{"\\ud83d":1}}}', None, "k", "message:send"),
    ('{"event":"x\\ud800","ref":"e","data":{}}', "event", "e", None),
    ('{"event":"conversation:list","ref":"\\ud800","data":{}}', "ref", None, "conversation:list"),
])
async def test_an_unpaired_surrogate_is_refused_naming_the_field(harness: Harness, frame: str, field: str | None,
                                                                 ref: str | None, event: str | None) -> None:
    """JSON may spell an unpaired surrogate; the frame is refused, naming the field and echoing
    the ref (not "frame is not valid JSON"); the connection goes on."""
    alice = await harness.connect("alice")
    await alice.send_raw(frame)
    reply = await alice.expect("error")
    assert reply["data"]["code"] == "VALIDATION_ERROR" and reply.get("ref") == ref, reply
    assert reply["data"]["request_event"] == event, reply
    if field is not None:
        assert reply["data"]["details"]["field"] == field, reply
    else:
        assert reply["data"]["details"]["field"].startswith("metadata."), reply
    assert (await alice.request("conversation:list"))["event"] == "conversation:list"


# --- 4. token claims ----------------------------------------------------------------------------------

def _signed(harness: Harness, **claims: Any) -> str:
    base = {"sub": "alice", "exp": harness.server.clock() + 3600, "iat": harness.server.clock()}
    return jwt.encode({**base, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("claims", [
    {"username": "\ud800"}, {"avatar_url": "https://x.test/\udfff.png"}, {"sub": "al\ud800ice"},
    {"sub": "alice\x00"}, {"exp": float("nan")}, {"exp": float("inf")}, {"exp": 10**17}, {"exp": "soon"},
    {"iat": float("nan")}, {"username": 42}, {"username": "x" * 101}, {"avatar_url": "javascript:alert(1)"},
    {"role": ["service"]}, {"avatar_url": "https://"}, {"avatar_url": "http:///x.png"},
], ids=repr)
async def test_every_claim_is_checked_before_the_upgrade(harness: Harness, claims: dict[str, Any]) -> None:
    """Once: a lone surrogate in username/avatar_url/sub got 101 then 1011 at every reconnect;
    exp NaN gave 101 then 1011, exp Infinity a connection that never expired."""
    rejection = await refused(harness, headers=bearer(_signed(harness, **claims)))
    assert_refused(rejection, 401, "UNAUTHORIZED")


@pytest.mark.parametrize("exp", [10**17, float("nan"), float("inf")])
async def test_a_refused_refresh_changes_nothing(harness: Harness, exp: float) -> None:
    """Once: auth:refresh with exp = 10^17 answered INTERNAL_ERROR yet applied the new expiry."""
    opened = trio.current_time()
    alice = await harness.connect("alice", token=harness.token("alice", ttl=120))
    reply = await alice.request("auth:refresh", {"token": _signed(harness, exp=exp)})
    assert_error(reply, "UNAUTHORIZED", None, "auth:refresh")
    events, code = await read_all(alice, wait=300)
    assert code == 4001 and events[-1]["data"]["reason"] == "token_expired"
    assert 119 <= trio.current_time() - opened <= 121  # the first token's expiry still holds


# --- 5. protocol violations ------------------------------------------------------------------------

def _masked_frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    mask = b"\x01\x02\x03\x04"
    head = bytes([0x80 | opcode, (0x80 if masked else 0) | len(payload)])
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("frame,reason,code", [
    (_masked_frame(0x1, b'{"event":"conversation:list","data":{},"ref":"\xff"}'), "invalid_payload", 1007),
    (_masked_frame(0x1, b'{"event":"\xc3\x28"}'), "invalid_payload", 1007),
    (_masked_frame(0x3, b"{}"), "protocol_error", 1002),  # a reserved opcode
    (_masked_frame(0x1, b"{}", masked=False), "protocol_error", 1002),  # clients must mask
    (_masked_frame(0x8, b"\x03\xe8\xff\xfe"), "invalid_payload", 1007),  # a close reason that is not UTF-8
    (_masked_frame(0x9, b"x" * 126), "protocol_error", 1002),  # a control frame over 125 bytes
], ids=["raw-ff", "bad-utf8-sequence", "reserved-opcode", "unmasked", "close-reason", "long-ping"])
async def test_a_protocol_violation_is_closed_with_a_reason(harness: Harness, caplog: Any, frame: bytes,
                                                            reason: str, code: int) -> None:
    """Once: a text frame with invalid UTF-8 dropped the TCP connection with no close frame and
    no connection:closed, and the server logged client_closed."""
    caplog.set_level(logging.INFO)
    raw = RawClient(harness, answer_pings=True)
    await raw.handshake(harness.token("alice"))
    await raw.stream.send_all(frame)
    await raw.pump_until(lambda: raw.close_code is not None, timeout=10)
    assert raw.close_code == code
    closed = raw.events[-1]
    assert closed["event"] == "connection:closed" and closed["data"]["reason"] == reason, raw.events
    assert closed["data"]["code"] == code
    await until(lambda: any(getattr(r, "reason", None) == reason for r in caplog.records))


# --- 7. appear offline -------------------------------------------------------------------------------

async def test_last_seen_stays_where_an_invisible_user_went_invisible(harness: Harness) -> None:
    """Once: while alice appeared offline, her last_seen_at kept moving (a stranger saw the
    disconnect time + 5 s)."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await harness.conversation(alice, "bob")
    went_invisible = await alice.request("user:status", {"status": "offline"})
    await bob.nothing_more(100)  # bob keeps reading (and answering pings) meanwhile
    await alice.close()
    await bob.nothing_more(100)
    listing = await bob.request("conversation:list")
    seen = {p["id"]: p for p in listing["data"]["conversations"][0]["participants"]}["alice"]
    assert seen["online"] is False
    assert seen["last_seen_at"] == went_invisible["data"]["updated_at"]


# --- 9. the seq invariant ------------------------------------------------------------------------------

async def test_a_request_that_fails_after_its_insert_leaves_no_seq_gap(harness: Harness) -> None:
    """Once: the writer's last-seq cache survived a request's savepoint rollback, so the next
    message took seq 3 with one row stored and the recipient's unread count read 3 forever."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    store = harness.server.gateway.services.store

    def insert_then_fail(s: Store) -> None:
        s.insert_message(conv, SendItem("alice", "text", "doomed", {}, None, ()), harness.server.clock())
        raise RuntimeError("a failure after the insert")

    with pytest.raises(RuntimeError):
        await store.call(insert_then_fail)
    for n in (1, 2):
        sent = await alice.request("message:send", {"conversation_id": conv, "type": "text", "content": f"m{n}"})
        assert sent["data"]["message"]["seq"] == n
    summary = await (await harness.connect("bob")).nothing_more()
    unread = named(summary, "conversation:unread")
    assert unread and unread[0]["data"]["unread_count"] == 2
    await bob.close()
    page = await alice.request("message:history", {"conversation_id": conv})
    assert [m["seq"] for m in page["data"]["messages"]] == [1, 2]


async def test_the_writer_keeps_serving_after_a_failed_request(harness: Harness) -> None:
    store = harness.server.gateway.services.store
    with pytest.raises(ZeroDivisionError):
        await store.call(lambda s: 1 / 0)
    assert await store.call(partial(Store.last_seq, conversation_id="nope")) == 0


# --- 10. one traceback per kind per interval ------------------------------------------------------------

def test_a_flood_of_the_same_failure_logs_one_traceback(caplog: Any) -> None:
    log = logging.getLogger("winkr.test")
    throttled = ThrottledLog(log, interval=60.0)
    caplog.set_level(logging.ERROR)
    for _ in range(2000):
        try:
            struct.unpack("i", b"")
        except struct.error as exc:
            throttled.exception(exc, "request failed")
    try:
        {}["missing"]
    except KeyError as exc:
        throttled.exception(exc, "another kind")
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert [r.getMessage() for r in tracebacks] == ["request failed", "another kind"]


async def test_status_changes_are_limited_per_user(harness: Harness) -> None:
    """Each change reaches every contact: a user flapping on several connections is limited as
    one user (breaker: 300 contacts, 5 connections slowed everyone's round trips)."""
    first = await harness.connect("alice")
    second = await harness.connect("alice")
    for n in range(30):
        reply = await (first if n % 2 else second).request("user:status", {"status": "away" if n % 2 else "busy"})
        assert reply["event"] == "user:status_updated", reply
    refused = await first.request("user:status", {"status": "online"})
    assert_error(refused, "RATE_LIMITED", None, "user:status")
    assert refused["data"]["details"]["limit"] == "30/minute" and refused["data"]["details"]["retry_after"] > 0


async def test_a_long_conversation_list_costs_more_of_the_budget(tmp_path: Any) -> None:
    """A list of many conversations costs one budget unit per five of them, so looping it is
    refused sooner than looping a short one (breaker: 400 conversations, list loops)."""
    async with running(make_settings(tmp_path, limits=RATE_LIMITS_OFF | {"inbound_events_per_second": 50})) as h:
        busy, quiet = await h.connect("busy"), await h.connect("quiet")
        await h.conversation(quiet, "someone")
        for n in range(100):
            await h.conversation(busy, f"match{n}")
        answered = {}
        for client in (busy, quiet):
            for _ in range(40):
                await client.send("conversation:list")
            events, _ = await read_all(client)
            lists = named(events, "conversation:list")
            answered[client.user_id] = len(lists)
            assert len(lists) + len(named(events, "error")) == 40
        # quiet: 10 units a list (40 lists fit in the 500 burst); busy: 10 + 100/5 = 30 units.
        assert answered["quiet"] == 40
        assert answered["busy"] < 40
