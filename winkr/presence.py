"""The presence actor: who is online, through which connections, and who should hear of it.

Owns, per user: the open connections (``Peer``), admissions in progress (for the per-user
connection limit), the chosen status, the contacts to tell, and the offline grace timer. It
is also the one place that can reach "every connection of user X", so frames addressed to
users (not to a room's joined connections) go through it.

Presence frames are coalesced per contact (``user:online``/``user:offline`` of one user share
a key in each recipient's outbox): a user flapping their status cannot fill anyone's queue.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable, Collection, Iterable
from functools import partial

import attrs
import trio

from winkr.actor import Frames, Reply, drain, hand_over
from winkr.broker import events as bus
from winkr.broker.base import Broker, BusEvent, user_topic
from winkr.clock import iso
from winkr.logs import ThrottledLog
from winkr.outbox import CoalesceKey
from winkr.peer import Peer
from winkr.protocol.wire import delivered_data, unread_data
from winkr.records import Delivery, StoredMessage, UserSettings
from winkr.registry import InProcessRegistry, PresenceRegistry, RegistryUnavailable
from winkr.registry.base import HEARTBEAT_SECONDS
from winkr.store.store import Store
from winkr.store.writer import StoreHandle

log = logging.getLogger("winkr.presence")
_failures = ThrottledLog(log)
# An offline check whose end the registry could not be asked about (Redis away, §17.9) is made
# again this soon. Grace timers run outside the actor's exception barrier: what one let through
# stopped the whole node.
GRACE_RETRY_SECONDS = 1.0

MAX_BATCH = 256


@attrs.define
class _User:
    """What this node knows of a user it holds connections of (the rest, shared by every node,
    is in the registry: members, the visible flag, the status, the offline checks)."""

    username: str
    peers: dict[str, Peer] = attrs.Factory(dict)  # connection id -> Peer
    members: dict[str, str] = attrs.Factory(dict)  # connection id -> its registry member
    admissions: list[str] = attrs.Factory(list)  # registry members of handshakes in progress
    contacts: set[str] = attrs.Factory(set)
    grace_generation: int = 0
    grace_pending: bool = False  # a local timer will finish the offline check
    # Safety between users (contract §12): users blocked either way never become contacts;
    # the privacy settings apply to every connection of the user at once.
    apart: set[str] = attrs.Factory(set)
    read_receipts: bool = True
    online_status: bool = True
    # The status the user chose while connected here (or through another node, over the bus):
    # the registry's copy is lost when Redis restarts empty, and an "appear offline" must
    # survive that (it lasts until the user's last connection closes).
    status: str = "online"


# --- requests (the closed union the inbox carries) -------------------------------------------

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
    peer: Peer
    contacts: frozenset[str]
    settings: UserSettings
    apart: frozenset[str]
    reply: Reply[None]


@attrs.frozen
class _Disconnect:
    peer: Peer


@attrs.frozen
class _SetStatus:
    peer: Peer
    status: str
    reply: Reply[float]


@attrs.frozen
class Published:
    """A committed message after its room fanned it out to the joined connections."""

    message: StoredMessage
    participants: tuple[str, ...]
    joined_connections: frozenset[str]
    deliveries: tuple[Delivery, ...]  # recorded with the message: its joined recipients


@attrs.frozen
class _Published:
    events: tuple[Published, ...]


@attrs.frozen
class _SendToUsers:
    user_ids: tuple[str, ...]
    frame: str
    except_connection: str | None
    key: CoalesceKey | None


@attrs.frozen
class _SendEach:
    deliveries: tuple[tuple[str, str], ...]  # (user id, frame)


@attrs.frozen
class _Online:
    user_ids: tuple[str, ...]
    reply: Reply[dict[str, bool]]


@attrs.frozen
class _Connected:
    user_ids: tuple[str, ...]
    reply: Reply[frozenset[str]]


@attrs.frozen
class _AddContacts:
    user_ids: tuple[str, ...]


@attrs.frozen
class _CloseAll:
    reason: str


@attrs.frozen
class _UpdateSettings:
    user_id: str
    read_receipts: bool | None
    online_status: bool | None
    reply: Reply[UserSettings]


@attrs.frozen
class _SendReceipt:
    reader_id: str
    sender_ids: tuple[str, ...]
    frame: str
    key: CoalesceKey | None


@attrs.frozen
class _Apart:
    """A block between two users: no presence either way from now on."""

    user_a: str
    user_b: str


@attrs.frozen
class _Together:
    """An unblock: ``apart`` unless the other still blocks; contacts again if ``contacts``."""

    user_a: str
    user_b: str
    still_apart: bool
    contacts: bool


@attrs.frozen
class _DropContacts:
    pairs: tuple[tuple[str, str], ...]


@attrs.frozen
class PresenceTruth:
    """What the server API shows of a user, whatever their settings."""

    online: bool  # at least one open connection
    status: str  # "offline" without a connection
    connections: int


@attrs.frozen
class _Inspect:
    user_id: str
    reply: Reply[PresenceTruth]


@attrs.frozen
class _CloseUser:
    user_id: str
    reason: str
    reply: Reply[int]


@attrs.frozen
class _Resync:
    """The bus may have lost events since ``since`` (wall clock): re-send unread counts."""

    since: float


@attrs.frozen
class _Unfinished:
    """The registry answers again: tell it what it missed."""


@attrs.frozen
class _RegisterAgain:
    """The registry lost this node's members: register every connection held here again."""


