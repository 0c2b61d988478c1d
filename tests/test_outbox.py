"""The outbox (a connection's mailbox) on its own: the writer parks until a frame or the close
arrives, a cancelled wait loses nothing, batches keep order and their bounds, and coalescing
keys are indexed only while a keyed frame waits (memory per idle connection, issue 10)."""
from __future__ import annotations

import pytest
import trio

from winkr.outbox import Outbox


def outbox() -> Outbox:
    return Outbox(max_frames=256, max_bytes=4 * 1024 * 1024, slow_seconds=10)


async def test_the_writer_waits_until_a_frame_is_delivered() -> None:
    box = outbox()
    got: list[list[str]] = []

    async def writer() -> None:
        got.append(await box.receive_batch(64, 1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.sleep(1)
        assert got == []
        assert box.deliver("a")
        box.deliver("b")  # before the writer ran: the same batch
    assert got == [["a", "b"]]


async def test_a_cancelled_wait_loses_nothing_and_the_next_wait_works() -> None:
    box = outbox()
    with trio.move_on_after(1):
        await box.receive_batch(64, 1 << 20)
    box.deliver("after")
    assert await box.receive_batch(64, 1 << 20) == ["after"]


async def test_a_woken_writer_that_is_cancelled_takes_nothing() -> None:
    box = outbox()
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def writer() -> None:
            with scope:
                await box.receive_batch(64, 1 << 20)
                raise AssertionError("cancelled before it could take the batch")

        nursery.start_soon(writer)
        await trio.sleep(1)
        box.deliver("kept")  # wakes the writer ...
        scope.cancel()  # ... which is cancelled before it runs
    assert await box.receive_batch(64, 1 << 20) == ["kept"]


async def test_close_wakes_the_writer_after_what_is_queued() -> None:
    box = outbox()
    seen: list[object] = []

    async def writer() -> None:
        while True:
            try:
                seen.append(await box.receive_batch(64, 1 << 20))
            except trio.EndOfChannel:
                seen.append("end")
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.sleep(1)
        box.deliver("last")
        box.close()
    assert seen == [["last"], "end"]
    assert not box.deliver("too late")


async def test_batches_keep_order_and_their_bounds() -> None:
    box = outbox()
    for n in range(10):
        box.deliver(f"f{n}")
    assert await box.receive_batch(4, 1 << 20) == ["f0", "f1", "f2", "f3"]
    assert await box.receive_batch(64, 3) == ["f4", "f5"]  # stops once 3 characters are taken
    assert await box.receive_batch(64, 1 << 20) == ["f6", "f7", "f8", "f9"]
    assert len(box) == 0 and box.queued_chars == 0


async def test_a_keyed_frame_is_replaced_while_it_waits_and_forgotten_once_sent() -> None:
    box = outbox()
    box.deliver("online", key=("presence", "bob"))
    box.deliver("plain")
    box.deliver("offline", key=("presence", "bob"))  # replaces the waiting one, keeps its place
    assert await box.receive_batch(64, 1 << 20) == ["offline", "plain"]
    assert box._keyed is None  # nothing keyed waits: no index held
    box.deliver("online again", key=("presence", "bob"))  # a new state after the old was sent
    assert await box.receive_batch(64, 1 << 20) == ["online again"]


async def test_only_one_writer_may_wait() -> None:
    box = outbox()

    async def first() -> None:
        with pytest.raises(trio.EndOfChannel):
            await box.receive_batch(64, 1 << 20)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.sleep(1)
        with pytest.raises(trio.BusyResourceError):
            await box.receive_batch(64, 1 << 20)
        box.close()
