"""The cluster's Redis pieces against the real Redis (``redis_url``; a key prefix per test):
the broker (pub/sub on its own thread, resync after a reconnect), the presence registry's Lua
scripts, and two full nodes meeting only in Redis and the database. Real time, bounded."""
from __future__ import annotations

import base64
import shutil
import socket
import subprocess
from typing import Any

import pytest
import redis
import trio
from cluster_support import attempt, pair_across, running_cluster
from conftest import (
    RATE_LIMITS_OFF,
    REQUIRE_REDIS,
    assert_refused,
    bearer,
    make_settings,
    metric,
    named,
    refused,
    send_text,
    settle,
    until,
)

from winkr.broker import BusEvent, Incoming, Resync
from winkr.broker.redis import RedisBroker
from winkr.registry.redis import RedisRegistry

# Real time: Redis keeps its own clock (TIME) and the broker has a thread of its own, which
# MockClock's autojump would not wait for. Every wait is bounded.
pytestmark = pytest.mark.trio(run=trio.run)
only_once = pytest.mark.sqlite_only
WEBHOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()  # no store involved: one run is enough


@pytest.fixture
async def brokers(redis_url: str, redis_prefix: str, nursery: trio.Nursery) -> Any:
    got: dict[str, list[Incoming]] = {"a": [], "b": []}
    made = {}
    for name in ("a", "b"):
        broker = RedisBroker(redis_url, f"{redis_prefix}{name}", got[name].append, prefix=redis_prefix)
        await nursery.start(broker.run)
        made[name] = broker
    return made["a"], made["b"], got


@only_once
async def test_events_reach_the_subscribed_nodes_but_not_their_publisher(brokers: Any) -> None:
    a, b, got = brokers
    await b.subscribe(["c:x"])
    await a.subscribe(["c:x"])
    assert a.healthy and b.healthy
    a.publish([BusEvent("c:x", "message", {"n": 1}), BusEvent("c:y", "message", {"n": 2})])
    await until(lambda: got["b"])
    await trio.sleep(0.2)  # anything else would have arrived by now
    assert got["b"] == [BusEvent("c:x", "message", {"n": 1}, a.node_id)]
    assert got["a"] == []  # a node's own events never come back to it
    await b.subscribe(["c:x"])  # counted: two subscribers of one topic on node b
    await b.unsubscribe(["c:x"])
    a.publish([BusEvent("c:x", "message", {"n": 3})])
    await until(lambda: len(got["b"]) == 2)
    await b.unsubscribe(["c:x"])
    await trio.sleep(0.1)
    a.publish([BusEvent("c:x", "message", {"n": 4})])
    await trio.sleep(0.3)
    assert [e.data["n"] for e in got["b"] if isinstance(e, BusEvent)] == [1, 3]


@only_once
async def test_a_cancelled_subscribe_leaves_the_node_unsubscribed(brokers: Any) -> None:
    # The Broker contract: a cancelled subscribe changes nothing. It used to leave its count
    # and its channel behind: the node heard the topic for good.
    a, b, got = brokers
    with trio.CancelScope() as scope:
        scope.cancel()
        await b.subscribe(["c:z"])
    assert scope.cancelled_caught
    await b.subscribe(["c:other"])  # confirmed: the thread has applied the commands before it
    a.publish([BusEvent("c:z", "message", {"n": 1}), BusEvent("c:other", "message", {"n": 2})])
    await until(lambda: got["b"])
    await trio.sleep(0.2)  # anything else would have arrived by now
    assert [e.data["n"] for e in got["b"] if isinstance(e, BusEvent)] == [2]


@only_once
async def test_a_killed_pubsub_connection_reconnects_and_asks_for_a_resync(
        brokers: Any, redis_url: str) -> None:
    a, b, got = brokers
    await b.subscribe(["u:bob"])
    admin = redis.Redis.from_url(redis_url)
    try:
        killed = 0
        for client in admin.client_list(_type="pubsub"):
            if client.get("name") == f"winkr-{b.node_id}":  # only this test's own connection
                killed += admin.client_kill_filter(_id=client["id"])
        assert killed == 1
    finally:
        admin.close()
    # every room of the node catches up from the database, and presence from when it was lost
    await until(lambda: any(isinstance(e, Resync) and e.topics is None and e.since is not None for e in got["b"]))
    a.publish([BusEvent("u:bob", "frame", {"n": 1})])
    await until(lambda: any(isinstance(e, BusEvent) for e in got["b"]))  # subscribed again


