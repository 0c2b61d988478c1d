"""Wall-clock time, injectable.

Durations and deadlines use trio time (so MockClock drives them in tests); wall-clock values
(event timestamps, JWT ``exp``) come from one ``WallClock`` callable handed to every actor.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable

import trio

WallClock = Callable[[], float]
"""Returns seconds since the Unix epoch."""


def system_wall_clock() -> float:
    return time.time()


def trio_wall_clock(epoch: float = 1_767_225_600.0) -> WallClock:
    """A wall clock that advances with trio's clock (MockClock in tests): ``epoch + now``."""
    return lambda: epoch + trio.current_time()


def iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``: ``2025-01-01T12:00:00.000Z``."""
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
