"""A connection's outbox: its mailbox of encoded frames, with the flow-control policy.

Two kinds of producer write here:

- **other actors** (rooms, presence) call :meth:`Outbox.deliver`, which never blocks. A
  frame given a *key* replaces a frame with the same key that is still waiting (presence of a
  contact, a conversation's unread count, a read receipt, a typing state): only the latest
  state is queued, so no burst of state changes can fill a client's queue;
- **the connection itself** (replies to the client's own requests, the unread summary,
  history pages) awaits :meth:`Outbox.put`, which waits for room: a client that asks for more
  than it reads is slowed down (its requests stay in TCP buffers) instead of growing the
  server.

The client is **slow** — and the connection is asked to close with ``slow_consumer`` — only
when its socket has not drained for ``slow_seconds`` while more than ``max_frames`` frames
wait, or when the queued text passes ``max_bytes`` (counted in characters of the encoded
frames, which for JSON is within a small factor of bytes). The writer enforces the first rule
with its write timeout too (see ``winkr.connection``). Numbers and reasons:
docs/architecture.md, "Flow control".

**Writing without the writer.** Waking the connection's writer task costs three task steps
per write (its wake-up, the stream lock, the socket send's checkpoint): the largest cost left
per message once the rest of the send path was cut (docs/performance.md, issue 10, phase 3).
So an actor that delivers inside :func:`deferred_writes` leaves the writer asleep; when the
block ends, each outbox it touched writes what is queued straight to the socket
(:meth:`Outbox.attach_direct`) in one write — if its writer is parked (so nothing else is
writing) and the socket takes it now. Whatever the socket does not take (the rest of a partial
write) waits in the stream, and the writer is woken: the next write to the stream, the
writer's or any other (a pong, a ping, a close frame), sends it before anything else;
everything else works as before. Outside such a block (or without a direct writer: memory
streams), ``deliver`` wakes the writer at once, as it always did.
"""
from __future__ import annotations

from collections.abc import Hashable
from contextvars import ContextVar
from typing import Protocol

import trio
from trio.lowlevel import wait_task_rescheduled

from winkr.actor import OneWaiter

CoalesceKey = Hashable
"""What makes two frames "the same state": a newer one replaces an older one still queued."""


class DirectWrite(Protocol):
    """Writes frames to the connection's socket from the calling task (``winkr.transport``)."""

    def ready(self) -> bool:
        """Whether a write may start now (nothing else is writing, the connection is open)."""

    def write(self, frames: list[str]) -> bool:
        """Encode ``frames`` and write them now; False when the socket did not take them all
        (the rest waits in the stream for the writer's next write, which sends it first)."""

    def has_rest(self) -> bool:
        """Whether the rest of a direct write still waits in the stream."""

# The outboxes the current task delivered to inside ``deferred_writes`` (per task: trio runs
# every task in a context of its own).
_deferred: ContextVar[list[Outbox] | None] = ContextVar("winkr_deferred_writes", default=None)


class deferred_writes:  # noqa: N801 - used like a function: ``with deferred_writes():``
    """Within the block, frames delivered to outboxes with a direct writer are not handed to
    their writers; on leaving it (normally, by an exception or a cancellation: it never waits)
    each such outbox writes them itself, one write per outbox (:meth:`Outbox.flush`). For code
    that delivers a burst of frames without waiting in between: a frame waits until the block
    ends, so a block should not wait on anything slow. (A class, not ``@contextmanager``: it
    runs once per room step, and a generator-based one costs several times as much.)"""

    __slots__ = ("_pending", "_token")

    def __enter__(self) -> None:
        self._pending: list[Outbox] = []
        self._token = _deferred.set(self._pending)

    def __exit__(self, *exc_info: object) -> None:
        _deferred.reset(self._token)
        for outbox in self._pending:
            outbox.flush()


