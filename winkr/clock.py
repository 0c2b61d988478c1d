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


# The formatting of the last two seconds seen, newest first: frames are stamped now while a
# room's run carries ``created_at`` from before its commit, so two seconds interleave around
# each turn of the second (and for as long as a commit takes); one slot thrashed between them.
_recent: tuple[tuple[int, str], tuple[int, str]] = ((-1, ""), (-1, ""))
_MILLIS = tuple(f".{milli:03d}Z" for milli in range(1000))  # an int format per call costs more


def iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``: ``2025-01-01T12:00:00.000Z``."""
    global _recent
    second, milli = divmod(int(ts * 1000), 1000)
    recent = _recent  # one read: the writer thread formats too
    if recent[0][0] == second:
        prefix = recent[0][1]
    elif recent[1][0] == second:
        prefix = recent[1][1]
    else:
        t = time.gmtime(second)
        prefix = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                  f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
        _recent = ((second, prefix), recent[0])
    return prefix + _MILLIS[milli]
