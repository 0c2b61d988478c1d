"""The limits of contract §8 end to end (and §11.4, §11.16, §11.17, §11.23): messages per
minute / hour / day (the hour and day windows across a restart), typing events, new
conversations, new connections, open connections, failed handshakes per IP, and ``0``
switching each limit off.

Everything runs the real server over in-memory streams under trio's MockClock (autojump),
so "wait ``retry_after`` seconds" takes no real time. Limits are GCRA: N per period admits a
burst of N, then one more every period/N, and ``retry_after`` is exact.
"""
from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from conftest import (
    Client,
    Harness,
    assert_refused,
    bearer,
    error_body,
    history_messages,
    join,
    make_settings,
    refused,
    running,
    send_text,
    still_works,
    text,
)
from trio_websocket import ConnectionRejected

# --- helpers ---------------------------------------------------------------------------

def rate_limit_details(data: dict[str, Any], limit: str) -> float:
    """RATE_LIMITED naming the window hit (§11.17) with a positive ``retry_after``; returns it."""
    assert data["code"] == "RATE_LIMITED", data
    details = data.get("details")
    assert isinstance(details, dict), data
    assert details.get("limit") == limit, data
    retry_after = details.get("retry_after")
    assert isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool), data
    assert retry_after > 0, data
    return float(retry_after)


def assert_rate_limited(reply: dict[str, Any], limit: str, request_event: str) -> float:
    """A RATE_LIMITED error event for ``request_event``; returns ``retry_after``."""
    assert reply["event"] == "error", reply
    assert reply["data"]["request_event"] == request_event, reply
    return rate_limit_details(reply["data"], limit)


def assert_handshake_rate_limited(rejection: ConnectionRejected, limit: str) -> float:
    """A 429 whose body is the same RATE_LIMITED error (§8: the handshake's too)."""
    assert rejection.status_code == 429, rejection
    return rate_limit_details(error_body(rejection)["data"], limit)


LONG_TTL = 10 * 86400.0  # tokens that outlive the day-long waits below


async def connect(harness: Harness, user_id: str) -> Client:
    """A connection whose token outlives every wait of these tests."""
    return await harness.connect(user_id, token=harness.token(user_id, ttl=LONG_TTL))


async def open_and_close(harness: Harness, user_id: str, count: int) -> None:
    """``count`` accepted connections of ``user_id``, at most 5 open at a time."""
    while count:
        batch = [await harness.connect(user_id) for _ in range(min(5, count))]
        count -= len(batch)
        for client in batch:
            await client.close()
        await trio.sleep(0.01)  # let the server release the slots (mock time)


# --- messages per minute ----------------------------------------------------------------------

