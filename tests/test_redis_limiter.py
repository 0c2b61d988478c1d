"""The cluster's limiter: GCRA in one Lua script on the real Redis (``redis_url``), the same
answers as the in-process limiter, counts shared by every node, and what happens when Redis
does not answer (typing allowed, new connections refused with 503).

Each test has its own key prefix. The Lua script is given the test's clock (Redis ``TIME``
is what production uses) so that the arithmetic is checked exactly and deterministically.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import redis
import trio
from cluster_processes import OwnRedis
from conftest import (
    RATE_LIMITS_OFF,
    assert_refused,
    join,
    make_settings,
    refused,
    running,
    still_works,
)

from winkr.ratelimit import LimiterUnavailable, Limits, Rate
from winkr.redis_limiter import PAUSE_AFTER_FAILURE_SECONDS, RedisLimiter
from winkr.store.writer import run_inline


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_767_225_600.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(url: str, prefix: str, clock: Any = None, **kwargs: Any) -> RedisLimiter:
    """One node's limiter on a client of its own (calls inline: MockClock must not see threads)."""
    return RedisLimiter(redis.Redis.from_url(url), prefix=prefix, clock=clock, run_sync=run_inline, **kwargs)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.sqlite_only  # no store involved: once is enough
@pytest.mark.parametrize("rate", [Rate(3, "second"), Rate(20, "minute"), Rate(2, "hour"), Rate(1, "day")])
async def test_the_lua_script_answers_as_the_in_process_gcra(redis_url: str, redis_prefix: str, rate: Rate) -> None:
    # A schedule of events (bursts, waits shorter and longer than the interval, asks that
    # count nothing): every answer equals the in-process Limits', to the microsecond.
    clock = Clock()
    in_redis, in_process = limiter(redis_url, redis_prefix, clock), Limits()
    step = rate.seconds / rate.count
    schedule = [(0.0, True)] * (rate.count + 2) + [(step / 3, False), (step / 3, True), (step, True), (step, True),
                                                   (0.0, False), (rate.seconds * 2, True), (0.0, True)]
    answers = []
    for advance, counts in schedule:
        clock.now += advance
        if counts:
            got, want = await in_redis.hit("typing\x1falice", rate), in_process.hit("typing\x1falice", rate, clock.now)
        else:
            got = await in_redis.check("typing\x1falice", rate)
            want = in_process.would_allow("typing\x1falice", rate, clock.now)
        assert got == pytest.approx(want, abs=2e-6), (advance, counts)
        answers.append(got > 0)
    assert True in answers and False in answers  # the schedule crosses the limit both ways
    await in_redis.aclose()


@pytest.mark.sqlite_only
async def test_counts_are_shared_by_every_node_and_the_state_expires(redis_url: str, redis_prefix: str) -> None:
    clock = Clock()
    node_a, node_b = limiter(redis_url, redis_prefix, clock), limiter(redis_url, redis_prefix, clock)
    rate = Rate(20, "minute")
    for n in range(20):
        assert await (node_a if n % 2 else node_b).hit("typing\x1falice", rate) == 0.0
    # The 21st, on either node, waits one interval (60 s / 20); bob's key is his own.
    assert await node_a.hit("typing\x1falice", rate) == pytest.approx(3.0)
    assert await node_b.check("typing\x1falice", rate) == pytest.approx(3.0)
    assert await node_b.hit("typing\x1fbob", rate) == 0.0
    # A refused hit counts nothing; the key lives only as long as its state matters.
    client = redis.Redis.from_url(redis_url)
    key = f"{redis_prefix}rl:20/minute:typing\x1falice"
    assert float(client.get(key) or 0) == pytest.approx(clock.now + 60.0)
    assert 0 < client.pttl(key) <= 60_000
    client.close()
    clock.now += 3.0
    assert await node_b.hit("typing\x1falice", rate) == 0.0
    await node_a.aclose()
    await node_b.aclose()


@pytest.mark.sqlite_only
async def test_redis_time_is_the_clock_when_none_is_given(redis_url: str, redis_prefix: str) -> None:
    node = limiter(redis_url, redis_prefix)
    rate = Rate(2, "day")
    assert [await node.hit("connect\x1falice", rate) for _ in range(2)] == [0.0, 0.0]
    # Real time passes between the calls: the wait is one interval less a moment.
    assert 43_000 < await node.hit("connect\x1falice", rate) <= 43_200
    await node.aclose()


@pytest.mark.sqlite_only
async def test_an_unreachable_redis_allows_typing_and_refuses_connections(redis_prefix: str) -> None:
    errors: list[int] = []
    node = limiter(f"redis://127.0.0.1:{free_port()}/0", redis_prefix, on_error=lambda: errors.append(1))
    assert await node.hit("typing\x1falice", Rate(1, "minute")) == 0.0
    assert await node.hit("status\x1falice", Rate(1, "minute")) == 0.0
    with pytest.raises(LimiterUnavailable):
        await node.check("connect\x1falice", Rate(10, "minute"))
    with pytest.raises(LimiterUnavailable):
        await node.hit("failed\x1f127.0.0.1", Rate(60, "minute"))
    assert len(errors) == 4
    # A limit that is off never asks Redis.
    assert await node.hit("connect\x1falice", Rate(0, "minute")) == 0.0
    assert len(errors) == 4
    await node.aclose()


