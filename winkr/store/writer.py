"""The store writer actor: the only owner of the SQLite connection.

Requests wait in a bounded inbox. The writer takes everything waiting (up to
``max_batch``), runs it in ONE transaction on a worker thread, each request inside its own
savepoint, commits once, and only then answers each request (group commit). A request's
answer therefore always means "durable".
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from winkr.actor import Reply, drain
from winkr.errors import INTERNAL_ERROR, ProtocolError
from winkr.store.store import Store

log = logging.getLogger("winkr.store")

T = TypeVar("T")
RunSync = Callable[..., Awaitable[Any]]
"""How blocking work runs: ``trio.to_thread.run_sync`` in production, inline under MockClock."""


async def run_inline(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on the trio thread (tests with MockClock: autojump must not see a thread)."""
    return fn(*args)


@attrs.frozen
class _Request:
    work: Callable[[Store], Any]
    pending: Reply[Any] | None
    on_done: Callable[[Any], None] | None  # runs on the trio thread after the commit


class StoreHandle:
    """What other actors hold: submit work, await its durable answer."""

    def __init__(self, inbox: trio.MemorySendChannel[_Request]) -> None:
        self._inbox = inbox

    async def submit(self, work: Callable[[Store], T]) -> Reply[T]:
        """Queue ``work``; waits only for room in the inbox."""
        pending: Reply[T] = Reply()
        await self._inbox.send(_Request(work, pending, None))
        return pending

    async def call(self, work: Callable[[Store], T]) -> T:
        """Queue ``work`` and wait for its committed result."""
        return await (await self.submit(work)).wait()

    async def fire(self, work: Callable[[Store], T], on_done: Callable[[T], None] | None = None) -> None:
        """Queue ``work`` whose result is handed to ``on_done`` (on the trio thread, after the
        commit) instead of to a waiting task."""
        await self._inbox.send(_Request(work, None, on_done))

    async def aclose(self) -> None:
        await self._inbox.aclose()


def _run_batch(store: Store, batch: list[_Request]) -> list[tuple[Any, BaseException | None]]:
    """One transaction, one savepoint per request. Runs on the writer's thread."""
    db = store.db
    results: list[tuple[Any, BaseException | None]] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for request in batch:
            db.execute("SAVEPOINT request")
            try:
                value = request.work(store)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not fail the batch
                db.execute("ROLLBACK TO request")
                db.execute("RELEASE request")
                results.append((None, exc))
            else:
                db.execute("RELEASE request")
                results.append((value, None))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        store.forget_caches()
        raise
    return results


async def run_store_writer(store: Store, run_sync: RunSync, *, inbox_size: int = 4096,
                           max_batch: int = 512, metrics: Any = None,
                           task_status: trio.TaskStatus[StoreHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve requests until the inbox is closed and drained (then returns) or cancelled."""
    send, receive = trio.open_memory_channel[_Request](inbox_size)
    task_status.started(StoreHandle(send))
    async with receive:
        async for first in receive:
            batch = drain(receive, first, max_batch)
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
        log.exception("store batch of %d failed", len(batch))
        failure = ProtocolError(INTERNAL_ERROR, "storage failure")
        failure.__cause__ = exc
        results = [(None, failure)] * len(batch)
    for request, (value, error) in zip(batch, results):
        if request.pending is not None:
            if error is None:
                request.pending.set(value)
            else:
                request.pending.fail(error)
        elif error is not None:
            if not isinstance(error, ProtocolError):
                log.error("background store request failed: %r", error)
        elif request.on_done is not None:
            try:
                request.on_done(value)
            except Exception:  # noqa: BLE001 - a callback bug must not stop the writer
                log.exception("store callback failed")


