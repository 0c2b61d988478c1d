"""The cyclic GC once the server has started (issue 10, the realistic shape's tail): what
start-up left is collected, then everything alive is frozen out of every later collection.
Each test puts the interpreter's GC back as it found it."""
from __future__ import annotations

import gc
import signal
import weakref
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import SECRET, make_settings

from winkr.server import GC_YOUNGEST_THRESHOLD, serve_forever, settle_gc


class Node:
    def __init__(self) -> None:
        self.other: Any = None


@pytest.fixture
def interpreter_gc() -> Iterator[None]:
    assert gc.get_freeze_count() == 0  # nothing else in the test process freezes
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_start_up_garbage_is_collected_and_what_is_alive_is_frozen(interpreter_gc: None) -> None:
    kept = Node()
    garbage = Node()
    garbage.other = Node()
    garbage.other.other = garbage  # a cycle: only the cyclic GC frees it
    gone = weakref.ref(garbage)
    del garbage

    settle_gc()

    assert gone() is None  # collected before the freeze, not kept for the process's life
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen: no generation holds it
    later = Node()
    assert any(o is later for o in gc.get_objects())  # what comes after is collected as usual


def test_the_server_freezes_its_start_up_heap_before_its_listening_line(tmp_path: Path,
                                                                        interpreter_gc: None) -> None:
    frozen: list[int] = []
    young: list[int] = []

    def on_listening(ports: list[int]) -> None:
        frozen.append(gc.get_freeze_count())
        young.append(gc.get_threshold()[0])
        signal.raise_signal(signal.SIGINT)  # serve_forever's receiver takes it: a graceful stop

    trio.run(partial(serve_forever, make_settings(tmp_path), SECRET, on_listening=on_listening, listeners=[]),
             clock=trio.testing.MockClock(autojump_threshold=0))

    assert frozen and frozen[0] > 0
    assert young == [GC_YOUNGEST_THRESHOLD]
