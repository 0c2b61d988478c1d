"""The outbox (a connection's mailbox) on its own: the writer parks until a frame or the close
arrives, a cancelled wait loses nothing, batches keep order and their bounds, and coalescing
keys are indexed only while a keyed frame waits (memory per idle connection, issue 10)."""
from __future__ import annotations

import pytest
import trio

from winkr.outbox import Outbox, deferred_writes


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


class SocketDouble:
    """Stands in for the socket side of ``winkr.transport.DirectWriter``: records each write
    and takes at most ``room`` characters of it (``None``: everything); what it did not take
    waits in ``rest`` (the stream's ``unsent``), and it is not ready while a rest waits."""

    def __init__(self, room: int | None = None, is_ready: bool = True) -> None:
        self.writes: list[list[str]] = []
        self.room = room
        self.is_ready = is_ready
        self.rest = b""

    def ready(self) -> bool:
        return self.is_ready and not self.rest

    def has_rest(self) -> bool:
        return bool(self.rest)

    def write(self, frames: list[str]) -> bool:
        self.writes.append(frames)
        data = "".join(frames).encode()
        taken = len(data) if self.room is None else min(self.room, len(data))
        if self.room is not None:
            self.room -= taken
        self.rest = data[taken:]
        return not self.rest


def direct_outbox(socket: SocketDouble, max_frames: int = 64) -> tuple[Outbox, list[tuple[bytes, list[str]]]]:
    """An outbox that writes straight to ``socket``, and the list its writer's writes go to."""
    box = outbox()
    box.attach_direct(socket, max_frames, 1 << 20)
    return box, []


async def parked_writer(box: Outbox, nursery: trio.Nursery, got: list[tuple[bytes, list[str]]],
                        socket: SocketDouble) -> None:
    """A writer like the connection's: the rest of a direct write first, then its batch."""

    async def write() -> None:
        while True:
            try:
                batch = await box.receive_batch(64, 1 << 20)
            except trio.EndOfChannel:
                return
            rest, socket.rest = socket.rest, b""
            got.append((rest, batch))
            box.drained()

    nursery.start_soon(write)
    await trio.sleep(1)  # parked


async def test_frames_delivered_in_deferred_writes_leave_in_one_direct_write_at_its_end() -> None:
    socket = SocketDouble()
    box, got = direct_outbox(socket)
    async with trio.open_nursery() as nursery:
        await parked_writer(box, nursery, got, socket)
        with deferred_writes():
            box.deliver("ack")
            box.deliver("receipt")
            assert socket.writes == []  # not before the block ends
        assert socket.writes == [["ack", "receipt"]]
        await trio.sleep(1)
        box.close()
    assert got == []  # the writer never had to write


async def test_what_the_socket_does_not_take_goes_to_the_writer_before_later_frames() -> None:
    socket = SocketDouble(room=2)
    box, got = direct_outbox(socket)
    async with trio.open_nursery() as nursery:
        await parked_writer(box, nursery, got, socket)
        with deferred_writes():
            box.deliver("abcd")
        box.deliver("later")  # while the rest waits for the writer: queued behind it
        with deferred_writes():
            box.deliver("even later")  # no direct write while a rest is unsent
        await trio.sleep(1)
        box.close()
    assert socket.writes == [["abcd"]]
    assert got == [(b"cd", ["later", "even later"])]


async def test_no_direct_write_when_it_cannot_start_or_the_writer_is_busy() -> None:
    socket = SocketDouble(is_ready=False)  # e.g. the reader holds the stream for a pong
    box, got = direct_outbox(socket)
    async with trio.open_nursery() as nursery:
        await parked_writer(box, nursery, got, socket)
        with deferred_writes():
            box.deliver("one")
        await trio.sleep(1)
        socket.is_ready = True
        box.deliver("two")  # outside a block: the writer is woken, as always
        with deferred_writes():
            box.deliver("three")  # the writer was woken and has not run: it takes this too
        await trio.sleep(1)
        box.close()
    assert socket.writes == []
    assert got == [(b"", ["one"]), (b"", ["two", "three"])]


async def test_an_exception_in_the_block_still_writes_what_was_delivered() -> None:
    socket = SocketDouble()
    box, got = direct_outbox(socket)
    async with trio.open_nursery() as nursery:
        await parked_writer(box, nursery, got, socket)
        with pytest.raises(KeyError), deferred_writes():
            box.deliver("kept")
            raise KeyError("a bug in the middle of a fan-out")
        assert socket.writes == [["kept"]]
        box.close()


async def test_direct_writes_keep_the_writers_batch_bounds() -> None:
    socket = SocketDouble()
    box, got = direct_outbox(socket, max_frames=2)
    async with trio.open_nursery() as nursery:
        await parked_writer(box, nursery, got, socket)
        with deferred_writes():
            for frame in "abcde":
                box.deliver(frame)
        box.close()
    assert socket.writes == [["a", "b"], ["c", "d"], ["e"]]
