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

from collections import deque
from collections.abc import Hashable

import trio

CoalesceKey = Hashable
"""What makes two frames "the same state": a newer one replaces an older one still queued."""


class _Slot:
    """A keyed frame's place in the queue; its text is replaced while it waits."""

    __slots__ = ("frame", "key")

    def __init__(self, frame: str, key: CoalesceKey) -> None:
        self.frame = frame
        self.key = key


class Outbox:
    __slots__ = ("_queue", "_keyed", "_chars", "_max_frames", "_max_chars", "_slow_seconds", "_closed",
                 "_wakeup", "_room", "close_request", "_writing_since", "_interrupt")

    def __init__(self, max_frames: int, max_bytes: int, slow_seconds: float) -> None:
        self._queue: deque[str | _Slot] = deque()
        self._keyed: dict[CoalesceKey, _Slot] = {}
        self._chars = 0
        self._max_frames = max_frames or 1_000_000  # 0 switches the frame rule off
        self._max_chars = max_bytes or 1 << 40
        self._slow_seconds = slow_seconds
        self._closed = False
        self._wakeup: trio.Event | None = None  # the writer waits for frames or a close request
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
            slot = self._keyed.get(key)
            if slot is not None:
                self._chars += len(frame) - len(slot.frame)
                slot.frame = frame
                return True
            slot = self._keyed[key] = _Slot(frame, key)
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
        self._keyed.clear()
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
            self._wakeup = trio.Event()
            try:
                await self._wakeup.wait()
            finally:
                self._wakeup = None
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._queue:
            raise trio.EndOfChannel
        batch: list[str] = []
        chars = 0
        while self._queue and len(batch) < max_frames and chars < max_chars:
            entry = self._queue.popleft()
            if isinstance(entry, _Slot):
                del self._keyed[entry.key]
                entry = entry.frame
            batch.append(entry)
            chars += len(entry)
        self._chars -= chars
        self._writing_since = trio.current_time()
        return batch

    def drained(self) -> None:
        """The writer finished a socket write: the client is reading."""
        self._writing_since = None
        if self._room is not None and not self._full():
            self._room.set()

    def _full(self) -> bool:
        return len(self._queue) >= self._max_frames or self._chars >= self._max_chars // 2

    def _wake_writer(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def __len__(self) -> int:
        return len(self._queue)
