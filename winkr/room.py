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
from functools import partial

import attrs
import trio

from winkr.actor import Frames, Mailbox, hand_over
from winkr.broker.base import Broker, BusEvent, conversation_topic
from winkr.broker.events import CLOSED, DELETED, MESSAGE, TYPING, message_from_json, message_json
from winkr.clock import iso
from winkr.errors import CONVERSATION_FULL, INTERNAL_ERROR, NOT_FOUND, ProtocolError
from winkr.handlers.catchup import delivered_frames
from winkr.handlers.closing import announce_closed
from winkr.handlers.context import RoomCall
from winkr.handlers.messages import announce_deleted
from winkr.logs import ThrottledLog
from winkr.peer import Peer
from winkr.presence import PresenceHandle
from winkr.protocol.wire import Json, message_object, sender_object
from winkr.ratelimit import Rate
from winkr.records import StoredMessage, authorize
from winkr.store.store import Store
from winkr.store.writer import StoreHandle
from winkr.webhooks import WEBHOOKS_OFF, WebhookHandle

log = logging.getLogger("winkr.room")
_failures = ThrottledLog(log)

MAX_BATCH = 64  # requests taken from the inbox at once (a run of sends is one group commit)
UNKNOWN_ROOM_SECONDS = 1.0  # how long a room for a conversation that does not exist stays awake
# A room whose load failed (the store failing for a moment) loads again this soon; what waits
# in its inbox waits with it. The load runs before the room's exception barrier, in the hub's
# nursery: a failure it let through stopped the whole server.
ROOM_LOAD_RETRY_SECONDS = 1.0
CATCH_UP_PAGE = 200  # messages read from the store per gap-filling query
UNSUBSCRIBE_SECONDS = 2.0  # a retiring room's unsubscribe does not outlive a broken bus by more


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


@attrs.frozen
class FromBus:
    """An event another node published on this conversation's topic."""

    event: BusEvent


@attrs.frozen
class CatchUp:
    """The bus may have lost events (a reconnect, an overflow): fill the gap from the store."""


@attrs.frozen
class Position:
    """The store's ``last_seq`` of the conversation (the node's periodic check): a room behind
    it lost a message on the bus that nothing after it revealed."""

    last_seq: int


RoomMessage = RoomCall | Depart | SystemDeleted | Closed | FromBus | CatchUp | Position
"""What a room's inbox carries."""


class RoomRetired(Exception):
    """The room went to sleep; ask the hub for the current one."""


class RoomHandle:
    def __init__(self, conversation_id: str, inbox: Mailbox[RoomMessage]) -> None:
        self.conversation_id = conversation_id
        self._inbox = inbox

    async def send(self, message: RoomMessage) -> None:
        """Queue a message (waits for room in the inbox); ``RoomRetired`` if this room has gone
        to sleep."""
        try:
            await hand_over(self._inbox, message)
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
    broker: Broker | None = None  # None: a node alone, as before the broker seam (tests of one room)