async def test_thirty_messages_pass_the_31st_is_rate_limited_and_not_stored(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await join(bob, conv)
    await join(alice, conv)

    started = trio.current_time()
    for n in range(30):
        message = await send_text(alice, conv, f"m{n:02d}")
        assert message["seq"] == n + 1
    assert trio.current_time() - started < 2.0, "the burst must fit in one emission interval"

    ref = await alice.send("message:send", text(conv, "one too many"))
    reply = await alice.expect("error", ref=ref)
    retry_after = assert_rate_limited(reply, "30/minute", "message:send")
    assert reply["ref"] == ref
    assert retry_after <= 60 / 30 + 1e-9, reply  # the next slot opens one interval after the burst

    # After exactly retry_after (mock) seconds one more passes, and only one.
    await trio.sleep(retry_after)
    after = await send_text(alice, conv, "after the wait")
    assert after["seq"] == 31
    again = await alice.request("message:send", text(conv, "and one more"))
    assert_rate_limited(again, "30/minute", "message:send")

    # Nothing of the refused ones was stored or broadcast.
    contents = [m["content"] for m in await history_messages(bob, conv)]
    assert contents == [f"m{n:02d}" for n in range(30)] + ["after the wait"]
    bob_new = [e["data"]["message"]["content"] for e in await bob.nothing_more()
               if e["event"] == "message:new"]
    assert bob_new == [f"m{n:02d}" for n in range(30)] + ["after the wait"]
    alice_news = [e for e in await alice.nothing_more() if e["event"] == "message:new"]
    assert alice_news == [], "the refused messages reached nobody"


async def test_the_minute_window_is_shared_by_two_connections_of_one_user(
        autojump_clock: Any, harness: Harness) -> None:
    phone = await harness.connect("alice")
    laptop = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(phone, "bob")
    for n in range(15):
        await send_text(phone, conv, f"phone {n}")
        await send_text(laptop, conv, f"laptop {n}")
    for client in (laptop, phone):
        reply = await client.request("message:send", text(conv, "31st"))
        assert_rate_limited(reply, "30/minute", "message:send")
    # The limit is per user: bob is not affected by alice's window.
    await send_text(bob, conv, "bob is fine")
    assert len(await history_messages(bob, conv)) == 31


# --- hour and day windows, across a restart ----------------------------------------------------

@pytest.mark.parametrize("limits,label,period", [
    ({"messages_per_minute": 0, "messages_per_hour": 5}, "5/hour", 3600.0),
    ({"messages_per_hour": 5}, "5/hour", 3600.0),  # the minute window on too: the hour one is named
    ({"messages_per_minute": 0, "messages_per_hour": 0, "messages_per_day": 4}, "4/day", 86400.0),
    ({"messages_per_day": 4}, "4/day", 86400.0),
], ids=["hour", "hour_with_minute_on", "day", "day_with_minute_and_hour_on"])
async def test_hour_and_day_windows_hold_across_a_restart(
        autojump_clock: Any, tmp_path: Any, engine: Any, watchdog: dict[str, Any], limits: dict[str, int],
        label: str, period: float) -> None:
    count = int(label.split("/")[0])
    settings = make_settings(tmp_path, limits=limits)
    async with running(settings, watchdog) as first:
        alice = await connect(first, "alice")
        conv = await first.conversation(alice, "bob")
        for n in range(count):
            await send_text(alice, conv, f"before {n}")
        reply = await alice.request("message:send", text(conv, "over the limit"))
        retry_after = assert_rate_limited(reply, label, "message:send")
        assert retry_after <= period / count + 1e-9, reply
    await trio.sleep(10)  # the server is down for a while

    async with running(settings, watchdog) as second:
        alice = await connect(second, "alice")
        reply = await alice.request("message:send", text(conv, "still over the limit"))
        retry_after = assert_rate_limited(reply, label, "message:send")
        assert retry_after <= period / count - 10 + 1e-6, reply  # the window kept running
        assert [m["content"] for m in await history_messages(alice, conv)] == [f"before {n}" for n in range(count)]

        await trio.sleep(retry_after)
        await send_text(alice, conv, "after the wait")
        reply = await alice.request("message:send", text(conv, "too soon again"))
        assert_rate_limited(reply, label, "message:send")
        assert len(await history_messages(alice, conv)) == count + 1


# --- typing --------------------------------------------------------------------------------

async def test_typing_20_per_minute_the_21st_is_rate_limited_and_not_broadcast(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await join(bob, conv)
    await bob.nothing_more()

    for n in range(20):  # start/stop alternate, so every one of them changes the state
        await alice.send("typing:stop" if n % 2 else "typing:start", {"conversation_id": conv})
    indicators = [e for e in await bob.nothing_more(0.5) if e["event"] == "typing:indicator"]
    assert [e["data"]["is_typing"] for e in indicators] == [True, False] * 10

    ref = await alice.send("typing:start", {"conversation_id": conv})
    reply = await alice.expect("error", ref=ref)
    retry_after = assert_rate_limited(reply, "20/minute", "typing:start")
    assert retry_after <= 60 / 20 + 1e-9, reply
    assert [e for e in await bob.nothing_more(0.5) if e["event"] == "typing:indicator"] == []
    assert [e for e in await alice.nothing_more(0.1) if e["event"] == "error"] == []

    await trio.sleep(retry_after)
    await alice.send("typing:start", {"conversation_id": conv})
    indicator = await bob.expect("typing:indicator")
    assert indicator["data"]["is_typing"] is True
    assert [e for e in await alice.nothing_more(0.1) if e["event"] == "error"] == []


# --- new conversations -------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"limits": {"conversations_per_day": 3}}], indirect=True)
async def test_new_conversations_per_day_and_getting_an_existing_pair_back_is_free(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await connect(harness, "alice")
    with_bob = await harness.conversation(alice, "bob")  # t = 0
    await trio.sleep(100)
    await harness.conversation(alice, "carol", "dave")  # t = 100
    for _ in range(5):  # §11.23: getting back an existing pair does not count
        assert await harness.conversation(alice, "bob") == with_bob
    await trio.sleep(100)
    await harness.conversation(alice, "erin")  # t = 200: the third one actually created

    reply = await alice.request("conversation:create", {"participant_ids": ["frank"]})
    retry_after = assert_rate_limited(reply, "3/day", "conversation:create")
    # An exact sliding day: the slot of the first conversation (t = 0) frees at t = 86400.
    assert retry_after == pytest.approx(86400 - 200, abs=1.0), reply
    # Nothing was created, and the existing pair still comes back at the limit.
    listed = (await alice.request("conversation:list"))["data"]["conversations"]
    assert len(listed) == 3
    assert await harness.conversation(alice, "bob") == with_bob
    # The limit is per user.
    bob = await connect(harness, "bob")
    await harness.conversation(bob, "frank")

    await trio.sleep(retry_after)
    await harness.conversation(alice, "frank")
    reply = await alice.request("conversation:create", {"participant_ids": ["gina"]})
    retry_after = assert_rate_limited(reply, "3/day", "conversation:create")
    assert retry_after == pytest.approx(100, abs=1.0), reply  # the t = 100 one is next to leave


async def test_new_conversations_day_window_holds_across_a_restart(
        autojump_clock: Any, tmp_path: Any, engine: Any, watchdog: dict[str, Any]) -> None:
    settings = make_settings(tmp_path, limits={"conversations_per_day": 2})
    async with running(settings, watchdog) as first:
        alice = await connect(first, "alice")
        await first.conversation(alice, "bob")
        await first.conversation(alice, "carol")
    async with running(settings, watchdog) as second:
        alice = await connect(second, "alice")
        reply = await alice.request("conversation:create", {"participant_ids": ["dave"]})
        assert_rate_limited(reply, "2/day", "conversation:create")


# --- new connections ---------------------------------------------------------------------------

async def test_new_connections_10_per_minute_then_429_rate_limited(
        autojump_clock: Any, harness: Harness) -> None:
    await open_and_close(harness, "alice", 10)
    rejection = await refused(harness, bearer(harness.token("alice")))
    assert_refused(rejection, 429, "RATE_LIMITED")
    # Another user is not affected.
    bob = await harness.connect("bob")
    await still_works(bob)
    # One more every 60/10 seconds.
    await trio.sleep(6)
    alice = await harness.connect("alice")
    await still_works(alice)
    rejection = await refused(harness, bearer(harness.token("alice")))
    assert_refused(rejection, 429, "RATE_LIMITED")


async def test_new_connections_429_body_carries_retry_after_and_limit(
        autojump_clock: Any, harness: Harness) -> None:
    """§8: every RATE_LIMITED error carries details.retry_after and details.limit — the
    handshake's error body too."""
    await open_and_close(harness, "alice", 10)
    rejection = await refused(harness, bearer(harness.token("alice")))
    assert_handshake_rate_limited(rejection, "10/minute")


@pytest.mark.parametrize("settings", [{"limits": {"connections_per_user": 1, "connections_per_minute": 3}}],
                         indirect=True)
async def test_refused_handshakes_do_not_count_as_new_connections(
        autojump_clock: Any, harness: Harness) -> None:
    """§11.16: the new-connections limit counts accepted connections only."""
    first = await harness.connect("alice")
    for _ in range(5):
        rejection = await refused(harness, bearer(harness.token("alice")))
        assert_refused(rejection, 429, "CONNECTION_ERROR")
    await first.close()
    await trio.sleep(0.01)
    second = await harness.connect("alice")
    await second.close()
    await trio.sleep(0.01)
    third = await harness.connect("alice")  # the third accepted one: still within 3/minute
    await still_works(third)


# --- open connections ----------------------------------------------------------------------------

async def test_sixth_open_connection_is_refused_429_connection_error(
        autojump_clock: Any, harness: Harness) -> None:
    clients = [await harness.connect("alice") for _ in range(5)]
    rejection = await refused(harness, bearer(harness.token("alice")))
    assert_refused(rejection, 429, "CONNECTION_ERROR")
    for client in clients:
        await still_works(client)
    await clients[0].close()
    await trio.sleep(0.5)
    await still_works(await harness.connect("alice"))


@pytest.mark.parametrize("settings", [{"limits": {"connections_per_user": 2}}], indirect=True)
async def test_open_connections_limit_is_a_setting(autojump_clock: Any, harness: Harness) -> None:
    await harness.connect("alice")
    await harness.connect("alice")
    rejection = await refused(harness, bearer(harness.token("alice")))
    assert_refused(rejection, 429, "CONNECTION_ERROR")


# --- failed handshakes per IP --------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"limits": {"failed_handshakes_per_minute_per_ip": 3}}],
                         indirect=True)
async def test_failed_handshakes_per_ip_then_even_a_good_token_gets_429(
        autojump_clock: Any, harness: Harness) -> None:
    for _ in range(3):
        rejection = await refused(harness, bearer("not-a-jwt"))
        assert_refused(rejection, 401, "UNAUTHORIZED")
    rejection = await refused(harness, bearer(harness.token("alice")))
    assert_refused(rejection, 429, "RATE_LIMITED")
    rejection = await refused(harness, bearer(harness.token("bob")))
    assert rejection.status_code == 429

    await trio.sleep(60 / 3)  # one more failure is allowed every 20 s
    alice = await harness.connect("alice")
    await still_works(alice)


@pytest.mark.parametrize("settings", [{"limits": {"failed_handshakes_per_minute_per_ip": 3}}],
                         indirect=True)
async def test_failed_handshakes_429_body_carries_retry_after_and_limit(
        autojump_clock: Any, harness: Harness) -> None:
    for _ in range(3):
        assert (await refused(harness, bearer("not-a-jwt"))).status_code == 401
    rejection = await refused(harness, bearer(harness.token("alice")))
    assert_handshake_rate_limited(rejection, "3/minute")


# --- 0 switches a limit off --------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    {"limits": {"messages_per_minute": 0}},
    {"limits": {"messages_per_minute": 0, "messages_per_hour": 0, "messages_per_day": 0}},
], indirect=True, ids=["minute_off", "all_message_windows_off"])
async def test_zero_switches_the_message_limit_off(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    for n in range(100):
        await send_text(alice, conv, f"m{n}")
    assert len(await history_messages(alice, conv)) == 100


@pytest.mark.parametrize("settings", [{"limits": {"typing_per_minute": 0}}], indirect=True)
async def test_zero_switches_the_typing_limit_off(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conv = await harness.conversation(alice, "bob")
    await join(bob, conv)
    await bob.nothing_more()
    for n in range(60):
        await alice.send("typing:stop" if n % 2 else "typing:start", {"conversation_id": conv})
    assert [e for e in await alice.nothing_more(0.5) if e["event"] == "error"] == []
    indicators = [e for e in await bob.nothing_more(0.5) if e["event"] == "typing:indicator"]
    assert len(indicators) == 60


@pytest.mark.parametrize("settings", [{"limits": {"conversations_per_day": 0}}], indirect=True)
async def test_zero_switches_the_conversation_limit_off(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    for n in range(60):
        await harness.conversation(alice, f"user{n}")


@pytest.mark.parametrize("settings", [{"limits": {"connections_per_minute": 0}}], indirect=True)
async def test_zero_switches_the_new_connections_limit_off(autojump_clock: Any, harness: Harness) -> None:
    await open_and_close(harness, "alice", 25)
    await still_works(await harness.connect("alice"))


@pytest.mark.parametrize("settings", [{"limits": {"connections_per_user": 0}}], indirect=True)
async def test_zero_switches_the_open_connections_limit_off(autojump_clock: Any, harness: Harness) -> None:
    clients = [await harness.connect("alice") for _ in range(8)]
    for client in clients:
        await still_works(client)


@pytest.mark.parametrize("settings", [{"limits": {"failed_handshakes_per_minute_per_ip": 0}}],
                         indirect=True)
async def test_zero_switches_the_failed_handshake_limit_off(autojump_clock: Any, harness: Harness) -> None:
    for _ in range(70):
        assert (await refused(harness, bearer("not-a-jwt"))).status_code == 401
    await still_works(await harness.connect("alice"))


@pytest.mark.parametrize("settings", [{"limits": {"max_frame_bytes": 0}}], indirect=True)
async def test_zero_switches_the_frame_limit_off(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    core = orjson.dumps({"event": "conversation:list", "data": {}, "ref": "big"}).decode()
    await alice.send_raw(core + " " * (40 * 1024))
    reply = await alice.recv()
    assert reply["event"] == "conversation:list", reply
    assert reply["ref"] == "big"