# --- the presence registry's scripts --------------------------------------------------------------

def registry(redis_url: str, prefix: str, node: str, ttl: float = 3.0) -> RedisRegistry:
    return RedisRegistry.from_url(redis_url, node, prefix=prefix, node_ttl=ttl)


@only_once
async def test_the_connection_cap_and_the_online_announcement_hold_across_nodes(
        redis_url: str, redis_prefix: str) -> None:
    one, two = registry(redis_url, redis_prefix, "one"), registry(redis_url, redis_prefix, "two")
    for node in (one, two):
        assert await node.heartbeat() is False  # its first beat
    assert await one.admit("alice", "1", 2) and await two.admit("alice", "1", 2)
    assert not await two.admit("alice", "2", 2)  # two live members anywhere: the cap
    assert await one.opened("alice", "1", True) is True  # the first open connection: announce
    assert await two.opened("alice", "1", True) is False  # already visible: nobody announces again
    assert await one.visible(["alice", "bob"]) == {"alice": True, "bob": False}
    assert await two.truth("alice") == (2, "online")
    assert await one.connected(["alice", "bob"]) == frozenset({"alice"})
    assert await one.closed("alice", "1", 5.0) is False  # still open on node two
    assert await two.closed("alice", "1", 0.05) is True  # the last one: an offline check is due
    await until_async(lambda: one.due(), ["alice"])
    expiries = [await one.grace_expired("alice"), await two.grace_expired("alice")]
    assert sorted(e.announce_offline for e in expiries) == [False, True]  # exactly one announces
    assert await one.truth("alice") == (0, "offline")


async def until_async(ask: Any, expected: Any, seconds: float = 5.0) -> None:
    """Poll (real time) until ``await ask() == expected``: for a deadline Redis keeps."""
    with trio.fail_after(seconds):
        while await ask() != expected:  # noqa: ASYNC110 - polling Redis by design
            await trio.sleep(0.02)


@only_once
async def test_status_and_privacy_decide_the_announcements(redis_url: str, redis_prefix: str) -> None:
    one = registry(redis_url, redis_prefix, "one")
    await one.heartbeat()
    await one.admit("alice", "1", 5)
    assert await one.opened("alice", "1", True)
    change = await one.set_status("alice", "offline", True)
    assert (change.previous, change.announce) == ("online", "offline")
    assert (await one.set_status("alice", "away", True)).announce == "online"
    assert await one.truth("alice") == (1, "away")
    assert await one.set_online_status("alice", False) == "offline"
    assert await one.set_online_status("alice", True) == "online"
    await one.admit("alice", "2", 5)
    await one.release("alice", "2")
    assert await one.truth("alice") == (1, "away")


@only_once
async def test_a_dead_node_s_members_stop_counting_and_its_users_get_an_offline_check(
        redis_url: str, redis_prefix: str) -> None:
    ttl = 0.3
    dying, living = registry(redis_url, redis_prefix, "dying", ttl), registry(redis_url, redis_prefix, "living", ttl)
    await dying.heartbeat()
    await living.heartbeat()
    await dying.admit("alice", "1", 1)
    assert await dying.opened("alice", "1", True)
    assert not await living.admit("alice", "1", 1)  # the cap of 1 is taken on the other node
    # "dying" stops beating; "living" keeps beating and sweeping, as its upkeep task does.
    swept: list[str] = []
    with trio.fail_after(5):
        while not swept:
            await living.heartbeat()
            swept = await living.sweep(0.05)
            await trio.sleep(0.05)
    assert swept == ["alice"]
    assert await living.admit("alice", "1", 1)  # the slot is free
    await until_async(lambda: living.due(), ["alice"])
    assert (await living.grace_expired("alice")).announce_offline is True
    assert await dying.heartbeat() is False  # it was taken for dead: it must register again


# --- two full nodes meeting only in Redis -----------------------------------------------------------

