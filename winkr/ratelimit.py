"""Rate limits: GCRA (the generic cell rate algorithm), the ``Limiter`` seam, and the actor
that owns the in-memory limits (typing, status changes, new connections, failed handshakes
per IP) — the one-node implementation of ``Limiter``. With a Redis URL configured the same
limits are counted in Redis (``winkr.redis_limiter``) across every node.

Why GCRA: one number per (key, limit) — the theoretical arrival time — so memory is O(1)
per user whatever the limit; no fixed-window edge where twice the limit slips through in a
moment; and the exact ``retry_after`` falls out of the arithmetic. A limit of N per period
admits a burst of N, then one every period/N. Message limits are checked by the store in the
same transaction as the insert, with their state persisted, so the hour and day windows
survive a restart.
"""
from __future__ import annotations

from typing import Protocol

import attrs
import trio

from winkr.actor import Reply
from winkr.clock import WallClock
from winkr.config import Limits as LimitSettings
from winkr.errors import RATE_LIMITED, ProtocolError, retry_after_seconds

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


@attrs.frozen
class Rate:
    """``count`` events per ``period`` (a key of ``PERIODS``); a count of 0 switches it off."""

    count: int
    period: str

    @property
    def seconds(self) -> float:
        return PERIODS[self.period]

    @property
    def label(self) -> str:
        return f"{self.count}/{self.period}"


def gcra(tat: float | None, now: float, rate: Rate, cost: float = 1.0) -> tuple[bool, float, float]:
    """One request of weight ``cost`` against a limit: ``(allowed, new_tat, retry_after)``.

    ``tat`` is the stored theoretical arrival time (``None`` for a fresh key); seconds on
    whatever clock ``now`` is on."""
    if not rate.count:
        return True, tat or now, 0.0
    interval = rate.seconds / rate.count
    tat = now if tat is None or tat < now else tat
    new_tat = tat + interval * cost
    allowed_at = new_tat - rate.seconds
    if allowed_at > now:
        return False, tat, allowed_at - now
    return True, new_tat, 0.0


def message_rates(limits: LimitSettings) -> tuple[Rate, ...]:
    """The message windows of contract §8 that are switched on (minute, hour, day)."""
    return tuple(Rate(n, period) for n, period in (
        (limits.messages_per_minute, "minute"), (limits.messages_per_hour, "hour"),
        (limits.messages_per_day, "day")) if n)


def rate_limited(rate: Rate, retry_after: float, what: str) -> ProtocolError:
    """The ``RATE_LIMITED`` error for ``rate``, with ``details.retry_after`` and ``details.limit``."""
    return ProtocolError(RATE_LIMITED, f"too many {what}: limit {rate.label}",
                         retry_after=retry_after_seconds(retry_after), limit=rate.label)


class Limits:
    """A table of GCRA states, owned by whoever holds it. Forgets keys whose state is idle."""

    def __init__(self) -> None:
        self._tats: dict[tuple[str, str], float] = {}

    def hit(self, key: str, rate: Rate, now: float, cost: float = 1.0) -> float:
        """Count one event; return 0 if allowed, else the seconds until it would be."""
        slot = (key, rate.label)
        allowed, tat, retry_after = gcra(self._tats.get(slot), now, rate, cost)
        if allowed and rate.count:
            self._tats[slot] = tat
        return retry_after

    def would_allow(self, key: str, rate: Rate, now: float) -> float:
        """Like ``hit`` but counts nothing."""
        return gcra(self._tats.get((key, rate.label)), now, rate)[2]

    def prune(self, now: float) -> None:
        self._tats = {slot: tat for slot, tat in self._tats.items() if tat > now}

    def __len__(self) -> int:
        return len(self._tats)


@attrs.frozen
class _Hit:
    key: str
    rate: Rate
    count: bool  # False: only ask
    reply: Reply[float]


class LimiterUnavailable(Exception):
    """The limiter could not count (its Redis is unreachable) a limit that fails closed: new
    connections and failed handshakes. The gateway answers HTTP 503 (contract §17.9)."""


class Limiter(Protocol):
    """Counts ephemeral limits by key. ``key`` is ``kind\x1fid`` (``typing\x1falice``,
    ``failed\x1f203.0.113.9``); the kind decides what happens when the limiter cannot count
    (``winkr.redis_limiter``: typing and status fail open, connect and failed fail closed)."""

    async def hit(self, key: str, rate: Rate) -> float:
        """Count one event under ``key``: 0.0 if allowed, else the seconds to wait (nothing is
        counted then). Raises ``LimiterUnavailable`` for a fail-closed kind it cannot count."""
        ...

    async def check(self, key: str, rate: Rate) -> float:
        """Whether one more event would be allowed (0.0) or the seconds to wait; counts nothing."""
        ...


class RateLimiterHandle:
    """The in-process ``Limiter``: a handle to the actor of ``run_rate_limiter``."""

    def __init__(self, inbox: trio.MemorySendChannel[_Hit]) -> None:
        self._inbox = inbox

    async def hit(self, key: str, rate: Rate) -> float:
        """Count one event under ``key``: 0.0 if allowed, else the seconds to wait. Waits for
        the limiter; cancelling the wait may still count the event."""
        reply: Reply[float] = Reply()
        await self._inbox.send(_Hit(key, rate, True, reply))
        return await reply.wait()

    async def check(self, key: str, rate: Rate) -> float:
        """Whether one more event would be allowed (0.0) or the seconds to wait; counts nothing."""
        reply: Reply[float] = Reply()
        await self._inbox.send(_Hit(key, rate, False, reply))
        return await reply.wait()


async def run_rate_limiter(clock: WallClock, *, inbox_size: int = 4096, prune_every: float = 300.0,
                           task_status: trio.TaskStatus[RateLimiterHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Own the in-memory limits; answer each hit at once. Runs until cancelled."""
    send, receive = trio.open_memory_channel[_Hit](inbox_size)
    limits = Limits()
    next_prune = trio.current_time() + prune_every
    task_status.started(RateLimiterHandle(send))
    async with receive:
        while True:
            request = None
            with trio.move_on_at(next_prune):
                try:
                    request = await receive.receive()
                except trio.EndOfChannel:
                    return
            if request is not None:
                if request.count:
                    request.reply.set(limits.hit(request.key, request.rate, clock()))
                else:
                    request.reply.set(limits.would_allow(request.key, request.rate, clock()))
            if trio.current_time() >= next_prune:
                limits.prune(clock())
                next_prune = trio.current_time() + prune_every
