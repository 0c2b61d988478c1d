"""The dispatcher actor: where events from other nodes enter this one.

The broker hands every incoming item to ``NodeInbox.offer`` (never waits; the inbox is
bounded). The dispatcher routes ``c:`` events to the conversation's awake room (a sleeping room
needs nothing: it reads its position when it wakes), ``u:`` events to presence, ``all`` events
to the revocations actor, and ``Resync`` to the rooms as a ``CatchUp``. An inbox that
overflowed drops what did not fit and resyncs everything from the first drop instead of growing.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import trio

from winkr.broker import events as bus
from winkr.broker.base import ALL, RESYNC_MARGIN_SECONDS, BusEvent, Incoming, Resync
from winkr.hub import HubHandle
from winkr.presence import PresenceHandle
from winkr.revocations import RevocationsHandle
from winkr.room import CatchUp, FromBus, Position, RoomHandle, RoomMessage, RoomRetired
from winkr.store.readers import ReaderHandle
from winkr.store.store import Store

log = logging.getLogger("winkr.dispatcher")

INBOX_SIZE = 8192
POSITION_BATCH = 100  # conversations whose last seq one read compares


class NodeInbox:
    """The bounded queue between the broker and the dispatcher. ``clock``: wall-clock seconds."""

    def __init__(self, size: int = INBOX_SIZE, clock: Callable[[], float] = time.time) -> None:
        self._send, self.receive = trio.open_memory_channel[Incoming](size)
        self._clock = clock
        self._lost_since: float | None = None
        self.dropped = 0

    def offer(self, item: Incoming) -> None:
        """The broker's ``Sink``: queue ``item`` or, when full, drop it and remember to resync."""
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            if self._lost_since is None:
                self._lost_since = self._clock()
            self.dropped += 1
        except trio.ClosedResourceError:
            pass  # the node is stopping

    def take_overflow(self) -> Resync | None:
        """The ``Resync`` that what was dropped since the last call calls for (None: nothing was)."""
        if self._lost_since is None:
            return None
        since, self._lost_since = self._lost_since - RESYNC_MARGIN_SECONDS, None
        return Resync(ALL, since)


async def run_dispatcher(inbox: NodeInbox, hub: HubHandle, presence: PresenceHandle,
                         revocations: RevocationsHandle, *,
                         on_resync: Callable[[int], None] = lambda rooms: None) -> None:
    """Route incoming items until cancelled. ``on_resync(rooms)`` counts the rooms sent to catch
    up (``winkr_broker_resyncs_total``). An overflow of the inbox is handled as the bus's own
    ``Resync(ALL)`` from the first drop: every room, and presence's unread counts."""
    async with inbox.receive:
        async for item in inbox.receive:
            if (overflow := inbox.take_overflow()) is not None:
                log.warning("the bus inbox overflowed: every room catches up from the store")
                await _route(overflow, hub, presence, revocations, on_resync)
            await _route(item, hub, presence, revocations, on_resync)


async def _route(item: Incoming, hub: HubHandle, presence: PresenceHandle, revocations: RevocationsHandle,
                 on_resync: Callable[[int], None]) -> None:
    match item:
        case Resync(topics=None, since=since):
            on_resync(await _to_rooms(await hub.awake(None), CatchUp()))
            if since is not None:
                await presence.resync(since)
        case Resync(topics=frozenset() as topics):
            for topic in topics:
                if topic.startswith("c:"):
                    on_resync(await _to_rooms(await hub.awake(topic[2:]), CatchUp()))
        case BusEvent(topic=topic) if topic.startswith("c:"):
            await _to_rooms(await hub.awake(topic[2:]), FromBus(item))
        case BusEvent(topic=topic) if topic.startswith("u:"):
            await presence.from_bus(item)
        case BusEvent(kind=bus.REVOKED, data=data):
            await revocations.revoked_elsewhere(str(data["user_id"]), float(data["at"]))


async def _to_rooms(rooms: list[RoomHandle], message: RoomMessage) -> int:
    """Hand ``message`` to each room still awake; returns how many took it."""
    taken = 0
    for room in rooms:
        try:
            await room.send(message)
            taken += 1
        except RoomRetired:
            pass  # asleep now: it reads its position when it wakes
    return taken


async def run_position_checks(hub: HubHandle, readers: ReaderHandle, interval: float) -> None:
    """Every ``interval`` seconds, read the store's ``last_seq`` of every awake room (one read
    per ``POSITION_BATCH`` rooms, on a reader: the writer is not involved) and tell each room;
    a room behind it fills the gap. The bus is a hint: a message it lost and no later one
    revealed arrives within ``interval``."""
    while True:
        await trio.sleep(interval)
        rooms = await hub.awake(None)
        for start in range(0, len(rooms), POSITION_BATCH):
            chunk = rooms[start:start + POSITION_BATCH]
            try:
                positions = await readers.call(partial(Store.last_seqs, conversation_ids=[r.conversation_id
                                                                                          for r in chunk]))
            except Exception as exc:  # noqa: BLE001 - the store failed: the next check reads again
                # Unsupervised among the server's actors: what it let through stopped the node.
                log.warning("position check failed (%s); the next one in %.0f s", type(exc).__name__, interval)
                break
            for room in chunk:
                if (last_seq := positions.get(room.conversation_id)) is not None:
                    await _to_rooms([room], Position(last_seq))
