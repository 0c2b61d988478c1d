"""The presence actor: who is online, through which connections, and who should hear of it.

Owns, per user: the open connections (``Peer``), admissions in progress (for the
per-user connection limit), the chosen status, the contacts to tell, and the offline grace
timer. It is also the one place that can reach "every connection of user X", so broadcasts
to users (not to a room's joined connections) go through it.
"""
from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import attrs
import trio

from winkr.actor import Frames, Reply, drain
from winkr.clock import iso
from winkr.store.store import Delivery, Message, Store, last_message_summary
from winkr.store.writer import StoreHandle

log = logging.getLogger("winkr.presence")


@attrs.define
class _User:
    username: str
    peers: dict[str, Any] = attrs.Factory(dict)  # connection id -> Peer
    admitting: int = 0
    status: str = "online"
    contacts: set[str] = attrs.Factory(set)
    visible: bool = False  # whether contacts were told "online"
    grace_generation: int = 0


# --- requests -------------------------------------------------------------------------

@attrs.frozen
class _Admit:
    user_id: str
    username: str
    limit: int
    reply: Reply[bool]


@attrs.frozen
class _Release:
    user_id: str


@attrs.frozen
class _Connect:
    peer: Any
    contacts: frozenset[str]


@attrs.frozen
class _Disconnect:
    peer: Any


@attrs.frozen
class _SetStatus:
    peer: Any
    status: str
    reply: Reply[float]


@attrs.frozen
class Published:
    """A committed message after its room fanned it out to the joined connections."""

    message: Message
    participants: tuple[str, ...]
    joined_connections: frozenset[str]
    deliveries: tuple[Delivery, ...]  # recorded with the message: its joined recipients


@attrs.frozen
class _SendToUsers:
    user_ids: tuple[str, ...]
    frame: str
    except_connection: str | None


@attrs.frozen
class _SendEach:
    deliveries: tuple[tuple[str, str], ...]  # (user id, frame)


@attrs.frozen
class _Online:
    user_ids: tuple[str, ...]
    reply: Reply[dict[str, bool]]


@attrs.frozen
class _Connected:  # webhooks: who gets message.created (contract §14)
    user_ids: tuple[str, ...]
    reply: Reply[frozenset[str]]


@attrs.frozen
class _AddContacts:
    user_ids: tuple[str, ...]


@attrs.frozen
class _CloseAll:
    reason: str


class PresenceHandle:
    def __init__(self, inbox: trio.MemorySendChannel[Any]) -> None:
        self._inbox = inbox

    async def admit(self, user_id: str, username: str, limit: int) -> bool:
        """Reserve one of the user's ``limit`` connection slots (0 = no limit)."""
        reply: Reply[bool] = Reply()
        await self._inbox.send(_Admit(user_id, username, limit, reply))
        return await reply.wait()

    async def release(self, user_id: str) -> None:
        await self._inbox.send(_Release(user_id))

    async def connect(self, peer: Any, contacts: Iterable[str]) -> None:
        await self._inbox.send(_Connect(peer, frozenset(contacts)))

    async def disconnect(self, peer: Any) -> None:
        await self._inbox.send(_Disconnect(peer))

    async def set_status(self, peer: Any, status: str) -> float:
        reply: Reply[float] = Reply()
        await self._inbox.send(_SetStatus(peer, status, reply))
        return await reply.wait()

    async def published(self, events: list[Published]) -> None:
        """Messages a room has fanned out, in commit order."""
        await self._inbox.send(events)

    async def send_to_users(self, user_ids: Iterable[str], frame: str,
                            except_connection: str | None = None) -> None:
        await self._inbox.send(_SendToUsers(tuple(user_ids), frame, except_connection))

    async def send_each(self, deliveries: Iterable[tuple[str, str]]) -> None:
        """Several (user, frame) hand-offs as one request."""
        await self._inbox.send(_SendEach(tuple(deliveries)))

    async def online(self, user_ids: Iterable[str]) -> dict[str, bool]:
        reply: Reply[dict[str, bool]] = Reply()
        await self._inbox.send(_Online(tuple(user_ids), reply))
        return await reply.wait()

    async def connected(self, user_ids: Iterable[str]) -> frozenset[str]:
        """Which of ``user_ids`` have at least one open connection, whatever their status
        or privacy settings (``online`` answers what contacts may see instead)."""
        reply: Reply[frozenset[str]] = Reply()
        await self._inbox.send(_Connected(tuple(user_ids), reply))
        return await reply.wait()

    async def add_contacts(self, user_ids: Iterable[str]) -> None:
        await self._inbox.send(_AddContacts(tuple(user_ids)))

    async def close_all(self, reason: str) -> None:
        await self._inbox.send(_CloseAll(reason))


