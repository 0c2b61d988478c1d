"""The room actor: one per active conversation.

Owns the conversation's joined connections and typing state, and is the one place a
conversation's events pass through: messages are committed in the order the room submits
them and fanned out in that same order, so every client sees ``seq`` ascending. Every frame
is encoded once for all recipients. The room never waits on a connection (``deliver`` never
blocks); it waits only on the store writer and the presence actor, which never wait on it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio

from winkr.actor import Frames, Reply, drain
from winkr.clock import iso
from winkr.errors import CONVERSATION_FULL, FORBIDDEN, INTERNAL_ERROR, NOT_FOUND, ProtocolError
from winkr.policy import CheckedMessage
from winkr.presence import PresenceHandle, Published
from winkr.ratelimit import Rate
from winkr.store.store import SendResult, Store, last_message_summary
from winkr.store.webhook_events import MESSAGE_CREATED, insert_messages_with_webhooks
from winkr.store.writer import StoreHandle
from winkr.webhooks import WEBHOOKS_OFF, WebhookHandle

log = logging.getLogger("winkr.room")

MAX_SEND_RUN = 64  # sends committed together from one room
UNKNOWN_ROOM_SECONDS = 1.0  # how long a room for a conversation that does not exist stays awake


@attrs.frozen
class Join:
    peer: Any
    ref: str | None


@attrs.frozen
class Leave:
    peer: Any
    ref: str | None
    reply: bool = True  # False when a closing connection leaves silently


@attrs.frozen
class Typing:
    peer: Any
    is_typing: bool
    ref: str | None


@attrs.frozen
class Send:
    peer: Any
    message: CheckedMessage
    client_message_id: str | None
    ref: str | None
    received_at: float | None = None  # trio time the frame was read: the fan-out latency metric


@attrs.frozen
class Read:
    peer: Any
    message_id: str
    ref: str | None


@attrs.frozen
class Delete:
    peer: Any
    message_id: str
    ref: str | None


@attrs.frozen
class SystemDeleted:
    message_id: str
    deleted_at: float


REQUEST_EVENTS = {Join: "conversation:join", Leave: "conversation:leave", Send: "message:send",
                  Read: "message:read", Delete: "message:delete"}


class RoomRetired(Exception):
    """The room went to sleep; ask the hub for the current one."""


class RoomHandle:
    def __init__(self, conversation_id: str, inbox: trio.MemorySendChannel[Any]) -> None:
        self.conversation_id = conversation_id
        self._inbox = inbox

    async def send(self, request: Any) -> None:
        """Queue a request; raises ``RoomRetired`` if this room has gone to sleep."""
        try:
            await self._inbox.send(request)
        except trio.ClosedResourceError:
            raise RoomRetired(self.conversation_id) from None

    def close(self) -> None:
        self._inbox.close()


async def send_to_room(get_room: Callable[[str], Any], conversation_id: str, request: Any) -> None:
    """Hand ``request`` to the conversation's current room, retrying past a retirement."""
    while True:
        try:
            await (await get_room(conversation_id)).send(request)
            return
        except RoomRetired:
            continue


@attrs.frozen
class RoomServices:
    frames: Frames
    store: StoreHandle
    presence: PresenceHandle
    get_room: Callable[[str], Any]  # async: conversation id -> RoomHandle (the hub)
    retire: Callable[[str, RoomHandle], Any]  # async: tell the hub this room is idle
    nudge_reaper: Callable[[], None]
    typing_timeout: float
    max_room_connections: int
    idle_timeout: float
    message_rates: tuple[Rate, ...] = ()
    webhooks: WebhookHandle = WEBHOOKS_OFF


