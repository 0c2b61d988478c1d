"""Everything that depends on time, under trio's MockClock (autojump): typing expiry (§6),
presence and its grace period (§7), token expiry and refresh (§2), the heartbeat (§8),
graceful shutdown (§1) and the handshake timeout (§2).
Every test names ``autojump_clock`` itself: pytest-trio hands ``trio.run`` only a clock that
the test function receives directly, not one requested by a fixture such as ``harness``.
"""
from __future__ import annotations

from typing import Any

import jwt
import pytest
import trio
import trio.testing
from conftest import SECRET, TIMESTAMP, Client, Harness, iso, joined_pair, named, query, still_works, until_closed
from wire_clients import RawClient, assert_closed_with

EPSILON = 0.05  # mock seconds: autojump lands exactly on deadlines


# --- helpers ---------------------------------------------------------------------------

# --- typing (§6) ----------------------------------------------------------------------------

async def test_typing_start_is_broadcast_once_and_stop_clears_it(autojump_clock: Any,
                                                                 harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)

    await alice.send("typing:start", {"conversation_id": conv})
    indicator = await bob.expect("typing:indicator")
    assert "ref" not in indicator
    data = indicator["data"]
    assert data["conversation_id"] == conv
    assert data["user_id"] == "alice"
    assert data["username"] == "name-alice"
    assert data["is_typing"] is True
    assert TIMESTAMP.match(data["timestamp"])
    assert named(await bob.nothing_more(1.0), "typing:indicator") == []

    await alice.send("typing:start", {"conversation_id": conv})  # no change of state
    assert named(await bob.nothing_more(1.0), "typing:indicator") == []

    await alice.send("typing:stop", {"conversation_id": conv})
    indicator = await bob.expect("typing:indicator")
    assert indicator["data"]["user_id"] == "alice"
    assert indicator["data"]["is_typing"] is False
    await alice.send("typing:stop", {"conversation_id": conv})  # no change of state
    assert named(await bob.nothing_more(1.0), "typing:indicator") == []

    # The typist hears nothing: no success reply, no echo of her own indicator.
    assert await alice.nothing_more(0.1) == []


