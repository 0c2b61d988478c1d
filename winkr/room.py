"""The room actor: one per active conversation.

Owns the conversation's joined connections and typing state, and is the one place a
conversation's events pass through: messages are committed in the order the room submits
them and fanned out in that same order, so every client sees ``seq`` ascending. Every frame
is encoded once for all recipients. The room never waits on a connection (``deliver`` never
blocks); it waits only on the store writer and the presence actor, which never wait on it.

The handlers of room events (``winkr.handlers``) run in this task, against the
``RoomContext`` interface that :class:`Room` implements.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from winkr.actor import Frames, drain
from winkr.clock import iso
from winkr.errors import CONVERSATION_FULL, INTERNAL_ERROR, NOT_FOUND, ProtocolError
from winkr.handlers.closing import announce_closed
from winkr.handlers.context import RoomCall
from winkr.handlers.messages import announce_deleted
from winkr.logs import ThrottledLog
from winkr.peer import Peer
from winkr.presence import PresenceHandle
from winkr.ratelimit import Rate
from winkr.records import authorize
from winkr.store.writer import StoreHandle
from winkr.webhooks import WEBHOOKS_OFF, WebhookHandle

log = logging.getLogger("winkr.room")
_failures = ThrottledLog(log)

MAX_BATCH = 64  # requests taken from the inbox at once (a run of sends is one group commit)
UNKNOWN_ROOM_SECONDS = 1.0  # how long a room for a conversation that does not exist stays awake


@attrs.frozen
class Depart:
    """A closing connection leaves silently."""

    peer: Peer


@attrs.frozen
class SystemDeleted:
    """The reaper erased an ephemeral message."""

    message_id: str
    deleted_at: float


@attrs.frozen
class Closed:
    """A block closed the conversation in the store (contract §12): the room forgets its
    members and typing, refuses everything from now on, and tells the participants."""

    closed_at: float


RoomMessage = RoomCall | Depart | SystemDeleted | Closed
"""What a room's inbox carries."""


class RoomRetired(Exception):
    """The room went to sleep; ask the hub for the current one."""


class RoomHandle:
    def __init__(self, conversation_id: str, inbox: trio.MemorySendChannel[RoomMessage]) -> None:
        self.conversation_id = conversation_id
        self._inbox = inbox

    async def send(self, message: RoomMessage) -> None:
        """Queue a message (waits for room in the inbox); ``RoomRetired`` if this room has gone
        to sleep."""
        try:
            await self._inbox.send(message)
        except trio.ClosedResourceError:
            raise RoomRetired(self.conversation_id) from None

    def close(self) -> None:
        self._inbox.close()


GetRoom = Callable[[str], Awaitable[RoomHandle]]


async def send_to_room(get_room: GetRoom, conversation_id: str, message: RoomMessage) -> None:
    """Hand ``message`` to the conversation's current room, retrying past a retirement."""
    while True:
        try:
            await (await get_room(conversation_id)).send(message)
            return
        except RoomRetired:
            continue


@attrs.frozen
class RoomServices:
    frames: Frames
    store: StoreHandle
    presence: PresenceHandle
    get_room: GetRoom  # the hub
    retire: Callable[[str, RoomHandle], Awaitable[None]]  # tell the hub this room is idle
    nudge_reaper: Callable[[], None]
    typing_timeout: float
    max_room_connections: int
    idle_timeout: float
    message_rates: tuple[Rate, ...] = ()
    webhooks: WebhookHandle = WEBHOOKS_OFF