class Room:
    def __init__(self, conversation_id: str, services: RoomServices, handle: RoomHandle) -> None:
        self.id = conversation_id
        self.s = services
        self.handle = handle
        self.participants: tuple[str, ...] | None = None
        self.members: dict[str, Any] = {}  # connection id -> Peer
        self.typing: dict[str, tuple[float, str]] = {}  # user -> (expiry deadline, username)
        self.idle_since = trio.current_time()
        self.retiring = False

    # --- replies and broadcasts ------------------------------------------------------

    def _error(self, peer: Any, exc: ProtocolError, request_event: str, ref: str | None) -> None:
        peer.deliver(self.s.frames.error(exc, request_event, ref))

    def _broadcast(self, frame: str, skip: Any = None, skip_user: str | None = None) -> None:
        for peer in self.members.values():
            if peer is not skip and peer.user_id != skip_user:
                peer.deliver(frame)

    def _authorize(self, peer: Any) -> None:
        if self.participants is None:
            raise ProtocolError(NOT_FOUND, "conversation not found", field="conversation_id")
        if peer.user_id not in self.participants and not peer.is_service:
            raise ProtocolError(FORBIDDEN, "you are not a participant of this conversation",
                                field="conversation_id")

    # --- the loop --------------------------------------------------------------------

    def next_deadline(self) -> float:
        deadline = min((expiry for expiry, _ in self.typing.values()), default=math.inf)
        if not self.members and not self.retiring:
            deadline = min(deadline, self.idle_since + self.s.idle_timeout)
        return deadline

    async def on_timeout(self) -> None:
        now = trio.current_time()
        for user_id, (expiry, username) in list(self.typing.items()):
            if expiry <= now:
                self._set_typing(user_id, username, False)
        if not self.members and not self.retiring and now >= self.idle_since + self.s.idle_timeout:
            self.retiring = True
            await self.s.retire(self.id, self.handle)

    async def handle_batch(self, batch: list[Any]) -> None:
        """Handle requests in order; a run of sends is committed as one group."""
        i = 0
        while i < len(batch):
            if self.retiring:  # a request that raced the retirement goes to the new room
                for request in batch[i:]:
                    await send_to_room(self.s.get_room, self.id, request)
                return
            j = i + 1
            if isinstance(batch[i], Send):
                while j < len(batch) and j - i < MAX_SEND_RUN and isinstance(batch[j], Send):
                    j += 1
            try:
                if isinstance(batch[i], Send):
                    await self._send_run(batch[i:j])
                else:
                    await self._handle_one(batch[i])
            except Exception:  # the room's exception barrier: a bug answers, it does not kill
                log.exception("room %s failed on %r", self.id, type(batch[i]).__name__)
                for request in batch[i:j]:
                    if getattr(request, "peer", None) is not None:
                        self._error(request.peer, ProtocolError(INTERNAL_ERROR, "internal error"),
                                    REQUEST_EVENTS.get(type(request), ""), request.ref)
            i = j

    async def _handle_one(self, request: Any) -> None:
        try:
            if isinstance(request, Join):
                self._join(request)
            elif isinstance(request, Leave):
                self._leave(request)
            elif isinstance(request, Typing):
                self._authorize(request.peer)
                self._typing(request)
            elif isinstance(request, Read):
                await self._read(request)
            elif isinstance(request, Delete):
                await self._delete(request)
            elif isinstance(request, SystemDeleted):
                self._announce_deleted(request.message_id, "system", request.deleted_at, None, None)
        except ProtocolError as exc:
            event = REQUEST_EVENTS.get(type(request))
            if isinstance(request, Typing):
                event = "typing:start" if request.is_typing else "typing:stop"
            self._error(request.peer, exc, event or "", request.ref)

    # --- membership and typing -------------------------------------------------------

    def _join(self, request: Join) -> None:
        peer = request.peer
        self._authorize(peer)
        limit = self.s.max_room_connections
        if peer.id not in self.members and limit and len(self.members) >= limit:
            raise ProtocolError(CONVERSATION_FULL, f"at most {limit} connections may join a conversation",
                                field="conversation_id")
        self.members[peer.id] = peer
        peer.deliver(self.s.frames.event("conversation:joined", {
            "conversation_id": self.id, "joined_at": iso(self.s.frames.now())}, request.ref))

    def _leave(self, request: Leave) -> None:
        peer = request.peer
        if request.reply:
            self._authorize(peer)
        self.members.pop(peer.id, None)
        if request.reply:
            peer.deliver(self.s.frames.event("conversation:left", {
                "conversation_id": self.id, "left_at": iso(self.s.frames.now())}, request.ref))
        if peer.user_id in self.typing:
            self._set_typing(peer.user_id, peer.username, False)
        if not self.members:
            self.idle_since = trio.current_time()

    def _typing(self, request: Typing) -> None:
        peer = request.peer
        if request.is_typing:
            was_typing = peer.user_id in self.typing
            self.typing[peer.user_id] = (trio.current_time() + self.s.typing_timeout, peer.username)
            if not was_typing:
                self._broadcast_typing(peer.user_id, peer.username, True)
        elif peer.user_id in self.typing:
            self._set_typing(peer.user_id, peer.username, False)

    def _set_typing(self, user_id: str, username: str, is_typing: bool) -> None:
        self.typing.pop(user_id, None)
        self._broadcast_typing(user_id, username, is_typing)

    def _broadcast_typing(self, user_id: str, username: str, is_typing: bool) -> None:
        now = iso(self.s.frames.now())
        self._broadcast(self.s.frames.event("typing:indicator", {
            "conversation_id": self.id, "user_id": user_id, "username": username,
            "is_typing": is_typing, "timestamp": now}), skip_user=user_id)

    # --- messages --------------------------------------------------------------------

    async def _send_run(self, sends: list[Send]) -> None:
        """Commit a run of sends as one store request, then fan each out in commit order."""
        allowed: list[Send] = []
        for request in sends:
            try:
                self._authorize(request.peer)
                allowed.append(request)
            except ProtocolError as exc:
                self._error(request.peer, exc, "message:send", request.ref)
        if not allowed:
            return
        now, rates = self.s.frames.now(), self.s.message_rates
        # The joined recipients get the message as soon as it commits: record those deliveries
        # in the same transaction (membership cannot change while this run is in flight).
        joined_users = {member.user_id for member in self.members.values()}
        items = [(request.peer.user_id, request.message, request.client_message_id,
                  sorted(joined_users - {request.peer.user_id})) for request in allowed]
        # Webhooks (contract §14): message.created, in the same transaction, for each recipient
        # with no open connection. Presence is asked once per run, only about participants
        # who are neither joined here nor sending (those are connected by definition).
        unconnected = await self._unconnected(joined_users, allowed)
        if unconnected:
            work: Any = partial(insert_messages_with_webhooks, conversation_id=self.id, items=items, now=now,
                                rates=rates, senders=[_sender(request.peer) for request in allowed],
                                unconnected=unconnected, enabled=self.s.webhooks.events)
        else:
            work = partial(Store.insert_messages, conversation_id=self.id, items=items, now=now, rates=rates)
        results = await self.s.store.call(work)
        if unconnected:
            self.s.webhooks.nudge()
        published = []
        for request, result in zip(allowed, results):
            if isinstance(result, ProtocolError):
                self._error(request.peer, result, "message:send", request.ref)
                continue
            event = self._fan_out(request, result)
            if event is not None:
                published.append(event)
        if published:  # one hand-off for the whole run
            await self.s.presence.published(published)

    async def _unconnected(self, joined_users: set[str], sends: list[Send]) -> frozenset[str]:
        """The participants with no open connection right now, if ``message.created`` is on."""
        if not self.s.webhooks.wants(MESSAGE_CREATED) or not self.participants:
            return frozenset()
        candidates = set(self.participants) - joined_users - {request.peer.user_id for request in sends}
        if not candidates:
            return frozenset()
        return frozenset(candidates - await self.s.presence.connected(candidates))

    def _fan_out(self, request: Send, result: SendResult) -> Published | None:
        """Acknowledge to the sender, broadcast to the joined connections; what presence must
        still do (unread for the others, receipts) is returned."""
        peer = request.peer
        data = {"message": result.message, "sender": _sender(peer)}
        peer.deliver(self.s.frames.event("message:new", data, request.ref))
        if result.duplicate:  # answered to the sender only (contract §11.15)
            return None
        frame = self.s.frames.event("message:new", data)
        for member in self.members.values():
            if member is not peer:
                member.deliver(frame)
        if self.s.frames.metrics is not None and request.received_at is not None:
            self.s.frames.metrics.fanout_seconds.observe(trio.current_time() - request.received_at)
        return Published(result.message, self.participants or (), frozenset(self.members),
                         tuple(result.deliveries))

    async def _read(self, request: Read) -> None:
        peer = request.peer
        self._authorize(peer)
        result = await self.s.store.call(partial(
            Store.read_up_to, conversation_id=self.id, reader=peer.user_id,
            message_id=request.message_id, now=self.s.frames.now()))
        data = {"message_id": request.message_id, "conversation_id": self.id,
                "reader_id": peer.user_id, "viewed_at": iso(result.viewed_at)}
        peer.deliver(self.s.frames.event("message:viewed", data, request.ref))
        if result.newly_read_senders:
            await self.s.presence.send_to_users(result.newly_read_senders,
                                                self.s.frames.event("message:viewed", data))
            last = await self.s.store.call(lambda store: store.last_message(self.id))
            await self.s.presence.send_to_users((peer.user_id,), self.s.frames.event("conversation:unread", {
                "conversation_id": self.id, "unread_count": result.unread_count,
                "last_message": _summary(last)}), except_connection=peer.id)
        if result.ephemeral_expiries:
            self.s.nudge_reaper()

    async def _delete(self, request: Delete) -> None:
        peer = request.peer
        self._authorize(peer)
        deleted_at = await self.s.store.call(partial(
            Store.delete_message, conversation_id=self.id, message_id=request.message_id,
            deleted_by=peer.user_id, now=self.s.frames.now()))
        self._announce_deleted(request.message_id, peer.user_id, deleted_at, peer, request.ref)

    def _announce_deleted(self, message_id: str, deleted_by: str, deleted_at: float,
                          requester: Any, ref: str | None) -> None:
        data = {"message_id": message_id, "conversation_id": self.id, "deleted_by": deleted_by,
                "deleted_at": iso(deleted_at)}
        if requester is not None:
            requester.deliver(self.s.frames.event("message:deleted", data, ref))
        self._broadcast(self.s.frames.event("message:deleted", data), skip=requester)


def _sender(peer: Any) -> dict[str, Any]:
    return {"id": peer.user_id, "username": peer.username, "avatar_url": peer.avatar_url}


def _summary(message: Any) -> Any:
    return last_message_summary(message) if message else None


async def run_room(conversation_id: str, services: RoomServices, handle: RoomHandle,
                   inbox: trio.MemoryReceiveChannel[Any]) -> None:
    """Serve one conversation until the hub closes its inbox (after it went idle)."""
    room = Room(conversation_id, services, handle)
    room.participants = await services.store.call(lambda store: store.participants(conversation_id))
    if room.participants is None:  # an unknown id: answer what is waiting, then sleep soon
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
            await room.handle_batch(drain(inbox, first, MAX_SEND_RUN))
            if room.typing:
                await room.on_timeout()


__all__ = ["Room", "RoomHandle", "RoomRetired", "RoomServices", "run_room", "Reply"]
