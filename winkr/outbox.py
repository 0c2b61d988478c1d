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
"""
from __future__ import annotations

from collections.abc import Hashable

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule, wait_task_rescheduled

CoalesceKey = Hashable
"""What makes two frames "the same state": a newer one replaces an older one still queued."""


class _Slot:
    """A keyed frame's place in the queue; its text is replaced while it waits."""

    __slots__ = ("frame", "key")

    def __init__(self, frame: str, key: CoalesceKey) -> None:
        self.frame = frame
        self.key = key


class Outbox:
    """Memory per connection matters here (thousands of idle connections each hold one): the
    queue is a list (an empty deque allocates a 64-slot block, ~700 bytes), the coalescing index
    exists only while a keyed frame waits, and the writer waits as a parked task rather than on
    a ``trio.Event`` made for every wait (docs/performance.md, issue 10)."""

    __slots__ = ("_queue", "_keyed", "_chars", "_max_frames", "_max_chars", "_slow_seconds", "_closed",
                 "_writer", "_room", "close_request", "_writing_since", "_interrupt")

    def __init__(self, max_frames: int, max_bytes: int, slow_seconds: float) -> None:
        # Oldest first; the writer takes a prefix at once (``receive_batch``), so a list's cost
        # of deleting from the front is one move of what is left per batch.
        self._queue: list[str | _Slot] = []
        self._keyed: dict[CoalesceKey, _Slot] | None = None
        self._chars = 0
        self._max_frames = max_frames or 1_000_000  # 0 switches the frame rule off
        self._max_chars = max_bytes or 1 << 40
        self._slow_seconds = slow_seconds
        self._closed = False
        self._writer: Task | None = None  # the writer, while it waits for frames or the close
        self._room: trio.Event | None = None  # the connection waits for room in ``put``
        self.close_request: str | None = None  # a reason another actor asked the connection to close with
        self._writing_since: float | None = None  # when the writer's current write began
        self._interrupt: trio.CancelScope | None = None  # the owner's scope a close request cancels

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
        self._wake_writer()
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
        self._wake_writer()

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
        self._wake_writer()
        if self._room is not None:
            self._room.set()

    # --- the writer ------------------------------------------------------------------------

    async def receive_batch(self, max_frames: int, max_chars: int) -> list[str]:
        """Wait for frames and take up to ``max_frames`` of them (and about ``max_chars``).
        Raises ``trio.EndOfChannel`` when closed and drained. Cancelling the wait loses nothing."""
        while not self._queue and not self._closed:
            if self._writer is not None:
                raise trio.BusyResourceError("another task is already waiting for this outbox")
            self._writer = current_task()
            await wait_task_rescheduled(self._abort_wait)
        await trio.lowlevel.checkpoint_if_cancelled()
        queue = self._queue
        if not queue:
            raise trio.EndOfChannel
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
        self._writing_since = trio.current_time()
        return batch

    def _abort_wait(self, _: RaiseCancelT) -> Abort:
        self._writer = None  # the wait was cancelled (a timer, the close): nothing was taken
        return Abort.SUCCEEDED

    def drained(self) -> None:
        """The writer finished a socket write: the client is reading."""
        self._writing_since = None
        if self._room is not None and not self._full():
            self._room.set()

    def _full(self) -> bool:
        return len(self._queue) >= self._max_frames or self._chars >= self._max_chars // 2

    def _wake_writer(self) -> None:
        writer = self._writer
        if writer is not None:
            self._writer = None
            reschedule(writer)

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_chars(self) -> int:
        """Characters of the frames waiting (what the byte bound counts)."""
        return self._chars