class Room:
    """A room's state and the ``RoomContext`` its handlers use. Touched only by its task."""

    def __init__(self, conversation_id: str, services: RoomServices, handle: RoomHandle,
                 participants: tuple[str, ...] | None, closed: bool = False) -> None:
        self.id = conversation_id
        self.s = services
        self.handle = handle
        self.participants = participants
        self.closed = closed
        self._members: dict[str, Peer] = {}  # connection id -> Peer
        self._typing: dict[str, tuple[float, str]] = {}  # user -> (expiry deadline, username)
        self.idle_since = trio.current_time()
        self.retiring = False

    # --- RoomContext -----------------------------------------------------------------------

    @property
    def frames(self) -> Frames:
        return self.s.frames

    @property
    def store(self) -> StoreHandle:
        return self.s.store

    @property
    def presence(self) -> PresenceHandle:
        return self.s.presence

    @property
    def webhooks(self) -> WebhookHandle:
        return self.s.webhooks

    @property
    def participant_ids(self) -> tuple[str, ...]:
        return self.participants or ()

    def authorize(self, peer: Peer) -> tuple[str, ...]:
        if self.closed:
            raise ProtocolError(NOT_FOUND, "conversation not found (it was closed)", field="conversation_id")
        return authorize(self.participants, peer.user_id, peer.is_service)

    def mark_closed(self) -> tuple[str, ...]:
        self.closed = True
        self._members.clear()
        self._typing.clear()  # ends silently: the participants are told the conversation closed
        self.idle_since = trio.current_time() - self.s.idle_timeout + UNKNOWN_ROOM_SECONDS  # sleep soon
        return self.participants or ()

    def members(self) -> Iterable[Peer]:
        return self._members.values()

    def add_member(self, peer: Peer) -> None:
        limit = self.s.max_room_connections
        if peer.id not in self._members and limit and len(self._members) >= limit:
            raise ProtocolError(CONVERSATION_FULL, f"at most {limit} connections may join a conversation",
                                field="conversation_id")
        self._members[peer.id] = peer

    def remove_member(self, peer: Peer) -> None:
        self._members.pop(peer.id, None)
        if peer.user_id in self._typing:
            self._set_typing_state(peer.user_id, peer.username, False)
        if not self._members:
            self.idle_since = trio.current_time()

    def set_typing(self, peer: Peer, is_typing: bool) -> None:
        if is_typing:
            was_typing = peer.user_id in self._typing
            self._typing[peer.user_id] = (trio.current_time() + self.s.typing_timeout, peer.username)
            if not was_typing:
                self._broadcast_typing(peer.user_id, peer.username, True)
        elif peer.user_id in self._typing:
            self._set_typing_state(peer.user_id, peer.username, False)

    def broadcast(self, frame: str, *, skip: Peer | None = None, skip_user: str | None = None) -> None:
        for peer in self._members.values():
            if peer is not skip and peer.user_id != skip_user:
                peer.deliver(frame)

    def nudge_reaper(self) -> None:
        self.s.nudge_reaper()

    def message_limits(self) -> tuple[Rate, ...]:
        return self.s.message_rates

    # --- typing ----------------------------------------------------------------------------

    def _set_typing_state(self, user_id: str, username: str, is_typing: bool) -> None:
        self._typing.pop(user_id, None)
        self._broadcast_typing(user_id, username, is_typing)

    def _broadcast_typing(self, user_id: str, username: str, is_typing: bool) -> None:
        frame = self.s.frames.event("typing:indicator", {
            "conversation_id": self.id, "user_id": user_id, "username": username,
            "is_typing": is_typing, "timestamp": iso(self.s.frames.now())})
        self.broadcast(frame, skip_user=user_id)

    # --- the loop --------------------------------------------------------------------------

    @property
    def anyone_typing(self) -> bool:
        return bool(self._typing)

    def next_deadline(self) -> float:
        deadline = min((expiry for expiry, _ in self._typing.values()), default=math.inf)
        if not self._members and not self.retiring:
            deadline = min(deadline, self.idle_since + self.s.idle_timeout)
        return deadline

    async def on_timeout(self) -> None:
        now = trio.current_time()
        for user_id, (expiry, username) in list(self._typing.items()):
            if expiry <= now:
                self._set_typing_state(user_id, username, False)
        if not self._members and not self.retiring and now >= self.idle_since + self.s.idle_timeout:
            self.retiring = True
            await self.s.retire(self.id, self.handle)

    async def handle_batch(self, batch: list[RoomMessage]) -> None:
        """Handle messages in order; consecutive calls of a batched route go together."""
        i = 0
        while i < len(batch):
            if self.retiring:  # a message that raced the retirement goes to the new room
                for message in batch[i:]:
                    await send_to_room(self.s.get_room, self.id, message)
                return
            first = batch[i]
            j = i + 1
            if isinstance(first, RoomCall) and first.route.in_room_batch is not None:
                while j < len(batch) and isinstance(nxt := batch[j], RoomCall) and nxt.route is first.route:
                    j += 1
            await self._handle(batch[i:j])
            i = j

    async def _handle(self, run: list[RoomMessage]) -> None:
        first = run[0]
        try:
            match first:
                case RoomCall(route=route) if route.in_room_batch is not None:
                    await route.in_room_batch(self, [c for c in run if isinstance(c, RoomCall)])
                case RoomCall(route=route) if route.in_room is not None:
                    await route.in_room(self, first)
                case Depart(peer=peer):
                    self.remove_member(peer)
                case SystemDeleted(message_id=message_id, deleted_at=deleted_at):
                    announce_deleted(self, message_id, "system", deleted_at, None, None)
                case Closed(closed_at=closed_at):
                    # Sent once per close that a block made (the room may have woken up closed).
                    await announce_closed(self, closed_at, None, None)
        except ProtocolError as exc:
            if isinstance(first, RoomCall):
                if first.outcome is not None and not first.outcome.is_set():
                    first.outcome.fail(exc)
                first.peer.deliver(self.s.frames.error(exc, first.route.event, first.ref))
        except Exception as exc:  # the room's exception barrier: a bug answers, it does not kill
            _failures.exception(exc, "room %s failed on %s", self.id, type(first).__name__)
            for message in run:
                if isinstance(message, RoomCall):
                    if message.outcome is not None and not message.outcome.is_set():
                        message.outcome.fail(ProtocolError(INTERNAL_ERROR, "internal error"))
                    message.peer.deliver(self.s.frames.error(ProtocolError(INTERNAL_ERROR, "internal error"),
                                                             message.route.event, message.ref))


async def run_room(conversation_id: str, services: RoomServices, handle: RoomHandle,
                   inbox: trio.MemoryReceiveChannel[RoomMessage]) -> None:
    """Serve one conversation until the hub closes its inbox (after it went idle)."""
    participants, closed_at = await services.store.call(
        lambda store: (store.participants(conversation_id), store.closed_at(conversation_id)))
    room = Room(conversation_id, services, handle, participants, closed_at is not None)
    if participants is None or closed_at is not None:  # unknown or closed: answer what waits, sleep soon
        room.idle_since = trio.current_time() - services.idle_timeout + UNKNOWN_ROOM_SECONDS
    async with inbox:
        while True:
            first = None
            with trio.move_on_at(room.next_deadline()):
                try:
                    first = await inbox.receive()
                except trio.EndOfChannel:
                    return
            if first is None:
                await room.on_timeout()
                continue
            await room.handle_batch(drain(inbox, first, MAX_BATCH))
            if room.anyone_typing:
                await room.on_timeout()