class _Presence:
    def __init__(self, frames: Frames, store: StoreHandle, grace: float, online_gauge: Any = None) -> None:
        self.frames = frames
        self.store = store
        self.grace = grace
        self.online_gauge = online_gauge  # users with at least one open connection, kept as they change
        self.users: dict[str, _User] = {}
        self.grace_timers: list[tuple[float, int, str]] = []  # (deadline, generation, user)
        self.closing: str | None = None

    # --- helpers ---------------------------------------------------------------------

    def _deliver(self, user_ids: Iterable[str], frame: str, except_connection: str | None = None) -> None:
        for user_id in user_ids:
            state = self.users.get(user_id)
            if state is not None:
                for peer in state.peers.values():
                    if peer.id != except_connection:
                        peer.deliver(frame)

    def _announce(self, user_id: str, state: _User, online: bool) -> None:
        if online:
            frame = self.frames.event("user:online", {"user_id": user_id, "username": state.username,
                                                      "online_at": iso(self.frames.now())})
        else:
            frame = self.frames.event("user:offline", {"user_id": user_id, "username": state.username,
                                                       "offline_at": iso(self.frames.now())})
        state.visible = online
        self._deliver(state.contacts, frame)

    def _forget_if_idle(self, user_id: str, state: _User) -> None:
        if not state.peers and not state.admitting and not state.visible:
            del self.users[user_id]

    # --- requests --------------------------------------------------------------------

    async def handle_batch(self, requests: list[Any]) -> None:
        """Handle requests in order; consecutive published lists become one store request."""
        published: list[Published] = []
        for request in requests:
            if isinstance(request, list):
                published.extend(request)
                continue
            if published:
                await self._published(published)
                published = []
            await self.handle(request)
        if published:
            await self._published(published)

    async def handle(self, request: Any) -> None:
        if isinstance(request, list):
            await self._published(request)
        elif isinstance(request, _SendToUsers):
            self._deliver(request.user_ids, request.frame, request.except_connection)
        elif isinstance(request, _SendEach):
            for user_id, frame in request.deliveries:
                self._deliver((user_id,), frame)
        elif isinstance(request, _Admit):
            state = self.users.setdefault(request.user_id, _User(request.username))
            allowed = self.closing is None and (
                not request.limit or len(state.peers) + state.admitting < request.limit)
            if allowed:
                state.admitting += 1
            request.reply.set(allowed)
        elif isinstance(request, _Release):
            state = self.users[request.user_id]
            state.admitting -= 1
            self._forget_if_idle(request.user_id, state)
        elif isinstance(request, _Connect):
            self._connect(request.peer, request.contacts)
        elif isinstance(request, _Disconnect):
            await self._disconnect(request.peer)
        elif isinstance(request, _SetStatus):
            self._set_status(request)
        elif isinstance(request, _Online):
            request.reply.set({user: self._is_online(user) for user in request.user_ids})
        elif isinstance(request, _Connected):
            request.reply.set(frozenset(user for user in request.user_ids
                                        if (known := self.users.get(user)) is not None and known.peers))
        elif isinstance(request, _AddContacts):
            for user in request.user_ids:
                if (known := self.users.get(user)) is not None:
                    known.contacts.update(u for u in request.user_ids if u != user)
        elif isinstance(request, _CloseAll):
            self.closing = request.reason
            for state in self.users.values():
                for peer in list(state.peers.values()):
                    peer.close(request.reason)

    def _is_online(self, user_id: str) -> bool:
        state = self.users.get(user_id)
        return state is not None and state.visible

    def _connect(self, peer: Any, contacts: frozenset[str]) -> None:
        state = self.users[peer.user_id]
        state.admitting -= 1
        state.username = peer.username
        state.contacts = set(contacts)
        state.peers[peer.id] = peer
        if len(state.peers) == 1 and self.online_gauge is not None:
            self.online_gauge.inc()
        state.grace_generation += 1  # a pending offline announcement is void now
        if self.closing is not None:
            peer.close(self.closing)
        elif len(state.peers) == 1 and not state.visible:
            state.status = "online"
            self._announce(peer.user_id, state, online=True)

    async def _disconnect(self, peer: Any) -> None:
        state = self.users.get(peer.user_id)
        if state is None or state.peers.pop(peer.id, None) is None:
            return
        if not state.peers:
            if self.online_gauge is not None:
                self.online_gauge.dec()
            state.grace_generation += 1
            heapq.heappush(self.grace_timers, (trio.current_time() + self.grace,
                                               state.grace_generation, peer.user_id))

    async def expire_grace(self) -> None:
        now = trio.current_time()
        while self.grace_timers and self.grace_timers[0][0] <= now:
            _, generation, user_id = heapq.heappop(self.grace_timers)
            state = self.users.get(user_id)
            if state is None or state.peers or generation != state.grace_generation:
                continue
            if state.visible:
                self._announce(user_id, state, online=False)
            stamp = self.frames.now()
            await self.store.fire(partial(Store.touch_last_seen, user_id=user_id, now=stamp))
            self._forget_if_idle(user_id, state)

    def next_deadline(self) -> float:
        return self.grace_timers[0][0] if self.grace_timers else math.inf

    def _set_status(self, request: _SetStatus) -> None:
        state = self.users[request.peer.user_id]
        state.status = request.status
        if request.status == "offline" and state.visible:
            self._announce(request.peer.user_id, state, online=False)
        elif request.status != "offline" and not state.visible:
            self._announce(request.peer.user_id, state, online=True)
        request.reply.set(self.frames.now())

    async def _published(self, events: list[Published]) -> None:
        """Receipts to the senders (``message:delivered``, for deliveries the room already
        recorded with the message) and ``conversation:unread`` to participants' connections
        outside the room. Only the latter needs the store: ONE background request for the
        whole list records those deliveries and counts the unread messages."""
        jobs = []
        for event in events:
            job = self._delivery_job(event)
            if job.outside:
                jobs.append(job)
            else:
                notify_delivered(self.frames, list(event.deliveries), job.sender_peers)
        if not jobs:
            return
        now, frames = self.frames.now(), self.frames

        def work(store: Store) -> list[tuple[dict[str, int], list[Delivery]]]:
            return [(store.unread_counts(job.message["conversation_id"], job.outside),
                     store.record_delivered_to(job.message, job.outside, now)) for job in jobs]

        def done(results: list[tuple[dict[str, int], list[Delivery]]]) -> None:
            for job, (counts, deliveries) in zip(jobs, results):
                job.finish(frames, counts, deliveries)

        await self.store.fire(work, done)

    def _delivery_job(self, event: Published) -> _DeliveryJob:
        message = event.message
        sender = message["sender_id"]
        outside: dict[str, list[Any]] = {}
        for user_id in event.participants:
            if user_id != sender and (state := self.users.get(user_id)) is not None:
                peers = [p for p in state.peers.values() if p.id not in event.joined_connections]
                if peers:
                    outside[user_id] = peers
        sender_state = self.users.get(sender)
        sender_peers = list(sender_state.peers.values()) if sender_state else []
        return _DeliveryJob(message, outside, list(event.deliveries), sender_peers)