async def test_typing_expires_after_6_seconds_of_silence(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    await alice.send("typing:start", {"conversation_id": conv})
    started = trio.current_time()
    assert (await bob.expect("typing:indicator"))["data"]["is_typing"] is True

    assert named(await bob.nothing_more(5.9), "typing:indicator") == []
    indicator = await bob.expect("typing:indicator")
    assert indicator["data"]["is_typing"] is False
    assert indicator["data"]["user_id"] == "alice"
    assert abs(trio.current_time() - started - 6.0) < EPSILON


async def test_typing_start_again_restarts_the_6_seconds(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    await alice.send("typing:start", {"conversation_id": conv})
    assert (await bob.expect("typing:indicator"))["data"]["is_typing"] is True
    assert named(await bob.nothing_more(4.0), "typing:indicator") == []

    await alice.send("typing:start", {"conversation_id": conv})
    renewed = trio.current_time()
    assert named(await bob.nothing_more(5.9), "typing:indicator") == []  # past the first 6 s
    indicator = await bob.expect("typing:indicator")
    assert indicator["data"]["is_typing"] is False
    assert abs(trio.current_time() - renewed - 6.0) < EPSILON


async def test_leaving_the_room_stops_typing(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    await alice.send("typing:start", {"conversation_id": conv})
    assert (await bob.expect("typing:indicator"))["data"]["is_typing"] is True

    left_at = trio.current_time()
    reply = await alice.request("conversation:leave", {"conversation_id": conv})
    assert reply["event"] == "conversation:left", reply
    indicator = await bob.expect("typing:indicator")
    assert indicator["data"]["is_typing"] is False
    assert indicator["data"]["user_id"] == "alice"
    assert trio.current_time() - left_at < EPSILON


async def test_disconnecting_stops_typing(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    await alice.send("typing:start", {"conversation_id": conv})
    assert (await bob.expect("typing:indicator"))["data"]["is_typing"] is True

    gone_at = trio.current_time()
    await alice.close()
    indicator = await bob.expect("typing:indicator")
    assert indicator["data"]["is_typing"] is False
    assert indicator["data"]["user_id"] == "alice"
    assert trio.current_time() - gone_at < EPSILON


# --- presence (§7) --------------------------------------------------------------------------

async def test_first_connection_announces_online_to_contacts_only(autojump_clock: Any,
                                                                  harness: Harness) -> None:
    bob = await harness.connect("bob")
    await harness.conversation(bob, "alice")
    carol = await harness.connect("carol")  # shares no conversation with alice

    alice = await harness.connect("alice")
    online = await bob.expect("user:online")
    assert "ref" not in online
    assert online["data"]["user_id"] == "alice"
    assert online["data"]["username"] == "name-alice"
    assert TIMESTAMP.match(online["data"]["online_at"])
    assert named(await carol.nothing_more(1.0), "user:online") == []

    second = await harness.connect("alice")  # not the first connection: no second announcement
    assert named(await bob.nothing_more(1.0), "user:online") == []
    await still_works(alice)
    await still_works(second)


async def test_offline_only_after_the_5_second_grace(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, _ = await joined_pair(harness)
    await alice.close()
    closed_at = trio.current_time()

    assert named(await bob.nothing_more(4.0), "user:offline") == []
    offline = await bob.expect("user:offline")
    assert "ref" not in offline
    assert offline["data"]["user_id"] == "alice"
    assert offline["data"]["username"] == "name-alice"
    assert TIMESTAMP.match(offline["data"]["offline_at"])
    assert abs(trio.current_time() - closed_at - 5.0) < EPSILON


async def test_offline_waits_for_the_last_connection(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, _ = await joined_pair(harness)
    other = await harness.connect("alice")
    await alice.close()
    assert named(await bob.nothing_more(10.0), "user:offline") == []

    await other.close()
    closed_at = trio.current_time()
    offline = await bob.expect("user:offline")
    assert offline["data"]["user_id"] == "alice"
    assert abs(trio.current_time() - closed_at - 5.0) < EPSILON


async def test_reconnect_within_grace_makes_no_flap(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, _ = await joined_pair(harness)
    await alice.close()
    await trio.sleep(3.0)
    again = await harness.connect("alice")
    seen = await bob.nothing_more(10.0)
    assert named(seen, "user:offline") == []
    assert named(seen, "user:online") == []
    await still_works(again)


async def test_second_disconnect_restarts_the_grace(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, _ = await joined_pair(harness)
    await alice.close()  # t = 0: a grace that would end at 5
    await trio.sleep(3.0)
    again = await harness.connect("alice")
    await trio.sleep(1.0)
    await again.close()  # t = 4: the grace now ends at 9
    closed_at = trio.current_time()

    assert named(await bob.nothing_more(4.9), "user:offline") == []
    offline = await bob.expect("user:offline")
    assert offline["data"]["user_id"] == "alice"
    assert abs(trio.current_time() - closed_at - 5.0) < EPSILON
    assert named(await bob.nothing_more(10.0), "user:offline") == []  # once only


async def test_status_offline_is_announced_at_once(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    asked_at = trio.current_time()
    reply = await alice.request("user:status", {"status": "offline"})
    assert reply["event"] == "user:status_updated", reply
    assert reply["ref"]
    assert set(reply["data"]) == {"status", "updated_at"}
    assert reply["data"]["status"] == "offline"
    assert TIMESTAMP.match(reply["data"]["updated_at"])

    offline = await bob.expect("user:offline")
    assert offline["data"]["user_id"] == "alice"
    assert trio.current_time() - asked_at < EPSILON

    listing = await bob.request("conversation:list")
    people = {p["id"]: p for c in listing["data"]["conversations"] for p in c["participants"]}
    assert people["alice"]["online"] is False
    await still_works(alice)

    reply = await alice.request("user:status", {"status": "online"})
    assert reply["event"] == "user:status_updated", reply
    assert reply["data"]["status"] == "online"
    assert (await bob.expect("user:online"))["data"]["user_id"] == "alice"


@pytest.mark.parametrize("status", ["away", "busy", "online"])
async def test_visible_statuses_are_acknowledged(autojump_clock: Any, harness: Harness,
                                                 status: str) -> None:
    alice = await harness.connect("alice")
    ref = await alice.send("user:status", {"status": status})
    reply = await alice.recv()
    assert reply["event"] == "user:status_updated", reply
    assert reply["ref"] == ref
    assert reply["data"]["status"] == status


@pytest.mark.parametrize("status", ["invisible", "OFFLINE", "", 3, None])
async def test_invalid_status_is_a_validation_error(autojump_clock: Any, harness: Harness,
                                                    status: Any) -> None:
    alice = await harness.connect("alice")
    ref = await alice.send("user:status", {"status": status})
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["ref"] == ref
    assert error["data"]["code"] == "VALIDATION_ERROR"
    assert error["data"]["details"]["field"] == "status"
    assert error["data"]["request_event"] == "user:status"
    await still_works(alice)


# --- token expiry and refresh (§2) ------------------------------------------------------------

async def test_token_expiry_closes_with_4001(autojump_clock: Any, harness: Harness) -> None:
    opened = trio.current_time()
    alice = await harness.connect("alice", token=harness.token("alice", ttl=120))
    events, code = await until_closed(alice, timeout=300)
    assert_closed_with(events, "token_expired", 4001)
    assert code == 4001
    assert 119.0 <= trio.current_time() - opened <= 121.0


async def test_refresh_extends_the_connection(autojump_clock: Any, harness: Harness) -> None:
    opened = trio.current_time()
    alice = await harness.connect("alice", token=harness.token("alice", ttl=120))
    await trio.sleep(60)

    fresh = harness.token("alice", ttl=300)  # expires at opened + 360
    exp = jwt.decode(fresh, SECRET, algorithms=["HS256"], options={"verify_exp": False})["exp"]
    ref = await alice.send("auth:refresh", {"token": fresh})
    reply = await alice.recv()
    assert reply["event"] == "auth:refreshed", reply
    assert reply["ref"] == ref
    assert reply["data"]["expires_at"] == iso(exp)

    await trio.sleep(120)  # past the first token's expiry
    assert alice.ws.closed is None
    await still_works(alice)

    events, code = await until_closed(alice, timeout=300)
    assert_closed_with(events, "token_expired", 4001)
    assert code == 4001
    assert 359.0 <= trio.current_time() - opened <= 361.0


async def test_refresh_for_another_user_is_forbidden(autojump_clock: Any, harness: Harness) -> None:
    opened = trio.current_time()
    alice = await harness.connect("alice", token=harness.token("alice", ttl=120))
    ref = await alice.send("auth:refresh", {"token": harness.token("mallory", ttl=3600)})
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["ref"] == ref
    assert error["data"]["code"] == "FORBIDDEN"
    assert error["data"]["request_event"] == "auth:refresh"
    await still_works(alice)

    events, code = await until_closed(alice, timeout=300)  # the old expiry still holds
    assert_closed_with(events, "token_expired", 4001)
    assert 119.0 <= trio.current_time() - opened <= 121.0


@pytest.mark.parametrize("kind", ["garbage", "bad_signature", "expired", "alg_none"])
async def test_refresh_with_an_invalid_token_is_unauthorized(autojump_clock: Any, harness: Harness,
                                                             kind: str) -> None:
    alice = await harness.connect("alice", token=harness.token("alice", ttl=120))
    now = harness.server.clock()
    token = {
        "garbage": lambda: "garbage",
        "bad_signature": lambda: jwt.encode({"sub": "alice", "exp": int(now + 3600)},
                                            "another-secret-0123456789abcdef0123", algorithm="HS256"),
        "expired": lambda: jwt.encode({"sub": "alice", "exp": int(now - 1)}, SECRET, algorithm="HS256"),
        "alg_none": lambda: jwt.encode({"sub": "alice", "exp": int(now + 3600)}, None, algorithm="none"),
    }[kind]()
    ref = await alice.send("auth:refresh", {"token": token})
    error = await alice.recv()
    assert error["event"] == "error", error
    assert error["ref"] == ref
    assert error["data"]["code"] == "UNAUTHORIZED"
    assert error["data"]["request_event"] == "auth:refresh"
    await still_works(alice)


# --- heartbeat (§8) ---------------------------------------------------------------------------

async def test_answering_client_stays_connected_for_10_minutes(autojump_clock: Any,
                                                               harness: Harness) -> None:
    alice = await harness.connect("alice")
    await trio.sleep(600)
    assert alice.ws.closed is None
    await still_works(alice)


async def test_server_pings_every_30_seconds(autojump_clock: Any, harness: Harness) -> None:
    raw = RawClient(harness, answer_pings=True)
    opened = trio.current_time()
    await raw.handshake(harness.token("alice"))
    await raw.pump_for(200)
    assert raw.close_code is None, raw.events
    offsets = [round(t - opened, 3) for t in raw.pings]
    assert len(offsets) == 6, offsets
    assert abs(offsets[0] - 30) < 0.5, offsets
    for earlier, later in zip(offsets, offsets[1:]):
        assert abs(later - earlier - 30) < 0.5, offsets
    await raw.send_event("conversation:list", {}, "after-pings")
    await raw.pump_until(lambda: any(e.get("ref") == "after-pings" for e in raw.events), timeout=5)


async def test_client_that_never_answers_pings_is_closed_4002(autojump_clock: Any,
                                                              harness: Harness) -> None:
    raw = RawClient(harness, answer_pings=False)
    opened = trio.current_time()
    await raw.handshake(harness.token("alice"))
    await raw.pump_until(lambda: raw.close_code is not None or raw.eof, timeout=300)

    assert raw.pings, "the server never pinged"
    assert raw.close_code == 4002
    assert raw.closed_at is not None
    assert 60.0 <= raw.closed_at - opened <= 91.0
    assert raw.closed_at - raw.pings[0] >= 60.0 - EPSILON  # a full minute without a pong
    assert raw.events[0]["event"] == "connection:established"
    assert_closed_with(raw.events, "pong_timeout", 4002)


# --- graceful shutdown (§1) -------------------------------------------------------------------

async def send_three(alice: Client, conv: str) -> dict[tuple[str, int], str]:
    """Three acknowledged messages: ``{(conversation_id, seq): content}``."""
    acknowledged = {}
    for n in range(3):
        ack = await alice.request("message:send", {"conversation_id": conv, "type": "text",
                                                   "content": f"before shutdown {n}", "metadata": {}})
        assert ack["event"] == "message:new", ack
        message = ack["data"]["message"]
        acknowledged[(message["conversation_id"], message["seq"])] = message["content"]
    return acknowledged


async def test_shutdown_closes_every_connection_with_1001(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    alone = await harness.connect("carol")  # joined to nothing
    await send_three(alice, conv)

    harness.server.request_shutdown()
    for client in (alice, bob, alone):
        events, code = await until_closed(client, timeout=30)
        assert_closed_with(events, "server_shutdown", 1001)
        assert code == 1001


async def test_shutdown_keeps_acknowledged_messages(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    acknowledged = await send_three(alice, conv)

    harness.server.request_shutdown()
    for client in (alice, bob):
        await until_closed(client, timeout=30)  # however it closes; the data is what counts here
    await trio.sleep(30)  # let the server finish stopping
    rows = {(conv_id, seq): content for conv_id, seq, content in query(
        harness.settings, "SELECT conversation_id, seq, content FROM messages WHERE conversation_id = ?", (conv,))}
    assert rows == acknowledged


# --- handshake timeout (§2) -------------------------------------------------------------------

@pytest.mark.parametrize("opening", [b"", b"GET /ws HTTP/1.1\r\nHost: localhost\r\n"],
                         ids=["silent", "half_request"])
async def test_handshake_must_complete_within_30_seconds(autojump_clock: Any, harness: Harness,
                                                         opening: bytes) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    harness.server.accept_stream(server_stream)
    opened = trio.current_time()
    if opening:
        await client_stream.send_all(opening)
    with trio.fail_after(120):
        data = await client_stream.receive_some()
    assert data == b"", data
    assert abs(trio.current_time() - opened - 30.0) < 0.5


async def test_slow_but_timely_handshake_is_accepted(autojump_clock: Any, harness: Harness) -> None:
    raw = RawClient(harness, answer_pings=True)
    await trio.sleep(29)
    await raw.handshake(harness.token("alice"))
    await raw.pump_until(lambda: bool(raw.events), timeout=5)
    assert raw.events[0]["event"] == "connection:established"
