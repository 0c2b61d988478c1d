"""Wall-clock time, injectable.

Durations and deadlines use trio time (so MockClock drives them in tests); wall-clock values
(event timestamps, JWT ``exp``) come from one ``WallClock`` callable handed to every actor.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import trio

WallClock = Callable[[], float]
"""Returns seconds since the Unix epoch."""


def system_wall_clock() -> float:
    return time.time()


def trio_wall_clock(epoch: float = 1_767_225_600.0) -> WallClock:
    """A wall clock that advances with trio's clock (MockClock in tests): ``epoch + now``."""
    return lambda: epoch + trio.current_time()


_last_second: tuple[int, str] = (-1, "")  # one strftime-like formatting per second, not per event


def iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``: ``2025-01-01T12:00:00.000Z``."""
    global _last_second
    second, milli = divmod(int(ts * 1000), 1000)
    cached = _last_second  # one read: the writer thread formats too
    if cached[0] != second:
        t = time.gmtime(second)
        cached = _last_second = (second, f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                                         f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.")
    return f"{cached[1]}{milli:03d}Z"