@attrs.frozen
class _DeliveryJob:
    """What one published message still needs once its deliveries are recorded."""

    message: Message
    outside: dict[str, list[Any]]  # recipient -> its connections that have not joined the room
    recorded: list[Delivery]  # deliveries the room recorded with the message
    sender_peers: list[Any]

    def finish(self, frames: Frames, counts: dict[str, int], deliveries: list[Delivery]) -> None:
        summary = last_message_summary(self.message)
        for user_id, peers in self.outside.items():
            frame = frames.event("conversation:unread", {
                "conversation_id": self.message["conversation_id"], "unread_count": counts[user_id],
                "last_message": summary})
            for peer in peers:
                peer.deliver(frame)
        notify_delivered(frames, self.recorded + deliveries, self.sender_peers)


def delivered_frame(frames: Frames, delivery: Delivery) -> str:
    return frames.event("message:delivered", {
        "message_id": delivery.message_id, "conversation_id": delivery.conversation_id,
        "recipient_id": delivery.recipient_id, "delivered_at": iso(delivery.delivered_at)})


def notify_delivered(frames: Frames, deliveries: list[Delivery], sender_peers: list[Any]) -> None:
    """Tell a sender's connections about first deliveries of their messages."""
    for delivery in deliveries:
        frame = delivered_frame(frames, delivery)
        for peer in sender_peers:
            peer.deliver(frame)


MAX_BATCH = 256


async def run_presence(frames: Frames, store: StoreHandle, *, grace: float, online_gauge: Any = None,
                       inbox_size: int = 4096,
                       task_status: trio.TaskStatus[PresenceHandle] = trio.TASK_STATUS_IGNORED) -> None:
    send, receive = trio.open_memory_channel[Any](inbox_size)
    presence = _Presence(frames, store, grace, online_gauge)
    task_status.started(PresenceHandle(send))
    async with receive:
        while True:
            request = None
            with trio.move_on_at(presence.next_deadline()):
                try:
                    request = await receive.receive()
                except trio.EndOfChannel:
                    return
            if request is not None:
                try:
                    await presence.handle_batch(drain(receive, request, MAX_BATCH))
                except Exception:  # a bug must not take every user's presence down with it
                    log.exception("presence failed on a request")
            await presence.expire_grace()


__all__ = ["PresenceHandle", "Published", "run_presence", "notify_delivered", "delivered_frame", "Store"]
