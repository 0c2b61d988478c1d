"""The store writer actor: the only owner of the writer's database connection (either engine).

Requests wait in a bounded inbox. The writer takes everything waiting (up to
``max_batch``), runs it in ONE transaction on a worker thread, each request inside its own
savepoint when there are several, commits once, and only then answers each request (group
commit). A request's answer therefore always means "durable".

In production (``run_sync`` is ``trio.to_thread.run_sync``) the writer is a thread of its own
(:class:`_WriterThread`) that takes requests straight from a thread-safe queue: it keeps
taking work while there is some (every request waiting when a transaction ends goes into the
next one, whichever actor sent it) and answers each batch with one call into the trio thread.
That saves, per batch, trio's thread hop (a worker from its cache and back, ~55 µs) and the
writer task's wake-up per request (docs/performance.md, issue 10, proposal 3). With any other
``run_sync`` (``run_inline`` under MockClock) a trio task does the same one batch at a time.

On PostgreSQL other nodes write too: a batch that deadlocks with another node's (row locks
taken in a different order) is rolled back and run again, up to ``TRANSIENT_RETRIES`` times,
so a request's work must not act outside the database (it may run more than once).

To keep such deadlocks rare, a batch runs its requests in conversation order: a request made
as ``partial(..., conversation_id=C)`` (every room's send, read, delete) sorts by ``C``, the
others first, each group in arrival order (a stable sort, so one actor's requests keep
theirs). Two nodes' batches then take their conversation row locks in the same order. Without
it, two nodes whose batches held sends into the same conversations in different orders
deadlocked on nearly every commit, and each deadlock cost PostgreSQL's ``deadlock_timeout``
(1 s) before the retry.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio
import trio.lowlevel

from winkr.actor import Reply, drain
from winkr.errors import INTERNAL_ERROR, ProtocolError
from winkr.store.store import Store

if TYPE_CHECKING:
    from winkr.metrics import Metrics

log = logging.getLogger("winkr.store")

T = TypeVar("T")
TRANSIENT_RETRIES = 3
RunSync = Callable[..., Awaitable[Any]]
"""How blocking work runs: ``trio.to_thread.run_sync`` in production, inline under MockClock."""


async def run_inline(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on the trio thread (tests with MockClock: autojump must not see a thread)."""
    return fn(*args)


@attrs.frozen
class _Request:
    work: Callable[[Store], Any]
    pending: Reply[Any] | None  # None: a background write nobody waits for


Results = list[tuple[Any, BaseException | None]]


class StoreHandle:
    """What other actors hold: submit work, await its durable answer."""

    def __init__(self, submit: Callable[[_Request], Awaitable[None]]) -> None:
        self._submit = submit  # waits for room in the writer's inbox, then queues the request

    async def call(self, work: Callable[[Store], T]) -> T:
        """Run ``work`` in the writer's next transaction and return its result once committed;
        raises what ``work`` raised (what it wrote rolled back) or ``INTERNAL_ERROR`` if the
        commit failed. Cancelling the wait does not cancel the work: it still commits."""
        pending: Reply[T] = Reply()
        await self._submit(_Request(work, pending))
        return await pending.wait()

    async def fire(self, work: Callable[[Store], object]) -> None:
        """Queue a background write nobody waits for (its failure is logged); waits only for
        room in the inbox."""
        await self._submit(_Request(work, None))


def _lock_order(request: _Request) -> str:
    """The conversation a request works on, when it names one (see the module's docstring)."""
    keywords = getattr(request.work, "keywords", None)
    conversation = keywords.get("conversation_id") if isinstance(keywords, dict) else None
    return conversation if isinstance(conversation, str) else ""


def _run_batch(store: Store, batch: list[_Request]) -> Results:
    """One transaction (run again after a transient failure), one savepoint per request when
    there are several. Runs on the writer's thread."""
    for attempt in range(TRANSIENT_RETRIES + 1):
        try:
            return _run_batch_once(store, batch)
        except Exception as exc:
            if attempt == TRANSIENT_RETRIES or not store.db.is_transient(exc):
                raise
            log.warning("store batch of %d rolled back (%s); running it again", len(batch), type(exc).__name__)
    raise AssertionError("unreachable")


def _run_batch_once(store: Store, batch: list[_Request]) -> Results:
    db = store.db
    alone = len(batch) == 1  # the quiet conversation's usual batch
    results: Results = []
    db.begin()
    try:
        for request in batch:
            # A batch of one needs no savepoint: its request's failure rolls back the whole
            # transaction, which holds nothing else (two statements fewer per quiet message).
            if not alone:
                db.execute("SAVEPOINT request")
            try:
                value = request.work(store)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not fail the batch
                if db.is_transient(exc):
                    raise  # another node holds what we need: the whole batch goes again
                if alone:
                    # A statement, as ROLLBACK TO is in a shared batch: on a connection that
                    # broke under the request it fails too, and the batch's failure (a storage
                    # failure, the connection made again) answers the request, not the driver's
                    # error. (``db.rollback()`` passes over a broken connection.)
                    db.execute("ROLLBACK")
                    return [(None, exc)]
                db.execute("ROLLBACK TO request")
                db.execute("RELEASE request")
                results.append((None, exc))
            else:
                if not alone:
                    db.execute("RELEASE request")
                results.append((value, None))
        db.commit()
    except BaseException:
        if db.in_transaction:
            db.rollback()
        store.forget_caches()
        raise
    return results