async def test_two_nodes_on_redis_chat_and_see_each_other_online(
        redis_url: str, redis_prefix: str, tmp_path: Any) -> None:
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF, broker_url=redis_url, redis_key_prefix=redis_prefix,
                             presence_grace=0.2)
    with trio.fail_after(30):
        async with running_cluster(settings) as cluster:
            alice, bob, conv = await pair_across(cluster)
            sent = await send_text(alice, conv, "through redis")
            assert (await bob.expect("message:new"))["data"]["message"] == sent
            assert (await alice.expect("message:delivered"))["data"]["recipient_id"] == "bob"
            answer = await send_text(bob, conv, "back")
            assert (await alice.expect("message:new"))["data"]["message"] == answer
            await alice.close()
            offline = await bob.expect("user:offline")  # announced by one node, heard on the other
            assert offline["data"]["user_id"] == "alice"


# --- a Redis of the test's own, restarted under the nodes ----------------------------------------

class OwnRedis:
    """A ``redis-server`` on a free loopback port, started and killed by PID (never the shared one)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def spawn(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own redis-server, fixed arguments
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def start(self) -> None:
        self.spawn()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            with trio.fail_after(10):
                while True:
                    try:
                        client.ping()
                        return
                    except redis.ConnectionError:
                        await trio.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def own_redis(redis_url: str) -> Any:  # redis_url: skipped (or failed) like every Redis test
    if shutil.which("redis-server") is None:
        if REQUIRE_REDIS:
            pytest.fail("redis-server is not installed [WINKR_TEST_REQUIRE_REDIS is set]", pytrace=False)
        pytest.skip("redis-server is not installed")
    server = OwnRedis()
    yield server
    server.kill()


@only_once
async def test_a_redis_restart_loses_nothing_acknowledged(own_redis: OwnRedis, tmp_path: Any) -> None:
    await own_redis.start()
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF, broker_url=own_redis.url)
    with trio.fail_after(60):
        async with running_cluster(settings) as cluster:
            alice, bob, conv = await pair_across(cluster)
            await send_text(alice, conv, "before")
            await bob.expect("message:new")

            own_redis.kill()
            during = [await send_text(alice, conv, f"while Redis is down {n}") for n in range(3)]  # acked
            rejection = await refused(cluster.node(1), bearer(cluster.node(1).token("carol")))
            assert_refused(rejection, 503, "CONNECTION_ERROR")  # new connections wait for Redis (§17.9)

            await own_redis.start()  # empty: presence and subscriptions are rebuilt by the nodes
            back = trio.current_time()
            got = [(await bob.expect("message:new"))["data"]["message"] for _ in during]
            assert got == during  # filled from the database after the reconnect, in order, once
            assert trio.current_time() - back < 10  # by the resync, not the 30 s position check
            after = await send_text(alice, conv, "after")
            assert (await bob.expect("message:new"))["data"]["message"] == after
            assert [m["seq"] for m in named(await bob.nothing_more(0.5), "message:new")] == []
            for _ in range(200):  # admissions work again (a client retries a 503 after a moment;
                # up to 20 s: a Redis call that times out on a loaded machine pauses the limiter 1 s)
                if (carol := await attempt(cluster.node(1), "carol")) is not None:
                    break
                await trio.sleep(0.1)
            assert carol is not None
            await carol.close()


@only_once
async def test_with_push_webhooks_on_sends_and_lists_are_answered_while_redis_is_down(
        own_redis: OwnRedis, tmp_path: Any) -> None:
    # message.created asks presence who has no open connection before the commit; with Redis
    # away that question failed and the send was never acknowledged (contract §17.9: it is).
    await own_redis.start()
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF, broker_url=own_redis.url,
                             webhook_url="http://127.0.0.1:9/never-answers", webhook_secret=WEBHOOK_SECRET)
    with trio.fail_after(60):
        async with running_cluster(settings) as cluster:
            alice, bob, conv = await pair_across(cluster)  # bob joined on node 1: a push candidate
            own_redis.kill()
            with trio.fail_after(10):
                sent = await send_text(alice, conv, "while Redis is down")
                listed = await alice.request("conversation:list")
            assert sent["seq"] == 1
            assert listed["event"] == "conversation:list", listed
            await own_redis.start()
            assert (await bob.expect("message:new"))["data"]["message"] == sent


@only_once
async def test_appearing_offline_survives_a_redis_restart(own_redis: OwnRedis, tmp_path: Any) -> None:
    # The registry kept the status alone: Redis restarted empty, the nodes registered their
    # connections again and announced an invisible user online to her contacts.
    await own_redis.start()
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF, broker_url=own_redis.url)
    with trio.fail_after(60):
        async with running_cluster(settings) as cluster:
            bob = await cluster.node(1).connect("bob")
            alice = await cluster.node(0).connect("alice")
            await cluster.node(0).conversation(alice, "bob")
            await bob.expect("conversation:created")
            alice_too = await cluster.node(1).connect("alice")  # chooses for both of her connections
            await settle(alice, bob, alice_too)
            hidden = await alice_too.request("user:status", {"status": "offline"})
            assert hidden["event"] == "user:status_updated", hidden
            await bob.expect("user:offline")
            await settle(alice, bob, alice_too)

            own_redis.kill()
            await own_redis.start()  # empty: both nodes register alice's connections again
            admin = redis.Redis.from_url(own_redis.url)
            try:
                await until(lambda: len(admin.keys("*alice*conns")) == 1, timeout=15)
            finally:
                admin.close()
            assert named(await bob.nothing_more(3.0), "user:online") == []
            listed = await bob.request("conversation:list")
            seen = [p for c in listed["data"]["conversations"] for p in c["participants"] if p["id"] == "alice"]
            assert [p["online"] for p in seen] == [False], listed


@only_once
async def test_a_user_who_left_just_before_a_redis_restart_still_goes_offline(
        own_redis: OwnRedis, tmp_path: Any) -> None:
    # Found over loopback: alice left, Redis restarted empty within her grace period (the
    # offline check lived there), and bob never got user:offline: she stayed online in his UI.
    await own_redis.start()
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF, broker_url=own_redis.url, presence_grace=2.0)
    with trio.fail_after(60):
        async with running_cluster(settings) as cluster:
            alice, bob, _ = await pair_across(cluster, alice_joined=False, bob_joined=False)
            await alice.close()
            node0 = cluster.nodes[0].server.metrics
            await until(lambda: metric(node0.text(), "winkr_online_users") == 0)  # node 0 saw her go
            own_redis.kill()
            await own_redis.start()  # empty: her offline check is gone with it
            offline = await bob.expect("user:offline")
            assert offline["data"]["user_id"] == "alice"
            assert named(await bob.nothing_more(2), "user:offline") == []


@only_once
async def test_a_user_who_left_while_redis_was_down_goes_offline_once_it_is_back(
        own_redis: OwnRedis, tmp_path: Any) -> None:
    await own_redis.start()
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF, broker_url=own_redis.url, presence_grace=0.5)
    with trio.fail_after(60):
        async with running_cluster(settings) as cluster:
            alice, bob, _ = await pair_across(cluster, alice_joined=False, bob_joined=False)
            own_redis.kill()
            await alice.close()  # the registry cannot be told now
            node0 = cluster.nodes[0].server.metrics
            await until(lambda: metric(node0.text(), "winkr_online_users") == 0)  # node 0 saw her go
            await own_redis.start()  # empty
            offline = await bob.expect("user:offline")
            assert offline["data"]["user_id"] == "alice"
            assert named(await bob.nothing_more(2), "user:offline") == []


@only_once
async def test_an_offline_check_that_ends_while_redis_is_down_does_not_stop_the_node(
        own_redis: OwnRedis, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Found over loopback: the check's question to the registry raised RegistryUnavailable
    # out of the presence actor (its grace timers run outside its exception barrier), and the
    # whole node exited. Now the check is made again a moment later, until Redis answers.
    await own_redis.start()
    settings = make_settings(tmp_path, limits=RATE_LIMITS_OFF, broker_url=own_redis.url, presence_grace=0.5)
    with trio.fail_after(60):
        async with running_cluster(settings) as cluster:
            alice, bob, _ = await pair_across(cluster, alice_joined=False, bob_joined=False)
            await alice.close()
            node0 = cluster.nodes[0].server.metrics
            await until(lambda: metric(node0.text(), "winkr_online_users") == 0)  # her check began on node 0
            own_redis.kill()
            await until(lambda: "offline check" in caplog.text)  # it ended while Redis was down
            await own_redis.start()  # empty
            offline = await bob.expect("user:offline")
            assert offline["data"]["user_id"] == "alice"
            assert named(await bob.nothing_more(2), "user:offline") == []