class _Slot:
    """A keyed frame's place in the queue; its text is replaced while it waits."""

    __slots__ = ("frame", "key")

    def __init__(self, frame: str, key: CoalesceKey) -> None:
        self.frame = frame
        self.key = key


class Outbox(OneWaiter):
    """Memory per connection matters here (thousands of idle connections each hold one): the
    queue is a list (an empty deque allocates a 64-slot block, ~700 bytes), the coalescing index
    exists only while a keyed frame waits, and the writer waits as a parked task rather than on
    a ``trio.Event`` made for every wait (docs/performance.md, issue 10)."""

    __slots__ = ("_queue", "_keyed", "_chars", "_max_frames", "_max_chars", "_slow_seconds", "_closed",
                 "_room", "close_request", "_writing_since", "_interrupt", "_direct",
                 "_batch_frames", "_batch_chars", "_flush_pending")

    def __init__(self, max_frames: int, max_bytes: int, slow_seconds: float) -> None:
        super().__init__()  # the waiter: the writer, while it waits for frames or the close
        # Oldest first; the writer takes a prefix at once (``receive_batch``), so a list's cost
        # of deleting from the front is one move of what is left per batch.
        self._queue: list[str | _Slot] = []
        self._keyed: dict[CoalesceKey, _Slot] | None = None
        self._chars = 0
        self._max_frames = max_frames or 1_000_000  # 0 switches the frame rule off
        self._max_chars = max_bytes or 1 << 40
        self._slow_seconds = slow_seconds
        self._closed = False
        self._room: trio.Event | None = None  # the connection waits for room in ``put``
        self.close_request: str | None = None  # a reason another actor asked the connection to close with
        self._writing_since: float | None = None  # when the writer's current write began
        self._interrupt: trio.CancelScope | None = None  # the owner's scope a close request cancels
        self._direct: DirectWrite | None = None  # writes to the socket now (attach_direct)
        self._batch_frames = self._batch_chars = 0  # the writer's batch bounds, for direct writes too
        self._flush_pending = False  # delivered to inside deferred_writes: flushed when it ends

    # --- producers -----------------------------------------------------------------------

    def deliver(self, frame: str, key: CoalesceKey | None = None) -> bool:
        """Queue a frame from another actor; never blocks. ``False`` when the connection is
        closing or gone (the frame is dropped: the data is in storage)."""
        if self._closed or self.close_request is not None:
            return False
        if key is not None:
            keyed = self._keyed
            if keyed is None:
                keyed = self._keyed = {}
            slot = keyed.get(key)
            if slot is not None:
                self._chars += len(frame) - len(slot.frame)
                slot.frame = frame
                return True
            slot = keyed[key] = _Slot(frame, key)
            self._queue.append(slot)
        else:
            self._queue.append(frame)
        self._chars += len(frame)
        if self._chars > self._max_chars or (
                len(self._queue) > self._max_frames and self._writing_since is not None
                and trio.current_time() - self._writing_since > self._slow_seconds):
            self.request_close("slow_consumer")
            return False
        if self._waiter is not None:  # else the writer is busy and takes the frame next
            pending = _deferred.get() if self._direct is not None else None
            if pending is None:
                self._wake()
            elif not self._flush_pending:
                self._flush_pending = True
                pending.append(self)
        return True

    async def put(self, frame: str) -> None:
        """Queue a frame of the connection's own (a reply); waits while the queue is full.
        Raises ``trio.ClosedResourceError`` once closed. Cancelling the wait queues nothing."""
        while self._full() and not self._closed:
            self._room = trio.Event()
            try:
                await self._room.wait()
            finally:
                self._room = None
        if self._closed:
            raise trio.ClosedResourceError
        await trio.lowlevel.checkpoint_if_cancelled()
        self._queue.append(frame)
        self._chars += len(frame)
        self._wake()

    def attach_direct(self, direct: DirectWrite, max_frames: int, max_chars: int) -> None:
        """Let :meth:`flush` write to the socket itself through ``direct``, in batches bounded
        as the writer's (``max_frames``, about ``max_chars``)."""
        self._direct = direct
        self._batch_frames, self._batch_chars = max_frames, max_chars

    def flush(self) -> None:
        """Write what is queued straight to the socket if the writer is parked (nothing else is
        writing) and a direct writer is attached and ready; whatever is left (the socket did
        not take it all, or a direct write could not start) goes to the writer. Never blocks."""
        self._flush_pending = False
        direct = self._direct
        while self._queue and self._waiter is not None:
            if direct is None or not direct.ready():  # not ready while a rest waits, too
                break
            frames = self._take(self._batch_frames, self._batch_chars)
            if not direct.write(frames):
                # The rest waits in the stream: the writer's next write sends it first, and
                # the write counts as begun now for the slow-consumer rule (a whole write
                # began and ended here: nothing to time, no clock read).
                self._writing_since = trio.current_time()
                break
            self.drained()
        if self._queue or self._rest_waits():
            self._wake()

    def request_close(self, reason: str) -> None:
        """Ask the connection to close with ``reason``; the first reason wins. The owner learns
        it at once: the scope it gave :meth:`interrupt_on_close` is cancelled."""
        if self.close_request is None:
            self.close_request = reason
        if self._interrupt is not None:
            self._interrupt.cancel()

    def interrupt_on_close(self, scope: trio.CancelScope) -> None:
        """The owner's scope to cancel when a close is requested (already requested: at once)."""
        self._interrupt = scope
        if self.close_request is not None:
            scope.cancel()

    def discard(self) -> None:
        """Drop every queued frame (a slow client's backlog: the data is in storage)."""
        self._queue.clear()
        self._keyed = None
        self._chars = 0

    def close(self) -> None:
        """No more frames; the writer still gets what is queued, then ``EndOfChannel``."""
        self._closed = True
        self._wake()
        if self._room is not None:
            self._room.set()

    # --- the writer ------------------------------------------------------------------------

    async def receive_batch(self, max_frames: int, max_chars: int) -> list[str]:
        """Wait for frames and take up to ``max_frames`` of them (and about ``max_chars``); the
        batch may be empty when only the rest of a direct write waits (write it all the same:
        the write sends the rest first). Raises ``trio.EndOfChannel`` when closed and drained.
        Cancelling the wait loses nothing."""
        while not self._queue and not self._rest_waits() and not self._closed:
            self._take_place("another task is already waiting for this outbox")
            await wait_task_rescheduled(self._give_up)  # a cancelled wait (a timer, the close) takes nothing
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._queue and not self._rest_waits():
            raise trio.EndOfChannel
        batch = self._take(max_frames, max_chars)
        self._writing_since = trio.current_time()
        return batch

    def _rest_waits(self) -> bool:
        return self._direct is not None and self._direct.has_rest()

    def _take(self, max_frames: int, max_chars: int) -> list[str]:
        """Take the oldest frames, up to ``max_frames`` (and about ``max_chars``)."""
        queue = self._queue
        batch: list[str] = []
        chars = 0
        taken = 0
        for entry in queue:
            if taken == max_frames or chars >= max_chars:
                break
            taken += 1
            if isinstance(entry, _Slot):
                assert self._keyed is not None  # a slot waits: it is indexed
                del self._keyed[entry.key]
                entry = entry.frame
            batch.append(entry)
            chars += len(entry)
        del queue[:taken]
        if self._keyed is not None and not self._keyed:
            self._keyed = None
        self._chars -= chars
        return batch

    def drained(self) -> None:
        """The writer finished a socket write: the client is reading."""
        self._writing_since = None
        if self._room is not None and not self._full():
            self._room.set()

    def _full(self) -> bool:
        return len(self._queue) >= self._max_frames or self._chars >= self._max_chars // 2


    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_chars(self) -> int:
        """Characters of the frames waiting (what the byte bound counts)."""
        return self._chars