async def test_limits_hold_across_nodes(tmp_path: Any, redis_url: str, redis_prefix: str) -> None:
    # Two nodes on one database, each with its own limiter on the shared Redis: a user's
    # typing and new connections are counted across both (not per node).
    settings = make_settings(tmp_path, limits={**RATE_LIMITS_OFF, "typing_per_minute": 3,
                                               "connections_per_minute": 3})
    clock = Clock()
    async with running(settings, limiter=limiter(redis_url, redis_prefix, clock)) as node_a, \
            running(settings, limiter=limiter(redis_url, redis_prefix, clock)) as node_b:
        alice_a = await node_a.connect("alice")
        alice_b = await node_b.connect("alice")
        await node_a.connect("bob")
        conv = await node_a.conversation(alice_a, "bob")
        for client in (alice_a, alice_b):
            await join(client, conv)
        for typing_on in (alice_a, alice_b, alice_a):
            await typing_on.send("typing:start", {"conversation_id": conv})
            await still_works(typing_on)  # answered after the typing event: no error came before
            assert "error" not in typing_on.events(), typing_on.backlog
        ref = await alice_b.send("typing:start", {"conversation_id": conv})
        reply = await alice_b.expect("error", ref=ref)
        assert reply["data"]["code"] == "RATE_LIMITED" and reply["data"]["details"]["limit"] == "3/minute", reply
        # Two connections of alice so far; a third on node A, then the fourth is refused on B.
        await node_a.connect("alice")
        rejection = await refused(node_b, headers=[("Authorization", f"Bearer {node_b.token('alice')}")])
        assert assert_refused(rejection, 429, "RATE_LIMITED")["details"]["limit"] == "3/minute"


async def test_new_connections_get_503_while_the_cluster_limiter_cannot_count(tmp_path: Any, redis_prefix: str) -> None:
    settings = make_settings(tmp_path)
    async with running(settings, limiter=limiter(f"redis://127.0.0.1:{free_port()}/0", redis_prefix)) as node:
        rejection = await refused(node, headers=[("Authorization", f"Bearer {node.token('alice')}")])
        assert_refused(rejection, 503, "CONNECTION_ERROR")
        # Established connections are not the limiter's business: they go on (contract §17.9).


async def test_a_node_given_a_broker_url_counts_its_limits_in_that_redis(
        tmp_path: Any, redis_url: str, redis_prefix: str) -> None:
    # No limiter handed in: the server builds its own from broker_url and redis_key_prefix.
    settings = make_settings(tmp_path, broker_url=redis_url, redis_key_prefix=redis_prefix,
                             limits={"connections_per_minute": 2})
    async with running(settings) as node_a, running(settings) as node_b:
        await node_a.connect("alice")
        await node_b.connect("alice")
        rejection = await refused(node_a, headers=[("Authorization", f"Bearer {node_a.token('alice')}")])
        assert assert_refused(rejection, 429, "RATE_LIMITED")["details"]["limit"] == "2/minute"
        client = redis.Redis.from_url(redis_url)
        assert client.exists(f"{redis_prefix}rl:2/minute:connect\x1falice") == 1
        client.close()


class Silent:
    """A TCP server (on a thread of its own) that accepts and never answers, counting the
    connections: a Redis whose every call times out."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.sqlite_only
async def test_after_a_call_timed_out_redis_is_not_asked_again_for_a_second(redis_prefix: str) -> None:
    server = Silent()
    errors: list[int] = []
    node = limiter(f"redis://127.0.0.1:{server.port}/0", redis_prefix, on_error=lambda: errors.append(1))
    try:
        assert await node.hit("typing\x1falice", Rate(1, "minute")) == 0.0  # timed out: failed open
        tried = server.accepted
        assert tried >= 1
        # Within the pause: answered at once, without Redis (and still counted as unanswered).
        assert await node.hit("typing\x1falice", Rate(1, "minute")) == 0.0
        with pytest.raises(LimiterUnavailable):
            await node.check("connect\x1falice", Rate(10, "minute"))
        assert server.accepted == tried and len(errors) == 3
        await trio.sleep(PAUSE_AFTER_FAILURE_SECONDS)
        assert await node.hit("typing\x1falice", Rate(1, "minute")) == 0.0
        assert server.accepted > tried  # asked again after the pause
    finally:
        await node.aclose()
        server.close()


async def test_failed_handshakes_per_address_are_counted_across_nodes(
        tmp_path: Any, redis_url: str, redis_prefix: str) -> None:
    settings = make_settings(tmp_path, limits={"failed_handshakes_per_minute_per_ip": 2})
    clock = Clock()
    bad = [("Authorization", "Bearer not-a-token")]
    async with running(settings, limiter=limiter(redis_url, redis_prefix, clock)) as node_a, \
            running(settings, limiter=limiter(redis_url, redis_prefix, clock)) as node_b:
        assert_refused(await refused(node_a, headers=bad), 401, "UNAUTHORIZED")
        assert_refused(await refused(node_b, headers=bad), 401, "UNAUTHORIZED")
        # The third from the same address, on either node, is over the limit.
        data = assert_refused(await refused(node_a, headers=bad), 429, "RATE_LIMITED")
        assert data["details"]["limit"] == "2/minute", data
        assert data["message"] == "too many failed handshakes from this address"


@pytest.mark.sqlite_only
async def test_a_refusing_redis_is_asked_again_at_the_next_call(tmp_path: Any, redis_prefix: str) -> None:
    # Refused at once (nothing listens yet): no pause, so the Redis that has started since
    # counts the very next call.
    own = OwnRedis(tmp_path)
    errors: list[int] = []
    node = limiter(own.url, redis_prefix, on_error=lambda: errors.append(1))
    try:
        with pytest.raises(LimiterUnavailable):
            await node.check("connect\x1falice", Rate(10, "minute"))
        own.start()
        assert await node.hit("connect\x1falice", Rate(10, "minute")) == 0.0
        assert len(errors) == 1
    finally:
        await node.aclose()
        own.kill()
