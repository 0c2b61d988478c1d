"""A connection's outbox: a bounded queue of encoded frames with one reader.

It speaks the part of trio's memory-channel interface the connection uses (``send_nowait``,
``receive``, ``receive_nowait``, ``close``) with the same exceptions, but costs a deque and,
only while the writer waits, one ``trio.Event`` — a memory channel carries two endpoint
objects, a state object and two ordered dicts per connection, which at thousands of idle
connections is most of a kilobyte each.
"""
from __future__ import annotations

from collections import deque

import trio


class Outbox:
    __slots__ = ("_frames", "_limit", "_closed", "_wakeup")

    def __init__(self, limit: int) -> None:
        self._frames: deque[str] = deque()
        self._limit = limit
        self._closed = False
        self._wakeup: trio.Event | None = None

    def send_nowait(self, frame: str) -> None:
        """Queue a frame; ``trio.WouldBlock`` when full, ``trio.ClosedResourceError`` once
        closed."""
        if self._closed:
            raise trio.ClosedResourceError
        if len(self._frames) >= self._limit:
            raise trio.WouldBlock
        self._frames.append(frame)
        if self._wakeup is not None:
            self._wakeup.set()

    def close(self) -> None:
        """No more frames; the reader still gets what is queued, then ``EndOfChannel``."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()

    def receive_nowait(self) -> str:
        if self._frames:
            return self._frames.popleft()
        raise trio.EndOfChannel if self._closed else trio.WouldBlock

    async def receive(self) -> str:
        """The next frame (waits for one); ``trio.EndOfChannel`` when closed and drained.
        Cancelling the wait loses nothing."""
        while not self._frames and not self._closed:
            self._wakeup = trio.Event()
            try:
                await self._wakeup.wait()
            finally:
                self._wakeup = None
        await trio.lowlevel.checkpoint_if_cancelled()
        return self.receive_nowait()

    def __len__(self) -> int:
        return len(self._frames)
