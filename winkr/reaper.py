"""The reaper actor: erases ``photo_ephemeral`` messages when their time comes.

The deadlines live in the database (``messages.expires_at``), so they survive a restart;
the reaper only sleeps until the earliest one. A room that sets a new deadline nudges it
(``nudge`` never blocks: one pending nudge is as good as many).
"""
from __future__ import annotations

import logging
import math
from functools import partial

import trio

from winkr.clock import WallClock
from winkr.room import GetRoom, SystemDeleted, send_to_room
from winkr.store.store import Store
from winkr.store.writer import StoreHandle

log = logging.getLogger("winkr.reaper")

# After a store failure (the database unreachable for a moment): look again this soon. The
# reaper runs unsupervised among the server's actors, so a failure it let through stopped the
# whole node (a cluster node's reaper polls every 30 s: any dropped database connection).
STORE_RETRY_SECONDS = 5.0


class ReaperHandle:
    def __init__(self, nudges: trio.MemorySendChannel[None]) -> None:
        self._nudges = nudges

    def nudge(self) -> None:
        try:
            self._nudges.send_nowait(None)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # a wake-up is already pending, or we are shutting down


def open_reaper_channel() -> tuple[ReaperHandle, trio.MemoryReceiveChannel[None]]:
    """Made before the rooms (which nudge) and the reaper (which asks the hub for rooms)."""
    send, receive = trio.open_memory_channel[None](1)
    return ReaperHandle(send), receive


async def run_reaper(store: StoreHandle, get_room: GetRoom, clock: WallClock,
                     receive: trio.MemoryReceiveChannel[None], *, poll: float = math.inf) -> None:
    """Sleep until the earliest ephemeral deadline (or a nudge); erase what is due. ``poll``
    (a cluster): look again at least this often, since a deadline another node set nudges only
    that node's reaper, and that node may die before it."""
    while True:
        try:
            next_expiry = await store.call(lambda s: s.next_expiry())
            now = clock()
            due = (await store.call(partial(Store.expire_due, now=now))
                   if next_expiry is not None and next_expiry <= now else None)
        except Exception as exc:  # noqa: BLE001 - the store failed (nothing was erased): try again soon
            log.warning("reaper: the store failed (%s); trying again in %.0f s", type(exc).__name__,
                        STORE_RETRY_SECONDS)
            wait = STORE_RETRY_SECONDS
        else:
            if due is not None:
                for conversation_id, message_id in due:
                    await send_to_room(get_room, conversation_id, SystemDeleted(message_id, now))
                continue
            wait = min(poll, math.inf if next_expiry is None else next_expiry - clock())
        with trio.move_on_after(wait):
            await receive.receive()