@attrs.frozen
class _CheckGrace:
    """The registry says these users' offline checks are due (a poll, or a dead node's sweep)."""

    user_ids: tuple[str, ...]


@attrs.frozen
class _FromBus:
    """An event another node published on the topic of a user connected here."""

    event: BusEvent


PresenceRequest = (_Admit | _Release | _Connect | _Disconnect | _SetStatus | _Published | _SendToUsers
                   | _SendEach | _Online | _Connected | _AddContacts | _CloseAll | _UpdateSettings | _SendReceipt
                   | _Apart | _Together | _DropContacts | _Inspect | _CloseUser | _FromBus | _CheckGrace
                   | _RegisterAgain | _Unfinished | _Resync)


class PresenceHandle:
    """What other actors hold. Each method waits only for room in presence's inbox (and, where
    it returns something, for the answer); presence never waits on its callers."""

    def __init__(self, inbox: trio.MemorySendChannel[PresenceRequest],
                 connections_here: Callable[[str], int] | None = None, sharing: bool = True) -> None:
        self._inbox = inbox
        self._connections_here = connections_here  # presence's own count of a user's connections
        self._sharing = sharing

    def follow_up_needed(self, participants: Iterable[str], joined: Iterable[Peer]) -> bool:
        """Whether :meth:`published` has anything to do for a message a room fanned out to its
        ``joined`` connections: other nodes to tell, or a participant with a connection on this
        node outside the room (unread counts, receipts to the sender's other connections). A
        quiet conversation's send with both ends in the room then costs no presence hop
        (issue 10). Reads presence's own count of each user's connections (read-only; one
        thread): a connection presence has not registered yet is not counted, and reads its
        unread counts from the store, after this commit, once registered; a joined
        connection that is leaving (presence may have forgotten it) always asks presence."""
        connections_here = self._connections_here
        if self._sharing or connections_here is None:
            return True
        in_room: dict[str, int] = {}  # (a dict and a loop: a Counter and any() cost 3x, per message)
        for peer in joined:
            # A connection the room still lists (its Depart is queued) that presence may have
            # forgotten already: the counts cannot tell whether the user's other connections
            # are all in the room, so presence decides.
            if peer.leaving:
                return True
            user_id = peer.user_id
            in_room[user_id] = in_room.get(user_id, 0) + 1
        for user_id in participants:
            if connections_here(user_id) > in_room.get(user_id, 0):
                return True
        return False

    async def admit(self, user_id: str, username: str, limit: int) -> bool:
        """Reserve one of the user's ``limit`` connection slots (0 = no limit)."""
        reply: Reply[bool] = Reply()
        await self._inbox.send(_Admit(user_id, username, limit, reply))
        return await reply.wait()

    async def release(self, user_id: str) -> None:
        """Give back a slot reserved by ``admit`` whose connection never opened."""
        await self._inbox.send(_Release(user_id))

    async def connect(self, peer: Peer, contacts: Iterable[str], settings: UserSettings | None = None,
                      apart: Iterable[str] = ()) -> None:
        """An admitted connection is open; its user's ``contacts`` hear of them. ``settings``
        (as stored) and ``apart`` (users blocked either way) are adopted by a first connection.
        Returns once presence holds it (the user's topic was subscribed at admission)."""
        reply: Reply[None] = Reply()
        await self._inbox.send(_Connect(peer, frozenset(contacts), settings or UserSettings(), frozenset(apart),
                                        reply))
        await reply.wait()

    async def disconnect(self, peer: Peer) -> None:
        peer.leaving = True  # before presence forgets it: follow_up_needed reads it
        await self._inbox.send(_Disconnect(peer))

    async def set_status(self, peer: Peer, status: str) -> float:
        """Set the user's status; returns the wall-clock time it took effect."""
        reply: Reply[float] = Reply()
        await self._inbox.send(_SetStatus(peer, status, reply))
        return await reply.wait()

    async def published(self, events: list[Published]) -> None:
        """Messages a room has fanned out, in commit order."""
        await hand_over(self._inbox, _Published(tuple(events)))

    async def send_to_users(self, user_ids: Iterable[str], frame: str, except_connection: str | None = None,
                            key: CoalesceKey | None = None) -> None:
        """``frame`` to every connection of each user (a waiting frame with ``key`` is replaced)."""
        await self._inbox.send(_SendToUsers(tuple(user_ids), frame, except_connection, key))

    async def send_each(self, deliveries: Iterable[tuple[str, str]]) -> None:
        """Several (user, frame) hand-offs as one request."""
        await self._inbox.send(_SendEach(tuple(deliveries)))

    async def online(self, user_ids: Iterable[str]) -> dict[str, bool]:
        """Who of ``user_ids`` is visibly online (as their contacts see them)."""
        reply: Reply[dict[str, bool]] = Reply()
        await self._inbox.send(_Online(tuple(user_ids), reply))
        return await reply.wait()

    async def connected(self, user_ids: Iterable[str]) -> frozenset[str]:
        """Which of ``user_ids`` have at least one open connection, whatever their status or
        privacy settings (``online`` answers what contacts may see instead)."""
        reply: Reply[frozenset[str]] = Reply()
        await self._inbox.send(_Connected(tuple(user_ids), reply))
        return await reply.wait()

    async def add_contacts(self, user_ids: Iterable[str]) -> None:
        """These users now share a conversation: each hears of the others from now on."""
        await self._inbox.send(_AddContacts(tuple(user_ids)))

    async def close_all(self, reason: str) -> None:
        """Ask every connection to close with ``reason``; later admissions are refused."""
        await self._inbox.send(_CloseAll(reason))

    # --- safety between users (contract §12) and the server API (§13) -----------------------

    async def update_settings(self, user_id: str, read_receipts: bool | None,
                              online_status: bool | None) -> UserSettings:
        """Store and apply the user's privacy settings (``None``: keep); returns them all. Every
        connection of the user follows at once; contacts hear ``user:offline``/``user:online``
        when ``online_status`` changes what they see. Presence does the write itself, so that
        concurrent changes apply in the order they were stored. Raises what the store raised."""
        reply: Reply[UserSettings] = Reply()
        await self._inbox.send(_UpdateSettings(user_id, read_receipts, online_status, reply))
        return await reply.wait()

    async def send_receipt(self, reader_id: str, sender_ids: Iterable[str], frame: str,
                           key: CoalesceKey | None = None) -> None:
        """``message:viewed`` to the senders, unless the reader or a sender has switched read
        receipts off."""
        await self._inbox.send(_SendReceipt(reader_id, tuple(sender_ids), frame, key))

    async def set_apart(self, user_a: str, user_b: str) -> None:
        """A block: neither hears of the other's presence any more, from now on."""
        await self._inbox.send(_Apart(user_a, user_b))

    async def set_together(self, user_a: str, user_b: str, *, still_apart: bool, contacts: bool) -> None:
        """An unblock (``still_apart``: the other still blocks; ``contacts``: they share an open
        conversation)."""
        await self._inbox.send(_Together(user_a, user_b, still_apart, contacts))

    async def drop_contacts(self, pairs: Iterable[tuple[str, str]]) -> None:
        """These pairs no longer share an open conversation."""
        await self._inbox.send(_DropContacts(tuple(pairs)))

    async def inspect(self, user_id: str) -> PresenceTruth:
        """The truth about a user's connections and status (for the server API)."""
        reply: Reply[PresenceTruth] = Reply()
        await self._inbox.send(_Inspect(user_id, reply))
        return await reply.wait()

    async def close_user(self, user_id: str, reason: str) -> int:
        """Ask every open connection of ``user_id`` to close with ``reason``; returns how many."""
        reply: Reply[int] = Reply()
        await self._inbox.send(_CloseUser(user_id, reason, reply))
        return await reply.wait()

    async def resync(self, since: float) -> None:
        """The bus may have lost events since ``since`` (wall-clock seconds): connections here
        outside a room get the unread count of every conversation that got a message since."""
        await self._inbox.send(_Resync(since))

    async def finish_unfinished(self) -> None:
        """Retry the opens and closes the registry missed (after a heartbeat that succeeded)."""
        await self._inbox.send(_Unfinished())

    async def register_again(self) -> None:
        """The registry forgot this node (Redis restarted empty, or a partition longer than the
        node TTL): put every connection held here back; contacts may hear ``user:online`` again."""
        await self._inbox.send(_RegisterAgain())

    async def check_grace(self, user_ids: Iterable[str]) -> None:
        """The registry has these users' offline checks due (polled; another node may have left them)."""
        await self._inbox.send(_CheckGrace(tuple(user_ids)))

    async def from_bus(self, event: BusEvent) -> None:
        """An event another node published on a ``u:`` topic this node subscribes to."""
        await self._inbox.send(_FromBus(event))


