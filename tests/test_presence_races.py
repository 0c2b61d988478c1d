"""Presence when a client leaves at awkward moments: a connection closed by its client right
after the handshake (before it read ``connection:established``) still leaves presence — its
user goes offline for their contacts after the grace period and its connection slot is free.

Found over loopback against two ``winkr serve`` nodes on Redis: six clients that opened and at
once closed a WebSocket stayed ``online`` forever (their registry members were never removed)
and the presence actor logged ``IndexError: pop from empty list``; five such connections locked
their user out ("at most 5 open connections per user").
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import trio
from conftest import Harness, bearer, join, named, running, send_text, until_closed

from winkr.config import Settings
from winkr.server import ROOM_IDLE_SECONDS

T = TypeVar("T")


async def like_a_thread(fn: Callable[..., T], *args: Any) -> T:
    """Blocking work as ``trio.to_thread.run_sync`` does it: the caller waits (some mock
    milliseconds) and cannot be cancelled meanwhile; then the work runs (inline: MockClock)."""
    with trio.CancelScope(shield=True):
        await trio.sleep(0.002)
    return fn(*args)


@pytest.fixture
async def threaded(settings: Settings, watchdog: dict[str, Any]) -> AsyncIterator[Harness]:
    async with running(settings, watchdog, run_sync=like_a_thread) as harness:
        yield harness


async def _open_and_close_at_once(harness: Harness, user_id: str) -> None:
    ws = await harness.open_ws(headers=bearer(harness.token(user_id)))
    await ws.aclose()


async def test_a_connection_closed_right_after_the_handshake_goes_offline(autojump_clock: Any,
                                                                           threaded: Harness) -> None:
    harness = threaded
    bob = await harness.connect("bob")
    await harness.conversation(bob, "alice")
    await bob.nothing_more(1.0)

    for _ in range(3):
        await _open_and_close_at_once(harness, "alice")
    await trio.sleep(10.0)  # past the grace period

    # alice has no connection left: bob sees her offline, and she is not counted as connected
    listed = await bob.request("conversation:list")
    alice = next(p for c in listed["data"]["conversations"] for p in c["participants"] if p["id"] == "alice")
    assert alice["online"] is False, listed
    assert await harness.server.gateway.services.presence.connected(["alice"]) == frozenset()


async def test_connections_closed_right_after_the_handshake_free_their_slots(autojump_clock: Any,
                                                                              threaded: Harness) -> None:
    harness = threaded
    limit = harness.settings.limits.connections_per_user
    for _ in range(limit):
        await _open_and_close_at_once(harness, "alice")
    await trio.sleep(1.0)
    # every slot is free again: the user can open `limit` connections
    for _ in range(limit):
        await harness.connect("alice")



async def test_a_connection_closed_while_its_join_waits_for_the_room_leaves_no_member_behind(
        autojump_clock: Any, threaded: Harness) -> None:
    # Once: the connection recorded a join only after the room's answer, so a connection closed
    # while its join waited (token expiry, an API disconnect) never departed from that room:
    # the room kept a dead member, recorded deliveries to it and never went to sleep.
    harness = threaded
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    await join(alice, conv)
    await alice.request("conversation:leave", {"conversation_id": conv})
    await trio.sleep(ROOM_IDLE_SECONDS + 5)  # the room sleeps: a join must wake it

    bob = await harness.connect("bob", token=harness.token("bob", ttl=30))
    expires_at = int(harness.server.clock()) + 30
    await trio.sleep(expires_at - harness.server.clock() - 0.001)
    await bob.send("conversation:join", {"conversation_id": conv})  # the room's wake-up read takes 2 ms
    events, code = await until_closed(bob)
    assert code == 4001 and named(events, "conversation:joined") == [], events  # expired while it waited

    await join(alice, conv)
    await send_text(alice, conv, "anyone there?")
    assert named(await alice.nothing_more(2.0), "message:delivered") == []  # bob is not connected


async def test_a_message_sent_as_a_users_joined_connection_leaves_still_reaches_their_other_one(
        autojump_clock: Any, threaded: Harness) -> None:
    """bob has one connection in the room and one outside it. alice sends; while the room
    commits, bob's joined connection closes: presence forgets it at once, but the room still
    lists it until it reads its Depart (queued behind the send). The room asked presence only
    when a participant had more connections on this node than in the room — bob then had one
    of each, so it skipped presence and bob's other connection never got the unread count (nor
    would a sender's other connection have got its own message)."""
    harness = threaded
    alice = await harness.connect("alice")
    conv = await harness.conversation(alice, "bob")
    await join(alice, conv)
    bob_in = await harness.connect("bob")
    await join(bob_in, conv)
    bob_out = await harness.connect("bob")
    await send_text(alice, conv, "before")
    unread = await bob_out.expect("conversation:unread")
    assert unread["data"]["unread_count"] == 1, unread
    await bob_out.nothing_more(1.0)

    await alice.send("message:send", {"conversation_id": conv, "content": "as bob leaves", "type": "text",
                                      "metadata": {}})
    await bob_in.close()
    unread = await bob_out.expect("conversation:unread")
    assert unread["data"]["unread_count"] == 2, unread
