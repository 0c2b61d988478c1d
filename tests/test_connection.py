"""The connection end to end: handshake and authentication (contract §2), the envelope and
its errors (§3), the frame limit, slow consumers and the per-user connection limit (§8).

Everything runs the real server over in-memory streams under the mock clock (``harness``).

Every test names ``autojump_clock`` itself: pytest-trio hands ``trio.run`` only a clock that
the test function receives directly, not one requested by a fixture such as ``harness``.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jwt
import orjson
import pytest
import trio
import trio.testing
from conftest import (
    MAX_FRAME,
    SECRET,
    TIMESTAMP,
    Client,
    Harness,
    assert_refused,
    assert_unauthorized,
    bearer,
    claims_for,
    join,
    make_settings,
    refused,
    start_server,
    still_works,
    until_closed,
    welcomed,
)
from trio_websocket import ConnectionClosed
from wire_clients import over_slow_link

# --- helpers ---------------------------------------------------------------------------

def sign(claims: dict[str, Any], key: str | None = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


# --- authentication ---------------------------------------------------------------------

async def test_bearer_header_is_accepted(autojump_clock: Any, harness: Harness) -> None:
    ws = await harness.open_ws(headers=bearer(harness.token("alice")))
    client = await welcomed(ws, "alice")
    await still_works(client)


async def test_bearer_subprotocol_is_accepted_and_winkr_v1_selected(autojump_clock: Any,
                                                                    harness: Harness) -> None:
    token = harness.token("alice")
    ws = await harness.open_ws(subprotocols=["winkr.v1", f"bearer.{token}"])
    assert ws.subprotocol == "winkr.v1"
    client = await welcomed(ws, "alice")
    await still_works(client)


async def test_token_query_parameter_is_accepted(autojump_clock: Any, harness: Harness) -> None:
    ws = await harness.open_ws(path=f"/ws?token={harness.token('alice')}")
    client = await welcomed(ws, "alice")
    await still_works(client)


async def test_header_wins_over_subprotocol_and_query(autojump_clock: Any, harness: Harness) -> None:
    ws = await harness.open_ws(
        path=f"/ws?token={harness.token('carol')}",
        headers=bearer(harness.token("alice")),
        subprotocols=["winkr.v1", f"bearer.{harness.token('bob')}"])
    assert ws.subprotocol == "winkr.v1"
    await welcomed(ws, "alice")


async def test_header_wins_even_when_it_is_invalid(autojump_clock: Any, harness: Harness) -> None:
    rejection = await refused(harness, path=f"/ws?token={harness.token('carol')}",
                              headers=bearer("not-a-jwt"),
                              subprotocols=["winkr.v1", f"bearer.{harness.token('bob')}"])
    assert_unauthorized(rejection)


async def test_missing_token_is_refused_401(autojump_clock: Any, harness: Harness) -> None:
    assert_unauthorized(await refused(harness))


async def test_missing_token_with_winkr_subprotocol_only_is_refused_401(autojump_clock: Any,
                                                                        harness: Harness) -> None:
    assert_unauthorized(await refused(harness, subprotocols=["winkr.v1"]))


BAD_TOKENS = {
    "garbage": lambda h: "not.a.jwt",
    "bad_signature": lambda h: sign(claims_for(h), key="another-secret-0123456789abcdef0123"),
    "expired": lambda h: sign(claims_for(h, ttl=-1)),
    "missing_sub": lambda h: sign(claims_for(h, sub=None)),
    "missing_exp": lambda h: sign({"sub": "alice", "iat": int(h.server.clock())}),
    "sub_too_long": lambda h: sign(claims_for(h, sub="a" * 65)),
    "empty_sub": lambda h: sign(claims_for(h, sub="")),
    "alg_none": lambda h: sign(claims_for(h), key=None, algorithm="none"),
    "hs512_when_hs256": lambda h: sign(claims_for(h), algorithm="HS512"),
}


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with our key
@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
@pytest.mark.parametrize("carrier", ["header", "subprotocol", "query"])
async def test_bad_token_is_refused_401(autojump_clock: Any, harness: Harness, kind: str,
                                        carrier: str) -> None:
    token = BAD_TOKENS[kind](harness)
    if carrier == "header":
        rejection = await refused(harness, headers=bearer(token))
    elif carrier == "subprotocol":
        rejection = await refused(harness, subprotocols=["winkr.v1", f"bearer.{token}"])
    else:
        rejection = await refused(harness, path=f"/ws?token={token}")
    assert_unauthorized(rejection)


async def test_sub_of_64_characters_is_accepted(autojump_clock: Any, harness: Harness) -> None:
    sub = "u" * 64
    ws = await harness.open_ws(headers=bearer(sign(claims_for(harness, sub=sub))))
    await welcomed(ws, sub)


@pytest.mark.parametrize("path", ["/", "/chat", "/ws/extra", "/wss"])
async def test_unknown_path_is_refused_404(autojump_clock: Any, harness: Harness, path: str) -> None:
    rejection = await refused(harness, path=path, headers=bearer(harness.token("alice")))
    assert rejection.status_code == 404


async def test_connection_established_payload(autojump_clock: Any, harness: Harness) -> None:
    first = Client(await harness.open_ws(headers=bearer(harness.token("alice"))), "alice")
    second = Client(await harness.open_ws(headers=bearer(harness.token("alice"))), "alice")
    hellos = [await first.recv(), await second.recv()]
    for hello in hellos:
        assert hello["event"] == "connection:established"
        assert "ref" not in hello
        assert TIMESTAMP.match(hello["timestamp"]), hello
        data = hello["data"]
        assert set(data) == {"user_id", "connection_id", "timestamp", "settings"}
        assert data["settings"] == {"read_receipts": True, "online_status": True}  # the defaults (§12)
        assert data["user_id"] == "alice"
        assert isinstance(data["connection_id"], str) and data["connection_id"]
        assert TIMESTAMP.match(data["timestamp"]), data
    assert hellos[0]["data"]["connection_id"] != hellos[1]["data"]["connection_id"]


# --- the envelope -------------------------------------------------------------------------

UNREADABLE_FRAMES = {
    "not_json": "{this is not json",
    "empty_text": "",
    "json_array": '[{"event": "conversation:list", "data": {}}]',
    "json_string": '"conversation:list"',
    "json_number": "42",
    "json_null": "null",
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE_FRAMES))
async def test_unreadable_frame_is_a_validation_error(autojump_clock: Any, harness: Harness,
                                                      kind: str) -> None:
    alice = await harness.connect("alice")
    await alice.send_raw(UNREADABLE_FRAMES[kind])
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["data"]["code"] == "VALIDATION_ERROR"
    assert error["data"]["request_event"] is None
    await still_works(alice)


async def test_binary_frame_is_a_validation_error(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    await alice.send_raw(orjson.dumps({"event": "conversation:list", "data": {}}))
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["data"]["code"] == "VALIDATION_ERROR"
    await still_works(alice)


@pytest.mark.parametrize("frame", [
    {"data": {}, "ref": "e1"},
    {"event": None, "data": {}, "ref": "e1"},
    {"event": 7, "data": {}, "ref": "e1"},
    {"event": "", "data": {}, "ref": "e1"},
], ids=["absent", "null", "number", "empty"])
async def test_frame_without_event_is_a_validation_error(autojump_clock: Any, harness: Harness,
                                                         frame: dict[str, Any]) -> None:
    alice = await harness.connect("alice")
    await alice.send_raw(orjson.dumps(frame).decode())
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["data"]["code"] == "VALIDATION_ERROR"
    assert error["data"]["request_event"] is None
    assert error.get("ref") == "e1"
    await still_works(alice)


@pytest.mark.parametrize("data", [[1, 2], "text", 5, True], ids=["array", "string", "number", "bool"])
async def test_data_not_an_object_is_a_validation_error(autojump_clock: Any, harness: Harness,
                                                        data: Any) -> None:
    alice = await harness.connect("alice")
    await alice.send_raw(orjson.dumps({"event": "conversation:list", "data": data, "ref": "d1"}).decode())
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["data"]["code"] == "VALIDATION_ERROR"
    assert error["data"]["request_event"] == "conversation:list"
    assert error.get("ref") == "d1"
    await still_works(alice)


async def test_unknown_event_names_field_event_and_echoes_the_name(autojump_clock: Any,
                                                                   harness: Harness) -> None:
    alice = await harness.connect("alice")
    ref = await alice.send("chat:dance", {"style": "waltz"})
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["ref"] == ref
    assert error["data"]["code"] == "VALIDATION_ERROR"
    assert error["data"]["details"]["field"] == "event"
    assert error["data"]["request_event"] == "chat:dance"
    await still_works(alice)


@pytest.mark.parametrize("event,data,field", [
    ("conversation:join", {}, "conversation_id"),
    ("conversation:join", {"conversation_id": 5}, "conversation_id"),
    ("conversation:join", {"conversation_id": None}, "conversation_id"),
    ("conversation:leave", {"conversation_id": ["c"]}, "conversation_id"),
    ("typing:start", {}, "conversation_id"),
    ("message:send", {"content": "hi", "type": "text"}, "conversation_id"),
    ("message:read", {"conversation_id": "c1"}, "message_id"),
    ("message:delete", {"conversation_id": "c1", "message_id": 12}, "message_id"),
    ("message:history", {"conversation_id": "c1", "limit": "ten"}, "limit"),
    ("message:history", {"conversation_id": "c1", "before_seq": "3"}, "before_seq"),
    ("conversation:create", {}, "participant_ids"),
    ("conversation:create", {"participant_ids": "bob"}, "participant_ids"),
    ("user:status", {}, "status"),
    ("user:status", {"status": 1}, "status"),
    ("auth:refresh", {}, "token"),
    ("auth:refresh", {"token": 12345}, "token"),
])
async def test_missing_or_mistyped_field_is_named(autojump_clock: Any, harness: Harness, event: str,
                                                  data: dict[str, Any], field: str) -> None:
    alice = await harness.connect("alice")
    ref = await alice.send(event, data)
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["ref"] == ref
    assert error["data"]["code"] == "VALIDATION_ERROR"
    assert error["data"]["details"]["field"] == field, error
    assert error["data"]["request_event"] == event
    await still_works(alice)


async def test_ref_is_echoed_on_direct_replies_and_absent_on_broadcasts(autojump_clock: Any,
                                                                        harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")

    async def direct(client: Client, event: str, data: dict[str, Any], answer: str) -> dict[str, Any]:
        ref = await client.send(event, data, ref=f"{client.user_id}-{event}")
        reply = await client.expect(answer, ref=ref)
        assert reply["ref"] == ref
        return reply

    created = await direct(alice, "conversation:create", {"participant_ids": ["bob"]}, "conversation:created")
    conv = created["data"]["conversation"]["id"]
    await direct(bob, "conversation:join", {"conversation_id": conv}, "conversation:joined")
    await direct(alice, "conversation:join", {"conversation_id": conv}, "conversation:joined")
    await alice.send("typing:start", {"conversation_id": conv}, ref="typing-ref")
    sent = await direct(alice, "message:send", {"conversation_id": conv, "content": "hello", "type": "text",
                                                "metadata": {}}, "message:new")
    message_id = sent["data"]["message"]["id"]
    await direct(bob, "message:read", {"conversation_id": conv, "message_id": message_id}, "message:viewed")
    await direct(bob, "message:history", {"conversation_id": conv}, "message:history")
    await direct(bob, "conversation:list", {}, "conversation:list")
    await direct(alice, "message:delete", {"conversation_id": conv, "message_id": message_id},
                 "message:deleted")
    await direct(alice, "user:status", {"status": "away"}, "user:status_updated")
    await direct(alice, "conversation:leave", {"conversation_id": conv}, "conversation:left")
    error = await direct(alice, "message:delete", {"conversation_id": conv, "message_id": message_id},
                         "error")
    assert error["data"]["code"] == "NOT_FOUND"  # already deleted
    error = await direct(alice, "conversation:join", {"conversation_id": 5}, "error")
    assert error["data"]["code"] == "VALIDATION_ERROR"

    bob_broadcasts = await bob.nothing_more()
    alice_broadcasts = await alice.nothing_more()
    for event in bob_broadcasts + alice_broadcasts:
        assert "ref" not in event, event
    assert {"conversation:created", "typing:indicator", "message:new", "message:deleted"} <= {
        e["event"] for e in bob_broadcasts}, bob_broadcasts
    assert {"message:delivered", "message:viewed"} <= {e["event"] for e in alice_broadcasts}, alice_broadcasts


# --- the frame limit ---------------------------------------------------------------------

def padded_request(size: int, ref: str) -> str:
    """A valid conversation:list request of exactly ``size`` bytes (JSON whitespace padding)."""
    core = orjson.dumps({"event": "conversation:list", "data": {}, "ref": ref}).decode()
    return core + " " * (size - len(core))


async def test_frame_of_exactly_32_kib_is_served(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    frame = padded_request(MAX_FRAME, "edge")
    assert len(frame.encode()) == MAX_FRAME
    await alice.send_raw(frame)
    reply = await alice.recv()
    assert reply["event"] == "conversation:list", reply
    assert reply["ref"] == "edge"


async def test_frame_over_32_kib_gets_message_too_large_and_close_1009(autojump_clock: Any,
                                                                       harness: Harness) -> None:
    alice = await harness.connect("alice")
    await alice.send_raw(padded_request(MAX_FRAME + 1, "big"))
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["data"]["code"] == "MESSAGE_TOO_LARGE"
    closed = await alice.recv()
    assert closed["event"] == "connection:closed", closed
    assert closed["data"]["reason"] == "message_too_large"
    assert closed["data"]["code"] == 1009
    assert TIMESTAMP.match(closed["data"]["timestamp"])
    assert await until_closed(alice) == ([], 1009)  # nothing after connection:closed


async def test_binary_frame_over_32_kib_is_also_too_large(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    await alice.send_raw(b"\x00" * (MAX_FRAME + 1))
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["data"]["code"] == "MESSAGE_TOO_LARGE"
    closed = await alice.recv()
    assert closed["event"] == "connection:closed"
    assert closed["data"] == {"reason": "message_too_large", "code": 1009,
                              "timestamp": closed["data"]["timestamp"]}
    assert await until_closed(alice) == ([], 1009)  # nothing after connection:closed


# --- slow consumers ----------------------------------------------------------------------

@pytest.fixture
async def small_queue_harness(autojump_clock: Any, tmp_path: Any, engine: Any) -> AsyncIterator[Harness]:
    settings = make_settings(tmp_path, limits={"outbound_queue": 4})
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, settings)
        yield Harness(server, nursery, settings)
        server.request_shutdown()
        nursery.cancel_scope.deadline = trio.current_time() + 30


async def test_slow_consumer_is_closed_4003_and_the_sender_is_not(autojump_clock: Any,
                                                                  small_queue_harness: Harness) -> None:
    harness = small_queue_harness
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")

    bob = await over_slow_link(harness, "bob", 1024)
    await join(bob, conv)
    # From here on bob reads nothing while alice sends (within her 30/minute limit). A client
    # is slow only once its socket has not drained for slow_consumer_seconds (10) while more
    # than outbound_queue (4) frames wait: the first messages only fill its socket.
    count = 25
    for n in range(count):
        if n == 10:
            await trio.sleep(11)
        ack = await alice.request("message:send", {"conversation_id": conv, "type": "text", "metadata": {},
                                                   "content": f"{n:02d} " + "lorem ipsum " * 120})
        assert ack["event"] == "message:new", ack
        assert ack["data"]["message"]["seq"] == n + 1

    history = await alice.request("message:history", {"conversation_id": conv, "limit": 100})
    assert history["event"] == "message:history", history
    assert [m["seq"] for m in history["data"]["messages"]] == list(range(1, count + 1))
    await still_works(alice)

    received = []
    with trio.fail_after(30):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                received.append(orjson.loads(await bob.ws.get_message()))
    assert info.value.reason.code == 4003
    assert received, "bob should get connection:closed before the close frame"
    assert received[-1]["event"] == "connection:closed", received[-1]
    assert received[-1]["data"]["reason"] == "slow_consumer"
    assert received[-1]["data"]["code"] == 4003
    got = [e for e in received if e["event"] == "message:new"]
    assert len(got) < count, "the test did not actually overflow bob's outbound queue"
    # Alice is still connected after bob's departure.
    await still_works(alice)


# --- the per-user connection limit -----------------------------------------------------------

async def test_sixth_connection_is_refused_429_until_one_closes(autojump_clock: Any,
                                                                harness: Harness) -> None:
    clients = [await harness.connect("alice") for _ in range(5)]
    for client in clients:
        await still_works(client)

    rejection = await refused(harness, headers=bearer(harness.token("alice")))
    assert_refused(rejection, 429, "CONNECTION_ERROR")

    # Another user is not affected by alice's limit.
    bob = await harness.connect("bob")
    await still_works(bob)

    await clients[0].close()
    await trio.sleep(1)  # the client reconnects a (mock) second later
    replacement = await harness.connect("alice")
    await still_works(replacement)

    rejection = await refused(harness, headers=bearer(harness.token("alice")))
    assert_refused(rejection, 429, "CONNECTION_ERROR")


# --- unknown conversations ------------------------------------------------------------------

@pytest.mark.parametrize("event,data", [
    ("conversation:join", {}),
    ("conversation:leave", {}),
    ("message:send", {"content": "hello", "type": "text", "metadata": {}}),
    ("message:read", {"message_id": "m1"}),
    ("message:delete", {"message_id": "m1"}),
    ("message:history", {}),
])
async def test_unknown_conversation_is_not_found(harness: Harness, event: str,
                                                 data: dict[str, Any]) -> None:
    # Deliberately on trio's real clock (no autojump_clock): a server that never answers
    # while staying busy would stop a mock clock, and this timeout with it.
    alice = await harness.connect("alice")
    ref = await alice.send(event, {"conversation_id": "no-such-conversation", **data})
    with trio.fail_after(2):  # the answer needs no time at all
        reply = await alice.ws.get_message()
    error = orjson.loads(reply)
    assert error["event"] == "error", error
    assert error["ref"] == ref
    assert error["data"]["code"] == "NOT_FOUND"
    assert error["data"]["request_event"] == event
    await still_works(alice)