class _Presence:
    def __init__(self, frames: Frames, store: StoreHandle, grace: float, online_gauge: object = None,
                 broker: Broker | None = None, registry: PresenceRegistry | None = None) -> None:
        self.frames = frames
        self.store = store
        self.grace = grace
        self.broker = broker
        self.sharing = broker is not None and broker.shared
        self.registry: PresenceRegistry = registry or InProcessRegistry(shared=False).attach("local")
        # (open|close, user, member) the registry could not be told (Redis unreachable); retried
        # in order after each heartbeat that succeeds.
        self.unfinished: list[tuple[str, str, str]] = []
        self._members = itertools.count(1)
        self.online_gauge = online_gauge  # users with at least one open connection
        self.users: dict[str, _User] = {}
        self.grace_timers: list[tuple[float, int, str]] = []  # (deadline, generation, user)
        self.closing: str | None = None

    # --- helpers -----------------------------------------------------------------------------

    def _deliver(self, user_ids: Iterable[str], frame: str, except_connection: str | None = None,
                 key: CoalesceKey | None = None) -> None:
        """``frame`` to every connection of each user, on this node and the others."""
        user_ids = tuple(user_ids)
        self._deliver_here(user_ids, frame, except_connection, key)
        if self.sharing:
            self._share(user_ids, bus.FRAME, {"frame": frame, "except": except_connection, "key": bus.key_json(key)})

    def _deliver_here(self, user_ids: Iterable[str], frame: str, except_connection: str | None = None,
                      key: CoalesceKey | None = None, skip: Collection[str] = ()) -> None:
        """``frame`` to each user's connections on this node but ``except_connection`` and
        those in ``skip``."""
        for user_id in user_ids:
            state = self.users.get(user_id)
            if state is not None:
                for peer in state.peers.values():
                    if peer.id != except_connection and peer.id not in skip:
                        peer.deliver(frame, key)

    def _share(self, user_ids: Iterable[str], kind: str, data: dict[str, object]) -> None:
        """Publish ``kind`` to the ``u:`` topic of each user (never waits)."""
        if self.sharing:
            assert self.broker is not None
            self.broker.publish([BusEvent(user_topic(user_id), kind, data) for user_id in user_ids])

    def _announce(self, user_id: str, username: str, contacts: Iterable[str], online: bool) -> None:
        now = iso(self.frames.now())
        if online:
            frame = self.frames.event("user:online", {"user_id": user_id, "username": username, "online_at": now})
        else:
            frame = self.frames.event("user:offline", {"user_id": user_id, "username": username, "offline_at": now})
        self._deliver(contacts, frame, key=("presence", user_id))

    async def _announce_user(self, user_id: str, online: bool) -> None:
        """Announce for a user, with this node's knowledge of them, or the store's when this node
        holds none of their connections (an offline check left by another node)."""
        state = self.users.get(user_id)
        if state is not None and state.username:
            self._announce(user_id, state.username, state.contacts, online)
            return
        username, contacts = await self.store.call(partial(Store.presence_card, user_id=user_id))
        self._announce(user_id, username, contacts, online)

    def _gauge(self, delta: int) -> None:
        if self.online_gauge is not None:
            self.online_gauge.inc(delta)  # type: ignore[attr-defined]

    def connections_here(self, user_id: str) -> int:
        """This node's open connections of ``user_id``, for rooms to read through their handle
        (``PresenceHandle.follow_up_needed``; read-only, on the one trio thread)."""
        state = self.users.get(user_id)
        return len(state.peers) if state is not None else 0

    def _forget_if_idle(self, user_id: str, state: _User) -> None:
        if not state.peers and not state.admissions and not state.grace_pending:
            self.users.pop(user_id, None)

    # --- requests ----------------------------------------------------------------------------

    async def handle_batch(self, requests: list[PresenceRequest]) -> None:
        """Handle requests in order; consecutive published lists become one store request."""
        published: list[Published] = []
        for request in requests:
            if isinstance(request, _Published):
                published.extend(request.events)
                continue
            if published:
                await self._published_guarded(published)
                published = []
            try:
                await self.handle(request)
            except Exception as exc:  # noqa: BLE001 - one bad request must not drop the rest of the batch
                _failures.exception(exc, "presence failed on a request")
                # Whoever waits for an answer gets the error instead of waiting forever.
                reply = getattr(request, "reply", None)
                if isinstance(reply, Reply) and not reply.is_set():
                    reply.fail(exc)
        if published:
            await self._published_guarded(published)

    async def _published_guarded(self, published: list[Published]) -> None:
        try:
            await self._published(published)
        except Exception as exc:  # noqa: BLE001 - as above: the batch goes on
            _failures.exception(exc, "presence failed on published messages")

    async def handle(self, request: PresenceRequest) -> None:
        match request:
            case _Published(events=events):
                await self._published(list(events))
            case _SendToUsers(user_ids=user_ids, frame=frame, except_connection=skip, key=key):
                self._deliver(user_ids, frame, skip, key)
            case _SendEach(deliveries=deliveries):
                for user_id, frame in deliveries:
                    self._deliver((user_id,), frame)
            case _Admit():
                await self._admit(request)
            case _Release(user_id=user_id):
                await self._release(user_id)
            case _RegisterAgain():
                for user_id, state in list(self.users.items()):
                    announce = False
                    for peer_id in list(state.members):
                        member = state.members[peer_id]
                        await self.registry.admit(user_id, member, 0)
                        announce = await self.registry.opened(user_id, member, state.online_status) or announce
                    if state.members and state.status != "online":
                        # Restored before anyone is told: an invisible user stays invisible.
                        await self.registry.set_status(user_id, state.status, state.online_status)
                        announce = announce and state.status != "offline"
                    if announce:
                        self._announce(user_id, state.username, state.contacts, online=True)
                    if not state.members and state.grace_pending and state.status != "offline" \
                            and state.online_status:
                        # Left here within the grace period: the registry lost the offline check
                        # with everything else, and the contacts saw the user online. A close of
                        # a member it does not know starts the check again.
                        await self.registry.closed(user_id, str(next(self._members)), self.grace)
            case _CheckGrace(user_ids=user_ids):
                for user_id in user_ids:
                    await self._grace_expired(user_id)
            case _Connect():
                try:
                    await self._connect(request)
                finally:
                    request.reply.set(None)
            case _Disconnect(peer=peer):
                if await self._disconnect(peer):
                    await self._unsubscribe(peer.user_id)
            case _Unfinished():
                await self._finish_unfinished()
            case _Resync(since=since):
                await self._resync_unread(since)
            case _SetStatus():
                await self._set_status(request)
            case _Online(user_ids=user_ids, reply=reply):
                try:
                    reply.set(await self.registry.visible(user_ids))
                except RegistryUnavailable:  # Redis away (§17.9): what this node sees
                    reply.set({user: self._visible_here(user) for user in user_ids})
            case _Connected(user_ids=user_ids, reply=reply):
                try:
                    reply.set(await self.registry.connected(user_ids))
                except RegistryUnavailable:  # Redis away: a send must still be acknowledged
                    reply.set(frozenset(user for user in user_ids if self._connected_here(user)))
            case _AddContacts(user_ids=user_ids):
                for user in user_ids:
                    self._add_contacts(user, user_ids)
                    self._share((user,), bus.CONTACTS, {"add": list(user_ids)})
            case _CloseAll(reason=reason):
                self.closing = reason
                for state in self.users.values():
                    for peer in state.peers.values():
                        peer.request_close(reason)
            case _UpdateSettings():
                await self._update_settings(request)
            case _SendReceipt(reader_id=reader_id, sender_ids=sender_ids, frame=frame, key=key):
                reader = self.users.get(reader_id)
                if reader is None or reader.read_receipts:
                    for sender_id in sender_ids:
                        self._receipt_here(sender_id, frame, key)
                    self._share(sender_ids, bus.RECEIPT, {"frame": frame, "key": bus.key_json(key)})
            case _Apart(user_a=a, user_b=b):
                for user, other in ((a, b), (b, a)):
                    self._apart(user, other)
                    self._share((user,), bus.APART, {"other": other})
            case _Together(user_a=a, user_b=b, still_apart=still_apart, contacts=contacts):
                for user, other in ((a, b), (b, a)):
                    self._together(user, other, still_apart, contacts)
                    self._share((user,), bus.TOGETHER, {"other": other, "still_apart": still_apart,
                                                        "contacts": contacts})
            case _DropContacts(pairs=pairs):
                for a, b in pairs:
                    for user, other in ((a, b), (b, a)):
                        self._drop_contact(user, other)
                        self._share((user,), bus.DROP_CONTACT, {"other": other})
            case _Inspect(user_id=user_id, reply=reply):
                connections, status = await self.registry.truth(user_id)
                reply.set(PresenceTruth(connections > 0, status, connections))
            case _CloseUser(user_id=user_id, reason=reason, reply=reply):
                here = self._close_user_here(user_id, reason)
                self._share((user_id,), bus.CLOSE, {"reason": reason})
                everywhere, _ = await self.registry.truth(user_id)
                reply.set(max(everywhere, here))
            case _FromBus(event=event):
                await self._from_bus(event)

    def _connected_here(self, user_id: str) -> bool:
        state = self.users.get(user_id)
        return state is not None and bool(state.peers)

    def _visible_here(self, user_id: str) -> bool:
        state = self.users.get(user_id)
        return state is not None and bool(state.peers) and state.online_status

    # --- what every node does for a user it holds (asked here, or by another node) -----------

    def _add_contacts(self, user: str, user_ids: Iterable[str]) -> None:
        if (known := self.users.get(user)) is not None:
            known.contacts.update(u for u in user_ids if u != user and u not in known.apart)

    def _apart(self, user: str, other: str) -> None:
        if (known := self.users.get(user)) is not None:
            known.apart.add(other)
            known.contacts.discard(other)

    def _together(self, user: str, other: str, still_apart: bool, contacts: bool) -> None:
        if (known := self.users.get(user)) is not None and not still_apart:
            known.apart.discard(other)
            if contacts:
                known.contacts.add(other)

    def _drop_contact(self, user: str, other: str) -> None:
        if (known := self.users.get(user)) is not None:
            known.contacts.discard(other)

    def _receipt_here(self, sender_id: str, frame: str, key: CoalesceKey | None) -> None:
        """``message:viewed`` to the sender's connections here, unless they switched receipts off."""
        if (state := self.users.get(sender_id)) is not None and state.read_receipts:
            self._deliver_here((sender_id,), frame, key=key)

    def _close_user_here(self, user_id: str, reason: str) -> int:
        closing = list(self.users[user_id].peers.values()) if user_id in self.users else []
        for peer in closing:
            peer.request_close(reason)
        return len(closing)

    async def _from_bus(self, event: BusEvent) -> None:
        user_id = event.topic.removeprefix("u:")
        data = event.data
        kind = event.kind
        if kind == bus.FRAME:
            self._deliver_here((user_id,), str(data["frame"]), data["except"], bus.key_from_json(data["key"]))
        elif kind == bus.RECEIPT:
            self._receipt_here(user_id, str(data["frame"]), bus.key_from_json(data["key"]))
        elif kind == bus.COMMITTED:
            await self._committed_elsewhere(user_id, bus.message_from_json(data["m"]))
        elif kind == bus.CONTACTS:
            self._add_contacts(user_id, data["add"])
        elif kind == bus.APART:
            self._apart(user_id, str(data["other"]))
        elif kind == bus.TOGETHER:
            self._together(user_id, str(data["other"]), bool(data["still_apart"]), bool(data["contacts"]))
        elif kind == bus.DROP_CONTACT:
            self._drop_contact(user_id, str(data["other"]))
        elif kind == bus.STATUS:
            if (state := self.users.get(user_id)) is not None:
                state.status = str(data["status"])
        elif kind == bus.SETTINGS:
            if (state := self.users.get(user_id)) is not None:
                state.read_receipts, state.online_status = bool(data["read_receipts"]), bool(data["online_status"])
        elif kind == bus.CLOSE:
            self._close_user_here(user_id, str(data["reason"]))

    async def _committed_elsewhere(self, user_id: str, message: StoredMessage) -> None:
        """Another node committed ``message``: this node's connections of ``user_id`` that have
        not joined its conversation (a joined one hears it from its room) get the unread count,
        and their delivery is recorded (the first node to record it sends the receipt)."""
        state = self.users.get(user_id)
        if state is None:
            return
        conversation_id = message.conversation_id
        peers = [peer for peer in state.peers.values() if conversation_id not in peer.joined]
        if not peers:
            return
        await self._published_outside([_DeliveryJob(message, {user_id: peers}, ())])

    async def _subscribe(self, user_id: str) -> None:
        """Hear the user's topic while a connection of theirs is here or being admitted (each
        counts; the last one's close or release unsubscribes)."""
        if self.broker is not None:
            await self.broker.subscribe([user_topic(user_id)])

    async def _unsubscribe(self, user_id: str) -> None:
        if self.broker is not None:
            await self.broker.unsubscribe([user_topic(user_id)])

    async def _admit(self, request: _Admit) -> None:
        state = self.users.setdefault(request.user_id, _User(request.username))
        member = str(next(self._members))
        try:
            allowed = self.closing is None and await self.registry.admit(request.user_id, member, request.limit)
        except Exception as exc:  # noqa: BLE001 - the handshake learns it (and is refused with 503)
            _failures.exception(exc, "presence registry failed on an admission")
            self._forget_if_idle(request.user_id, state)
            request.reply.fail(RegistryUnavailable("the presence registry cannot be reached"))
            return
        if allowed:
            state.admissions.append(member)
            # Subscribed before the handshake is accepted: whatever is addressed to the user
            # after the client sees connection:established reaches this node.
            await self._subscribe(request.user_id)
        else:
            self._forget_if_idle(request.user_id, state)
        request.reply.set(allowed)

    async def _connect(self, request: _Connect) -> None:
        peer = request.peer
        state = self.users[peer.user_id]
        member = state.admissions.pop()
        state.members[peer.id] = member
        state.username = peer.username
        state.contacts = set(request.contacts)
        if not state.peers:  # with connections open, the live settings are the newest
            state.read_receipts = request.settings.read_receipts
            state.online_status = request.settings.online_status
            state.apart = set(request.apart)
        state.peers[peer.id] = peer
        if len(state.peers) == 1:
            self._gauge(1)
        state.grace_generation += 1  # a pending offline announcement is void now
        state.grace_pending = False
        # The registry decides (once for every node) whether this is the user's first open
        # connection while their contacts do not see them; appearing offline lasts a session.
        if self.closing is not None:
            peer.request_close(self.closing)  # it stays an admission: nobody is told it came
            return
        try:
            announce = await self.registry.opened(peer.user_id, member, state.online_status)
        except RegistryUnavailable:
            self.unfinished.append(("open", peer.user_id, member))  # told once Redis answers again
            return
        if announce:  # the registry began a new session: an earlier "appear offline" is over
            state.status = "online"
            self._announce(peer.user_id, state.username, state.contacts, online=True)

    async def _release(self, user_id: str) -> None:
        """Give back one admission of the user (a handshake that did not become a connection)."""
        state = self.users.get(user_id)
        if state is None or not state.admissions:
            return  # nothing reserved: already given back
        member = state.admissions.pop()
        self._forget_if_idle(user_id, state)
        await self.registry.release(user_id, member)
        await self._unsubscribe(user_id)

    async def _disconnect(self, peer: Peer) -> bool:
        """Forget the connection; ``True`` if presence held it. A connection whose ``connect``
        request never arrived (cancelled while waiting for room in the inbox) gives back its
        admission instead."""
        state = self.users.get(peer.user_id)
        if state is None:
            return False
        if state.peers.pop(peer.id, None) is None:
            await self._release(peer.user_id)
            return False
        member = state.members.pop(peer.id)
        if not state.peers:
            self._gauge(-1)
        try:
            last = await self.registry.closed(peer.user_id, member, self.grace)
        except RegistryUnavailable:
            self.unfinished.append(("close", peer.user_id, member))  # finished once Redis answers again
            self._forget_if_idle(peer.user_id, state)
            return True
        self._closed(peer.user_id, last)
        return True

    def _closed(self, user_id: str, last_anywhere: bool) -> None:
        state = self.users.get(user_id)
        if last_anywhere and (state is None or not state.peers):
            if state is None:  # forgotten meanwhile: the announcement reads the store (no username here)
                state = self.users[user_id] = _User("")
            self._start_grace(user_id, state, self.grace)
        elif state is not None:
            self._forget_if_idle(user_id, state)

    async def _resync_unread(self, since: float) -> None:
        connected = [user_id for user_id, state in self.users.items() if state.peers]
        if not connected:
            return
        counts = await self.store.call(partial(Store.unread_since, user_ids=connected, since=since))
        for conversation_id, user_id, unread_count, last_message in counts:
            state = self.users.get(user_id)
            if state is None:
                continue
            frame = self.frames.event("conversation:unread", unread_data(conversation_id, unread_count, last_message))
            for peer in state.peers.values():
                if conversation_id not in peer.joined:  # a joined one got the messages from its room
                    peer.deliver(frame, ("unread", conversation_id))

    async def _finish_unfinished(self) -> None:
        """Tell the registry the opens and closes it missed while unreachable, in order."""
        while self.unfinished:
            what, user_id, member = self.unfinished[0]
            if what == "open":
                state = self.users.get(user_id)
                if state is not None and member in state.members.values():
                    if await self.registry.opened(user_id, member, state.online_status):
                        self._announce(user_id, state.username, state.contacts, online=True)
            else:
                self._closed(user_id, await self.registry.closed(user_id, member, self.grace))
            self.unfinished.pop(0)

    def _start_grace(self, user_id: str, state: _User, seconds: float) -> None:
        state.grace_generation += 1
        state.grace_pending = True
        heapq.heappush(self.grace_timers, (trio.current_time() + seconds, state.grace_generation, user_id))

    async def expire_grace(self) -> None:
        now = trio.current_time()
        while self.grace_timers and self.grace_timers[0][0] <= now:
            _, generation, user_id = heapq.heappop(self.grace_timers)
            state = self.users.get(user_id)
            if state is None or state.peers or generation != state.grace_generation:
                continue
            state.grace_pending = False
            try:
                await self._grace_expired(user_id)
            except RegistryUnavailable as exc:  # once a minute in the log, however many users wait
                _failures.exception(exc, "offline check: the presence registry cannot be reached; trying again")
                self._start_grace(user_id, state, GRACE_RETRY_SECONDS)

    async def _grace_expired(self, user_id: str) -> None:
        """The end of an offline check: the registry says whether this node announces it."""
        state = self.users.get(user_id)
        if state is not None and state.peers:
            return  # connected here again: the check is void (the registry agrees)
        expiry = await self.registry.grace_expired(user_id)
        if expiry.retry_in is not None:
            if state is not None:
                self._start_grace(user_id, state, expiry.retry_in)
            return
        if expiry.announce_offline:
            await self._announce_user(user_id, online=False)
        if expiry.touch_last_seen:
            # An invisible user's last-seen stays where it was when they went invisible.
            await self.store.fire(partial(Store.touch_last_seen, user_id=user_id, now=self.frames.now()))
        if state is not None:
            self._forget_if_idle(user_id, state)

    def next_deadline(self) -> float:
        return self.grace_timers[0][0] if self.grace_timers else math.inf

    async def _set_status(self, request: _SetStatus) -> None:
        user_id = request.peer.user_id
        state = self.users[user_id]
        now = self.frames.now()
        change = await self.registry.set_status(user_id, request.status, state.online_status)
        state.status = request.status
        self._share((user_id,), bus.STATUS, {"status": request.status})
        went_invisible = request.status == "offline" and change.previous != "offline"
        if change.announce is not None:
            self._announce(user_id, state.username, state.contacts, online=change.announce == "online")
        if went_invisible:  # to others, this is when they were last seen
            await self.store.fire(partial(Store.touch_last_seen, user_id=user_id, now=now))
        request.reply.set(now)

    async def _update_settings(self, request: _UpdateSettings) -> None:
        user_id = request.user_id
        try:
            settings = await self.store.call(partial(
                Store.update_settings, user_id=user_id, read_receipts=request.read_receipts,
                online_status=request.online_status, now=self.frames.now()))
        except Exception as exc:  # noqa: BLE001 - the asker learns it
            request.reply.fail(exc)
            return
        self._share((user_id,), bus.SETTINGS, {"read_receipts": settings.read_receipts,
                                               "online_status": settings.online_status})
        state = self.users.get(user_id)
        if state is not None:
            state.read_receipts, state.online_status = settings.read_receipts, settings.online_status
        try:
            announce = await self.registry.set_online_status(user_id, settings.online_status)
            if announce is not None:
                await self._announce_user(user_id, online=announce == "online")
        finally:
            request.reply.set(settings)

    async def _published(self, events: list[Published]) -> None:
        """Receipts to the senders (``message:delivered``, for deliveries the room recorded with
        the message) and ``conversation:unread`` to participants' connections outside the room,
        whose deliveries and counts take ONE store request for the whole list."""
        if self.sharing:
            for event in events:
                message = event.message
                self._share((p for p in event.participants if p != message.sender_id), bus.COMMITTED,
                            {"m": bus.message_json(message)})
        jobs = [job for event in events if (job := self._delivery_job(event)) is not None]
        if jobs:
            await self._published_outside(jobs)

    async def _published_outside(self, jobs: list[_DeliveryJob]) -> None:
        outside = [job for job in jobs if job.outside]
        results: list[tuple[dict[str, int], list[Delivery]]] = []
        if outside:
            now = self.frames.now()

            def work(store: Store) -> list[tuple[dict[str, int], list[Delivery]]]:
                return [(store.unread_counts(job.message.conversation_id, job.outside),
                         store.record_delivered_to(job.message, job.outside, now)) for job in outside]

            results = await self.store.call(work)
        counted = dict(zip((id(job) for job in outside), results))
        for job in jobs:
            counts, deliveries = counted.get(id(job), ({}, []))
            self._finish(job, counts, deliveries)

    def _delivery_job(self, event: Published) -> _DeliveryJob | None:
        """What is left to do for ``event``; ``None`` when nothing is (the usual case: every
        connection of its participants joined the room, which did it all, on one node)."""
        message = event.message
        sender = message.sender_id
        outside: dict[str, list[Peer]] = {}
        for user_id in event.participants:
            if user_id != sender and (state := self.users.get(user_id)) is not None:
                peers = [p for p in state.peers.values() if p.id not in event.joined_connections]
                if peers:
                    outside[user_id] = peers
        if not outside and not self.sharing and not self._elsewhere(sender, event.joined_connections):
            return None  # _finish would send nothing
        return _DeliveryJob(message, outside, event.deliveries, event.joined_connections)

    def _elsewhere(self, user_id: str, joined: frozenset[str]) -> bool:
        """Whether ``user_id`` has a connection here outside the room (``joined``)."""
        state = self.users.get(user_id)
        return state is not None and any(peer_id not in joined for peer_id in state.peers)

    def _finish(self, job: _DeliveryJob, counts: dict[str, int], deliveries: list[Delivery]) -> None:
        conversation_id = job.message.conversation_id
        for user_id, peers in job.outside.items():
            frame = self.frames.event("conversation:unread", unread_data(conversation_id, counts[user_id],
                                                                         job.message))
            for peer in peers:
                peer.deliver(frame, ("unread", conversation_id))
        sender = job.message.sender_id
        state = self.users.get(sender)
        if job.recorded and (self.sharing or self._elsewhere(sender, job.joined)):
            for delivery in job.recorded:  # the room gave these to the sender's joined connections
                frame = self.frames.event("message:delivered", delivered_data(delivery))
                self._deliver_here((sender,), frame, skip=job.joined)
                self._share((sender,), bus.FRAME, {"frame": frame, "except": None, "key": bus.key_json(None)})
        if self.sharing or state is not None:
            for delivery in deliveries:
                self._deliver((sender,), self.frames.event("message:delivered", delivered_data(delivery)))


