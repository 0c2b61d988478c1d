#!/usr/bin/env python3
"""``winkr serve`` under tracemalloc, for scripts/bench/idle_memory.py: every SIGUSR1 writes a
snapshot (``snap-N.tracemalloc``) and the live objects counted by type (``types-N.json``) into
``$WINKR_TRACE_DIR``, then ``done-N``. Tracing starts at the first SIGUSR1 (before it the server
runs at full speed, so the set-up is not slowed down); only what is allocated after it is seen.

    WINKR_TRACE_DIR=/tmp/t python scripts/bench/traced_server.py serve --port 0 --db /tmp/t/w.db

A measuring instrument only: tracemalloc slows the server several times over.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

FRAMES = int(os.environ.get("WINKR_TRACE_FRAMES", "12"))
OUT = Path(os.environ.get("WINKR_TRACE_DIR", "."))
_taken = [0]


def _snapshot(signum: int, frame: FrameType | None) -> None:
    n = _taken[0] = _taken[0] + 1
    if not tracemalloc.is_tracing():
        tracemalloc.start(FRAMES)
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(str(OUT / f"snap-{n}.tracemalloc"))
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    (OUT / f"types-{n}.json").write_text(json.dumps(types))
    (OUT / f"done-{n}").write_text("")


def main() -> None:
    signal.signal(signal.SIGUSR1, _snapshot)
    from winkr.cli import main as winkr_main

    raise SystemExit(winkr_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
