#!/usr/bin/env python3
"""``winkr serve`` with a trio instrument that counts task steps by task (for
scripts/bench/run.py --profile): every SIGUSR1 writes the counts so far to
``$WINKR_COUNT_DIR/steps-N.json`` ({task name: steps}), then ``done-N``.

    WINKR_COUNT_DIR=/tmp/c python scripts/bench/counted_server.py serve --port 0 --db /tmp/c/w.db

A task step is one resumption of a task by trio's scheduler: a task switch. A measuring
instrument only (one Python call per step).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import trio

OUT = Path(os.environ.get("WINKR_COUNT_DIR", "."))


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


COUNTER = StepCounter()
_written = [0]


def _dump(signum: int, frame: FrameType | None) -> None:
    n = _written[0] = _written[0] + 1
    (OUT / f"steps-{n}.json").write_text(json.dumps(COUNTER.steps))
    (OUT / f"done-{n}").write_text("")


def main() -> None:
    original = trio.run

    def counted_run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), COUNTER]
        return original(*args, **kwargs)

    trio.run = counted_run  # the CLI calls trio.run once, for the server
    signal.signal(signal.SIGUSR1, _dump)
    from winkr.cli import main as winkr_main

    raise SystemExit(winkr_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