class Room:
    """A room's state and the ``RoomContext`` its handlers use. Touched only by its task."""

    def __init__(self, conversation_id: str, services: RoomServices, handle: RoomHandle,
                 participants: tuple[str, ...] | None, closed: bool = False, last_seq: int = 0) -> None:
        self.id = conversation_id
        self.s = services
        self.handle = handle
        self.participants = participants
        self.closed = closed
        # The newest seq this room has fanned out: every message reaches the joined connections
        # strictly as delivered_seq + 1 (its own sends, the bus, or the store filling a gap).
        self.delivered_seq = last_seq
        self._sharing = services.broker is not None and services.broker.shared
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
            self.share(TYPING, {"user_id": peer.user_id, "username": peer.username, "is_typing": False})
        if not self._members:
            self.idle_since = trio.current_time()

    def set_typing(self, peer: Peer, is_typing: bool) -> None:
        # Every node's room runs the same state machine on the same events (and expires typing
        # by its own timer), so the other nodes hear every start and stop, not only changes.
        self.share(TYPING, {"user_id": peer.user_id, "username": peer.username, "is_typing": is_typing})
        self._apply_typing(peer.user_id, peer.username, is_typing)

    def _apply_typing(self, user_id: str, username: str, is_typing: bool) -> None:
        if is_typing:
            was_typing = user_id in self._typing
            self._typing[user_id] = (trio.current_time() + self.s.typing_timeout, username)
            if not was_typing:
                self._broadcast_typing(user_id, username, True)
        elif user_id in self._typing:
            self._set_typing_state(user_id, username, False)

    def broadcast(self, frame: str, *, skip: Peer | None = None, skip_user: str | None = None) -> None:
        for peer in self._members.values():
            if peer is not skip and peer.user_id != skip_user:
                peer.deliver(frame)

    def nudge_reaper(self) -> None:
        self.s.nudge_reaper()

    def message_limits(self) -> tuple[Rate, ...]:
        return self.s.message_rates

    # --- other nodes (contract §16) ----------------------------------------------------------

    def share(self, kind: str, data: Json) -> None:
        """Publish an event of this room to the other nodes' rooms (never waits)."""
        if self._sharing:
            assert self.s.broker is not None
            self.s.broker.publish([BusEvent(conversation_topic(self.id), kind, data)])

    def share_messages(self, messages: list[tuple[StoredMessage, Json]]) -> None:
        """The messages this node committed, for the other nodes' rooms (in seq order)."""
        if self._sharing and messages:
            assert self.s.broker is not None
            topic = conversation_topic(self.id)
            self.s.broker.publish([BusEvent(topic, MESSAGE, {"m": message_json(m), "sender": sender})
                                   for m, sender in messages])

    def fanned_out(self, seq: int) -> None:
        """This room's own send at ``seq`` went out (``seq == delivered_seq + 1``)."""
        self.delivered_seq = max(self.delivered_seq, seq)

    async def deliver_committed(self, messages: list[tuple[StoredMessage, Json]]) -> None:
        """Fan out messages other nodes committed, skipping those already delivered; at a gap,
        fill from the store instead. The joined recipients' deliveries are recorded (the first
        node to record one sends the receipt)."""
        expected = self.delivered_seq + 1
        ordered = []
        for message, sender in messages:
            if message.seq < expected:
                continue  # already delivered (our own send, or fetched)
            if message.seq > expected:
                await self.catch_up()
                return
            ordered.append((message, sender))
            expected += 1
        await self._fan_out_others(ordered)

    async def catch_up(self) -> None:
        """Deliver everything committed after ``delivered_seq`` (read from the store)."""
        while True:
            rows = await self.s.store.call(partial(Store.messages_after, conversation_id=self.id,
                                                   after_seq=self.delivered_seq, limit=CATCH_UP_PAGE))
            await self._fan_out_others([(m, sender_object(m.sender_id, username or m.sender_id, avatar))
                                        for m, username, avatar in rows])
            if len(rows) < CATCH_UP_PAGE:
                return

    async def _fan_out_others(self, messages: list[tuple[StoredMessage, Json]]) -> None:
        if not messages:
            return
        for message, sender in messages:
            self.broadcast(self.s.frames.event("message:new", {"message": message_object(message),
                                                               "sender": sender}))
            self.delivered_seq = message.seq
        joined = {peer.user_id for peer in self._members.values()}
        if not joined:
            return
        now = self.s.frames.now()
        stored = [m for m, _ in messages]
        deliveries = await self.s.store.call(lambda store: [
            d for m in stored for d in store.record_delivered_to(m, sorted(joined - {m.sender_id}), now)])
        if deliveries:
            await self.s.presence.send_each(delivered_frames(self.s.frames, deliveries))

    async def from_bus(self, event: BusEvent) -> None:
        """Apply another node's deletion, typing or close (messages: ``deliver_committed``)."""
        data = event.data
        if event.kind == DELETED:
            announce_deleted(self, str(data["message_id"]), str(data["deleted_by"]), float(data["deleted_at"]),
                             None, None, share=False)
        elif event.kind == TYPING:
            self._apply_typing(str(data["user_id"]), str(data["username"]), bool(data["is_typing"]))
        elif event.kind == CLOSED:
            self.mark_closed()  # the participants' connections hear it through presence

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
        typing = self._typing  # (nobody typing, the usual case: no generator and min())
        deadline = min(expiry for expiry, _ in typing.values()) if typing else math.inf
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
        if len(batch) == 1 and not self.retiring:  # the quiet conversation's usual batch
            await self._handle(batch)
            return
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
            elif isinstance(first, FromBus) and first.event.kind == MESSAGE:
                while j < len(batch) and isinstance(nxt := batch[j], FromBus) and nxt.event.kind == MESSAGE:
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
                case FromBus(event=event) if event.kind == MESSAGE:
                    await self.deliver_committed([
                        (message_from_json(m.event.data["m"]), m.event.data["sender"])
                        for m in run if isinstance(m, FromBus)])
                case FromBus(event=event):
                    await self.from_bus(event)
                case CatchUp():
                    if not self.closed:
                        await self.catch_up()
                case Position(last_seq=last_seq) if last_seq > self.delivered_seq and not self.closed:
                    if self._members:
                        await self.catch_up()
                    else:
                        self.delivered_seq = last_seq  # nobody here to deliver to
                case Position():
                    pass
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
                   inbox: Mailbox[RoomMessage]) -> None:
    """Serve one conversation until the hub closes its inbox (after it went idle). Subscribed
    to the conversation's topic meanwhile: subscribed first, then the store's ``last_seq`` read,
    so every message committed elsewhere is either in that position or on the bus."""
    if services.broker is None:
        await _serve_room(conversation_id, services, handle, inbox)
        return
    topic = conversation_topic(conversation_id)
    await services.broker.subscribe([topic])
    try:
        await _serve_room(conversation_id, services, handle, inbox)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(UNSUBSCRIBE_SECONDS):
            await services.broker.unsubscribe([topic])


async def _serve_room(conversation_id: str, services: RoomServices, handle: RoomHandle,
                      inbox: Mailbox[RoomMessage]) -> None:
    while True:
        try:
            participants, closed_at, last_seq = await services.store.call(
                lambda store: (store.participants(conversation_id), store.closed_at(conversation_id),
                               store.last_seq(conversation_id)))
            break
        except Exception as exc:  # noqa: BLE001 - the store failed: load again soon (see ROOM_LOAD_RETRY_SECONDS)
            _failures.exception(exc, "room %s could not load its conversation; trying again", conversation_id)
            await trio.sleep(ROOM_LOAD_RETRY_SECONDS)
    room = Room(conversation_id, services, handle, participants, closed_at is not None, last_seq)
    if participants is None or closed_at is not None:  # unknown or closed: answer what waits, sleep soon
        room.idle_since = trio.current_time() - services.idle_timeout + UNKNOWN_ROOM_SECONDS
    async with inbox:
        while True:
            first = None
            deadline = room.next_deadline()
            try:
                if deadline == math.inf:  # members and nobody typing: no timer (a scope per wake-up saved)
                    first = await inbox.receive()
                else:
                    with trio.move_on_at(deadline):
                        first = await inbox.receive()
            except trio.EndOfChannel:
                return
            if first is None:
                await room.on_timeout()
                continue
            await room.handle_batch(inbox.drain(first, MAX_BATCH))
            if room.anyone_typing:
                await room.on_timeout()
