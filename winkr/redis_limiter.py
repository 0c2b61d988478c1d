"""The ``Limiter`` of a cluster: the ephemeral limits (typing, status changes, new connections,
failed handshakes per IP) counted in Redis, so that they hold across every connection of a
user on every node (contract §16; dividing a limit by the node count is wrong as soon as a
user's devices sit on different nodes).

One Lua script runs today's ``winkr.ratelimit.gcra`` on the server: one key per (limit, key)
holding the theoretical arrival time, written with a TTL that ends when the state is
indistinguishable from a fresh key, and the time taken from Redis ``TIME`` so every node
uses one clock (no skew between nodes). The message windows are not here: they stay in the
send transaction in the database (exact and durable, contract §8).

redis-py is synchronous: each call runs on a worker thread (``trio.to_thread.run_sync``)
bounded by a ``CapacityLimiter``. The module imports ``redis`` (the ``cluster`` extra), so it
is imported only when a Redis URL is configured.

When Redis cannot be reached a limit of a fail-open kind (typing, status) allows the event,
and one of a fail-closed kind (connect, failed) raises ``LimiterUnavailable`` (the handshake
gets HTTP 503, contract §17.9): a node must not accept unlimited new connections while it
cannot count them, but a typing indicator is not worth refusing. After a call that timed out
the limiter does not ask Redis again for ``PAUSE_AFTER_FAILURE_SECONDS``: a Redis that does not
answer would otherwise hold every typing event (and every handshake) for
``CALL_TIMEOUT_SECONDS``. A refused connection fails at once and pauses nothing, so a Redis
that is back is used at the next call.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
import trio

from winkr.clock import WallClock
from winkr.logs import ThrottledLines
from winkr.ratelimit import LimiterUnavailable, Rate
from winkr.store.writer import RunSync

log = logging.getLogger("winkr.limiter")

FAIL_CLOSED_KINDS = frozenset({"connect", "failed"})
"""Kinds of key (the part before ``\\x1f``) refused when Redis is unreachable; others are allowed."""
CALL_TIMEOUT_SECONDS = 1.0  # a limiter answer later than this is worse than no answer
PAUSE_AFTER_FAILURE_SECONDS = 1.0  # after a failed call, answer without Redis this long
THREADS = 16  # concurrent Redis calls per node

# KEYS[1]: the GCRA state (the theoretical arrival time, seconds, as text).
# ARGV: count, period (seconds), cost (1 counts; 0 only asks), now (seconds; "" = Redis TIME).
# Returns the seconds until the event would be allowed, as text ("0" = allowed): a Lua number
# returned to Redis is truncated to an integer, and retry_after must stay exact.
GCRA_LUA = """
local count = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local interval = period / count
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval * math.max(cost, 1)
local allowed_at = new_tat - period
if allowed_at > now then
  return string.format('%.6f', allowed_at - now)
end
if cost > 0 then
  redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000))
end
return '0'
"""


class RedisLimiter:
    """A ``winkr.ratelimit.Limiter`` over one Redis. ``prefix`` starts every key (one per
    deployment, or per test); ``clock`` replaces Redis ``TIME`` (tests under MockClock only).
    ``on_error`` is called (on the trio thread) once per call Redis did not answer.
    ``run_sync`` runs the blocking calls: None, worker threads (at most ``THREADS`` at once);
    tests under MockClock pass an inline one (autojump must not see a thread)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "winkr:", clock: WallClock | None = None,
                 on_error: Callable[[], None] = lambda: None, run_sync: RunSync | None = None) -> None:
        self._client = client
        self._script = client.register_script(GCRA_LUA)
        self._prefix = prefix
        self._clock = clock
        self._on_error = on_error
        self._threads = trio.CapacityLimiter(THREADS)
        self._run_sync: RunSync = run_sync or partial(trio.to_thread.run_sync, limiter=self._threads)
        self._error_log = ThrottledLines(log, trio.current_time)
        self._paused_until = -math.inf  # trio time: after a failure, no Redis call before this

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisLimiter:
        """A limiter on its own connection pool to ``url`` (``redis://host:port/db``); connects
        lazily, so an unreachable Redis shows at the first call, not here."""
        client = redis.Redis.from_url(url, socket_timeout=CALL_TIMEOUT_SECONDS,
                                      socket_connect_timeout=CALL_TIMEOUT_SECONDS)
        return cls(client, **kwargs)

    async def hit(self, key: str, rate: Rate) -> float:
        """Count one event under ``key`` on every node: 0.0 if allowed, else the seconds to
        wait (nothing counted). Raises ``LimiterUnavailable`` (fail-closed kinds) when Redis
        does not answer. Cancelling waits for the Redis call (at most CALL_TIMEOUT_SECONDS)."""
        return await self._run(key, rate, cost=1)

    async def check(self, key: str, rate: Rate) -> float:
        """Whether one more event would be allowed (0.0) or the seconds to wait; counts nothing."""
        return await self._run(key, rate, cost=0)

    async def aclose(self) -> None:
        await self._run_sync(self._client.close)

    async def _run(self, key: str, rate: Rate, cost: int) -> float:
        if not rate.count:
            return 0.0
        now = "" if self._clock is None else f"{self._clock():.6f}"
        args = (rate.count, rate.seconds, cost, now)
        call = partial(self._script, keys=[f"{self._prefix}rl:{rate.label}:{key}"], args=args)
        try:
            if trio.current_time() < self._paused_until:
                raise redis.ConnectionError("paused after a failed call")
            answer = await self._run_sync(call)
        except redis.RedisError as exc:
            if isinstance(exc, redis.TimeoutError) and trio.current_time() >= self._paused_until:
                # Only a Redis that does not answer in time: one that refuses does so at once,
                # and its return must be noticed at the next call.
                self._paused_until = trio.current_time() + PAUSE_AFTER_FAILURE_SECONDS
            self._on_error()
            kind = key.partition("\x1f")[0]
            closed = kind in FAIL_CLOSED_KINDS
            # No key in the line: it holds a user id or an address.
            self._error_log.info(kind, "rate limiter: Redis unavailable", kind=kind,
                                 outcome="refused" if closed else "allowed", error=type(exc).__name__)
            if closed:
                raise LimiterUnavailable(f"cannot count {kind} limits: Redis is unreachable") from None
            return 0.0
        return float(answer)
