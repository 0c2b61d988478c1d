"""Small pieces every actor uses: a one-shot reply and a frame factory."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, checkpoint, current_task, reschedule, wait_task_rescheduled

from winkr.clock import WallClock, iso
from winkr.errors import ProtocolError
from winkr.protocol.codec import encode, error_data, with_ref

if TYPE_CHECKING:
    from winkr.metrics import Metrics

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Reply(Generic[T]):
    """An answer set once by the actor that owns the request, awaited by the asker (one task
    at a time).

    The waiting task is parked and rescheduled directly (``wait_task_rescheduled``) rather
    than through a ``trio.Event``: one reply per store request and per actor question, and an
    event (an object, its set of waiters, a closure per wait) did nothing a single waiter
    needs (issue 10)."""

    __slots__ = ("_done", "_value", "_error", "_waiter")

    def __init__(self) -> None:
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None
        self._waiter: Task | None = None

    def set(self, value: T) -> None:
        self._value = value
        self._finish()

    def is_set(self) -> bool:
        return self._done

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._finish()

    def _finish(self) -> None:
        self._done = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            reschedule(waiter)

    async def wait(self) -> T:
        """The value, or the error the owner failed it with. Cancelling the wait does not
        cancel the request: the owner still completes it (and a later ``wait`` gets the
        answer). A checkpoint, like ``trio.Event.wait``, also when the answer is already
        there. ``trio.BusyResourceError`` if another task is waiting for it already."""
        if self._done:
            await checkpoint()
        else:
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is already waiting for this reply")
            self._waiter = current_task()
            await wait_task_rescheduled(self._abort_wait)
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set() ran before _done

    def _abort_wait(self, _: RaiseCancelT) -> Abort:
        self._waiter = None  # cancelled: the answer, when it comes, waits for a later wait()
        return Abort.SUCCEEDED


async def hand_over(inbox: trio.MemorySendChannel[T], message: T) -> None:
    """Put ``message`` in another actor's bounded inbox: at once when it has room — without a
    checkpoint, so the hand-off costs the sender no task step of its own (issue 10: an actor
    hop per message was a scheduler round trip) — else waiting for room like ``send``. Raises
    what ``send`` raises for a closed or broken channel."""
    try:
        inbox.send_nowait(message)
    except trio.WouldBlock:
        await inbox.send(message)


class _Inbox(Protocol[T_co]):
    def receive_nowait(self) -> T_co: ...


def drain(inbox: _Inbox[T], first: T, limit: int) -> list[T]:
    """``first`` and whatever else is already waiting in ``inbox``, up to ``limit`` items:
    how actors batch work without waiting for more."""
    batch = [first]
    while len(batch) < limit:
        try:
            batch.append(inbox.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return batch


class Frames:
    """Builds server frames with the shared wall clock; each frame encoded once."""

    def __init__(self, clock: WallClock, metrics: Metrics | None = None) -> None:
        self.clock = clock
        self.metrics = metrics

    def now(self) -> float:
        return self.clock()

    def event(self, event: str, data: dict[str, Any], ref: str | None = None) -> str:
        if self.metrics is not None:
            self.metrics.frame_out(event)
        return encode(event, data, iso(self.clock()), ref)

    def with_ref(self, frame: str, event: str, ref: str | None) -> str:
        """``frame``, an ``event`` frame made by :meth:`event` without a ref, as the reply to
        ``ref`` (its timestamp too): for a frame that goes both to the requester and to others."""
        if self.metrics is not None:
            self.metrics.frame_out(event)
        return with_ref(frame, ref)

    def error(self, exc: ProtocolError, request_event: str | None, ref: str | None) -> str:
        if self.metrics is not None:
            self.metrics.frame_out("error")
            self.metrics.errors.labels(exc.code).inc()
            if "limit" in exc.details:
                self.metrics.rate_limited.labels(str(exc.details["limit"])).inc()
        return encode("error", error_data(exc, request_event), iso(self.clock()), ref)
