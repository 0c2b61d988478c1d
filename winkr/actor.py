"""Small pieces every actor uses: a one-shot reply and a frame factory."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import trio
from trio.lowlevel import (
    Abort,
    ParkingLot,
    RaiseCancelT,
    Task,
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from winkr.clock import WallClock, iso
from winkr.errors import ProtocolError
from winkr.protocol.codec import encode, error_data, with_ref

if TYPE_CHECKING:
    from winkr.metrics import Metrics

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)


class OneWaiter:
    """The place for one parked task, for an object that wakes exactly one waiting task (a
    reply's asker, a room mailbox's receiver, an outbox's writer) instead of a ``trio.Event``
    or ``ParkingLot`` (an object, an ordered dict and an outcome per wait: issue 10). A
    subclass parks with ``self._take_place(...)`` then ``await
    wait_task_rescheduled(self._give_up)`` (a checkpoint: a cancelled wait gives the place up
    and takes nothing) and wakes the task with :meth:`_wake`."""

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: Task | None = None

    def _take_place(self, busy: str) -> None:
        """The current task is the one waiting; ``trio.BusyResourceError(busy)`` if one already is."""
        if self._waiter is not None:
            raise trio.BusyResourceError(busy)
        self._waiter = current_task()

    def _give_up(self, _: RaiseCancelT) -> Abort:
        self._waiter = None  # the wait was cancelled: nothing was taken
        return Abort.SUCCEEDED

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            reschedule(waiter)


class Reply(OneWaiter, Generic[T]):
    """An answer set once by the actor that owns the request, awaited by the asker (one task
    at a time).

    The waiting task is parked and rescheduled directly (``wait_task_rescheduled``) rather
    than through a ``trio.Event``: one reply per store request and per actor question, and an
    event (an object, its set of waiters, a closure per wait) did nothing a single waiter
    needs (issue 10)."""

    __slots__ = ("_done", "_value", "_error")

    def __init__(self) -> None:
        super().__init__()
        self._done = False
        self._value: T | None = None
        self._error: BaseException | None = None

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
        self._wake()

    async def wait(self) -> T:
        """The value, or the error the owner failed it with. Cancelling the wait does not
        cancel the request: the owner still completes it (and a later ``wait`` gets the
        answer). A checkpoint, like ``trio.Event.wait``, also when the answer is already
        there. ``trio.BusyResourceError`` if another task is waiting for it already."""
        if self._done:
            await checkpoint()
        else:
            self._take_place("another task is already waiting for this reply")
            await wait_task_rescheduled(self._give_up)  # a cancelled wait: a later wait() gets the answer
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set() ran before _done


class _Outlet(Protocol[T_contra]):
    def send_nowait(self, value: T_contra) -> None: ...

    async def send(self, value: T_contra) -> None: ...


async def hand_over(inbox: _Outlet[T], message: T) -> None:
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


class Mailbox(OneWaiter, Generic[T]):
    """A bounded inbox with any number of senders and one receiving task: what an actor that
    is woken per message (a room) waits on, instead of a trio memory channel pair. The same
    contract for that use — ``send_nowait`` (``trio.WouldBlock`` when full), ``send`` (waits
    for room), ``receive`` (a checkpoint; waits for an item), ``receive_nowait``, ``close`` (no
    more sends: ``ClosedResourceError`` to senders, ``EndOfChannel`` to the receiver once
    drained) and closing the receiving side (``async with``: ``BrokenResourceError`` to
    senders, what was queued dropped) — without what the quiet path paid for the general one
    (issue 10): an empty inbox raised and caught ``WouldBlock`` in the receiver's ``receive``
    and again in :meth:`drain` (~5 k instructions each), and a waiting receiver was found
    through an ordered dict and a set per wait, and woken with an outcome object. Senders
    waiting for room get it first come first served (``send_nowait`` refuses while any wait).
    It holds at least one item."""

    __slots__ = ("_items", "_size", "_senders", "_waiting", "_closed", "_receiving_closed")

    def __init__(self, size: int) -> None:
        super().__init__()  # the waiter: the receiver, parked in receive() on an empty inbox
        self._items: deque[T] = deque()
        self._size = max(1, size)
        self._senders = ParkingLot()  # waiting for room in send(), first come first served
        self._waiting = 0  # how many: while some wait, a new item queues behind them
        self._closed = False  # close(): no more sends
        self._receiving_closed = False  # the receiver is gone

    def __len__(self) -> int:
        return len(self._items)

    # --- the senders' side -------------------------------------------------------------------

    def send_nowait(self, value: T) -> None:
        if self._waiting and not (self._closed or self._receiving_closed):
            raise trio.WouldBlock  # senders wait for room: no overtaking them
        self._put(value)

    def _put(self, value: T) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        if self._receiving_closed:
            raise trio.BrokenResourceError
        if len(self._items) >= self._size:
            raise trio.WouldBlock
        self._items.append(value)
        self._wake()  # a receiver waiting on the empty inbox takes the item when it runs

    async def send(self, value: T) -> None:
        await checkpoint_if_cancelled()
        try:
            self.send_nowait(value)
        except trio.WouldBlock:
            pass
        else:
            await cancel_shielded_checkpoint()
            return
        while True:  # in line behind the senders already waiting; each taken item wakes one
            self._waiting += 1
            try:
                await self._senders.park()
            finally:
                self._waiting -= 1
            try:
                self._put(value)  # (the wait was the checkpoint)
                return
            except trio.WouldBlock:
                continue

    def close(self) -> None:
        """No more sends; the receiver gets what is queued, then ``EndOfChannel``."""
        self._closed = True
        self._wake()  # a waiting receiver finds the inbox empty and closed: EndOfChannel
        self._senders.unpark_all()  # they learn it: ClosedResourceError

    # --- the receiver's side -----------------------------------------------------------------

    def receive_nowait(self) -> T:
        if self._receiving_closed:
            raise trio.ClosedResourceError
        if self._items:
            value = self._items.popleft()
            if self._waiting:
                self._senders.unpark()
            return value
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> T:
        await checkpoint_if_cancelled()
        if not (self._items or self._closed or self._receiving_closed):
            self._take_place("another task is already receiving from this mailbox")
            await wait_task_rescheduled(self._give_up)  # woken by a send or the close
            return self.receive_nowait()  # the item (or EndOfChannel): the wait was the checkpoint
        value = self.receive_nowait()  # an item, or EndOfChannel / ClosedResourceError
        await cancel_shielded_checkpoint()
        return value

    def drain(self, first: T, limit: int) -> list[T]:
        """:func:`drain` without an exception to learn that the inbox is empty."""
        batch = [first]
        items = self._items
        while items and len(batch) < limit and not self._receiving_closed:
            batch.append(items.popleft())
        if self._waiting:
            self._senders.unpark(count=len(batch) - 1)
        return batch

    def close_receiving(self) -> None:
        """The receiver is gone: senders get ``BrokenResourceError``, queued items are dropped."""
        self._receiving_closed = True
        self._items.clear()
        self._senders.unpark_all()

    async def __aenter__(self) -> Mailbox[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close_receiving()
        await checkpoint()


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
