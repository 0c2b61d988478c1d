"""Small pieces every actor uses: a one-shot reply and a frame factory."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import trio

from winkr.clock import WallClock, iso
from winkr.errors import ProtocolError
from winkr.protocol.codec import encode, error_data, with_ref

if TYPE_CHECKING:
    from winkr.metrics import Metrics

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Reply(Generic[T]):
    """An answer set once by the actor that owns the request, awaited by the asker."""

    __slots__ = ("_done", "_value", "_error")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def set(self, value: T) -> None:
        self._value = value
        self._done.set()

    def is_set(self) -> bool:
        return self._done.is_set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> T:
        """The value, or the error the owner failed it with. Cancelling the wait does not
        cancel the request: the owner still completes it."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set() ran before _done


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
