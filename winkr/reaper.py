"""The reaper actor: erases ``photo_ephemeral`` messages when their time comes.

The deadlines live in the database (``messages.expires_at``), so they survive a restart;
the reaper only sleeps until the earliest one. A room that sets a new deadline nudges it
(``nudge`` never blocks: one pending nudge is as good as many).
"""
from __future__ import annotations

import math
from functools import partial

import trio

from winkr.clock import WallClock
from winkr.room import GetRoom, SystemDeleted, send_to_room
from winkr.store.store import Store
from winkr.store.writer import StoreHandle


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
        next_expiry = await store.call(lambda s: s.next_expiry())
        if next_expiry is not None and next_expiry <= clock():
            now = clock()
            for conversation_id, message_id in await store.call(partial(Store.expire_due, now=now)):
                await send_to_room(get_room, conversation_id, SystemDeleted(message_id, now))
            continue
        wait = min(poll, math.inf if next_expiry is None else next_expiry - clock())
        with trio.move_on_after(wait):
            await receive.receive()