async def run_store_writer(store: Store, run_sync: RunSync, *, inbox_size: int = 4096,
                           max_batch: int = 512, metrics: Metrics | None = None,
                           task_status: trio.TaskStatus[StoreHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve requests until cancelled (the transaction under way, and with the writer thread
    whatever was already queued, still commits and is answered first)."""
    if run_sync is trio.to_thread.run_sync:
        await _run_writer_thread(store, inbox_size, max_batch, metrics, task_status)
        return
    send, receive = trio.open_memory_channel[_Request](inbox_size)
    task_status.started(StoreHandle(send.send))
    async with receive:
        async for first in receive:
            batch = drain(receive, first, max_batch)
            batch.sort(key=_lock_order)
            started = trio.current_time()
            await _commit_and_answer(store, run_sync, batch)
            if metrics is not None:
                metrics.commit_seconds.observe(trio.current_time() - started)
                metrics.commit_batch.observe(len(batch))


async def _commit_and_answer(store: Store, run_sync: RunSync, batch: list[_Request]) -> None:
    try:
        # Shielded: a transaction once started finishes, so every answer tells the truth.
        with trio.CancelScope(shield=True):
            results = await run_sync(_run_batch, store, batch)
    except Exception as exc:  # noqa: BLE001 - the database failed: every request learns it
        results = _failed(batch, exc)
    _answer(batch, results)


def _failed(batch: list[_Request], exc: BaseException) -> Results:
    """Every request of a batch whose transaction failed learns it (logged once)."""
    log.error("store batch of %d failed", len(batch), exc_info=exc)
    failure = ProtocolError(INTERNAL_ERROR, "storage failure")
    failure.__cause__ = exc
    return [(None, failure)] * len(batch)


def _answer(batch: list[_Request], results: Results) -> None:
    for request, (value, error) in zip(batch, results):
        if request.pending is not None:
            if error is None:
                request.pending.set(value)
            else:
                request.pending.fail(error)
        elif error is not None and not isinstance(error, ProtocolError):
            log.error("background store request failed: %r", error)


_STOP = object()  # tells the writer thread to end once it has run what was queued before


class _WriterThread:
    """The writer's own thread: requests in through a thread-safe queue, each batch's answers
    back in one ``run_sync_soon`` call. The inbox bound is kept on the trio side: a request
    counts from its submission until its answer, and a full inbox makes ``submit`` wait."""

    def __init__(self, store: Store, inbox_size: int, max_batch: int, metrics: Metrics | None) -> None:
        self._store = store
        self._max_batch = max_batch
        self._metrics = metrics
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._room = trio.lowlevel.ParkingLot()
        self._capacity = inbox_size
        self._outstanding = 0  # submitted and not yet answered; the trio thread's alone
        self._thread = threading.Thread(target=self._serve, name="winkr-store-writer", daemon=True)

    async def submit(self, request: _Request) -> None:
        while self._outstanding >= self._capacity:
            await self._room.park()
        self._outstanding += 1
        self._queue.put(request)

    def _serve(self) -> None:
        """The thread: one transaction per turn for everything waiting (up to ``max_batch``)."""
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            # empty() rather than get_nowait()'s queue.Empty: this thread is the only one taking,
            # and the quiet conversation's batch of one raised and caught an exception per commit.
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            requests: list[_Request] = batch  # type: ignore[assignment]  # only _STOP is not a _Request
            if len(requests) > 1:
                requests.sort(key=_lock_order)
            started = time.perf_counter()
            try:
                results = _run_batch(self._store, requests)
            except Exception as exc:  # noqa: BLE001 - the database failed: every request learns it
                results = _failed(requests, exc)
            self._token.run_sync_soon(self._answered, requests, results, time.perf_counter() - started)
            if stop:
                return

    def _answered(self, batch: list[_Request], results: Results, seconds: float) -> None:
        """On the trio thread (must not raise: it runs in trio's run loop)."""
        self._outstanding -= len(batch)
        if self._room:  # someone waits for room (rare): unpark on an empty lot costs ~5 k instructions
            self._room.unpark(count=len(batch))
        _answer(batch, results)
        if self._metrics is not None:
            self._metrics.commit_seconds.observe(seconds)
            self._metrics.commit_batch.observe(len(batch))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)

    def join(self) -> None:
        self._thread.join()


async def _run_writer_thread(store: Store, inbox_size: int, max_batch: int, metrics: Metrics | None,
                             task_status: trio.TaskStatus[StoreHandle]) -> None:
    writer = _WriterThread(store, inbox_size, max_batch, metrics)
    writer.start()
    try:
        task_status.started(StoreHandle(writer.submit))
        await trio.sleep_forever()
    finally:
        writer.stop()
        # Shielded: the store's connection is closed after this returns, so the thread must
        # have finished its transaction (and answered it) first.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(writer.join)
            await trio.lowlevel.checkpoint()  # let the last answers' run_sync_soon run


async def store_problem(store: StoreHandle, within: float = 2.0) -> str | None:
    """None when the writer commits an empty request within ``within`` seconds (its transaction: it
    reaches the database), else why not (for readiness checks)."""
    with trio.move_on_after(within):
        try:
            await store.call(lambda _: None)
        except Exception:  # noqa: BLE001 - the database failed: not ready
            return "the store does not accept writes"
        return None
    return "the store does not accept writes"