@attrs.frozen
class _DeliveryJob:
    """What one published message still needs once its deliveries are recorded."""

    message: StoredMessage
    outside: dict[str, list[Peer]]  # recipient -> its connections that have not joined the room
    recorded: tuple[Delivery, ...]  # deliveries the room recorded with the message
    joined: frozenset[str] = frozenset()  # connections in the room (they had ``recorded``'s receipts from it)


async def run_registry_upkeep(registry: PresenceRegistry, presence: PresenceHandle, grace: float, *,
                              interval: float = HEARTBEAT_SECONDS) -> None:
    """In a cluster: heartbeat every ``interval`` seconds; prune dead nodes' members (their users
    get an offline check); hand due offline checks to presence, whichever node left them. A
    failing registry is logged (throttled) and tried again at the next beat."""
    first = True
    while True:
        try:
            if not await registry.heartbeat() and not first:
                await presence.register_again()  # Redis lost our state, or took us for dead
            first = False
            await presence.finish_unfinished()
            due = set(await registry.sweep(grace)) | set(await registry.due())
            if due:
                await presence.check_grace(sorted(due))
        except Exception as exc:  # noqa: BLE001 - Redis down: the next beat tries again
            _failures.exception(exc, "presence registry upkeep failed")
        await trio.sleep(interval)


async def run_presence(frames: Frames, store: StoreHandle, *, grace: float, online_gauge: object = None,
                       inbox_size: int = 4096, broker: Broker | None = None,
                       registry: PresenceRegistry | None = None,
                       task_status: trio.TaskStatus[PresenceHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve presence until the inbox is closed or the task is cancelled. ``registry``: the
    shared presence state (None: this node's alone)."""
    send, receive = trio.open_memory_channel[PresenceRequest](inbox_size)
    presence = _Presence(frames, store, grace, online_gauge, broker, registry)
    task_status.started(PresenceHandle(send, presence.connections_here, presence.sharing))
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
                except Exception as exc:  # a bug must not take every user's presence down with it
                    _failures.exception(exc, "presence failed on a request")
            try:
                await presence.expire_grace()
            except Exception as exc:  # as above: an offline check that failed (the store) is lost, not the node
                _failures.exception(exc, "presence failed on an offline check")
