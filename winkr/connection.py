"""The connection actor: one per WebSocket.

Owns its principal, its outbox, the rooms it has joined and its heartbeat. Its nursery holds
the reader (this task: decode → validate → dispatch to a handler in ``winkr.handlers``), the
writer (outbox → socket) and the heartbeat; when one ends, all end. Everything that
goes wrong inside is caught here, so one bad connection never takes the server down.
"""
from __future__ import annotations

import logging
import math
import secrets
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from winkr.actor import drain
from winkr.auth import Principal
from winkr.clock import iso
from winkr.errors import INTERNAL_ERROR, MESSAGE_TOO_LARGE, ProtocolError
from winkr.handlers import HANDLERS
from winkr.outbox import Outbox
from winkr.peer import Peer
from winkr.protocol.codec import EnvelopeError, parse_envelope
from winkr.protocol.requests import structure_request
from winkr.room import Leave, RoomHandle, RoomRetired
from winkr.services import Services
from winkr.store.store import Store
from winkr.transport import send_frames, send_ping

log = logging.getLogger("winkr.connection")

CLOSE_CODES = {"normal_closure": 1000, "server_shutdown": 1001, "message_too_large": 1009,
               "internal_error": 1011, "token_expired": 4001, "pong_timeout": 4002,
               "slow_consumer": 4003}
MAX_CACHED_ROOMS = 512
CLOSE_FLUSH_SECONDS = 2.0
MAX_FRAMES_PER_WRITE = 64


class Connection:
    __slots__ = ("ws", "principal", "s", "id", "_outbox", "peer", "rooms", "joined", "close_reason",
                 "registered", "_left", "_socket_gone", "_scope", "opened_at")

    def __init__(self, ws: WebSocketConnection, principal: Principal, services: Services) -> None:
        self.ws = ws
        self.principal = principal
        self.s = services
        self.id = secrets.token_hex(8)
        limits = services.settings.limits
        self._outbox = Outbox(limits.outbound_queue_size)
        self.peer = Peer(self.id, principal.user_id, principal.username, principal.avatar_url,
                         principal.is_service, self._outbox, self.close_soon)
        self.rooms: dict[str, RoomHandle] = {}
        self.joined: set[str] = set()
        self.close_reason: str | None = None
        self.registered = False  # whether presence holds this connection (else: its admission)
        self._left = False
        self._socket_gone = False
        self._scope: trio.CancelScope | None = None
        self.opened_at = trio.current_time()

    # --- closing ---------------------------------------------------------------------

    def close_soon(self, reason: str) -> None:
        """Ask the connection to close with ``reason`` (from any task; never blocks)."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    def set_expiry(self, expires_at: float) -> None:
        """(Re)arm the token expiry: the connection's scope ends when the token does."""
        assert self._scope is not None
        self._scope.deadline = trio.current_time() + (expires_at - self.s.frames.now())

    # --- the actor -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client leaves or the server closes it."""
        self.peer.deliver(self.s.frames.event("connection:established", {
            "user_id": self.principal.user_id, "connection_id": self.id,
            "timestamp": iso(self.s.frames.now())}))
        try:
            # The outbox writer lives outside the connection's scope: when the connection
            # closes it still drains what was queued (an error, an acknowledgement) first.
            async with trio.open_nursery() as outer:
                outer.start_soon(self._write_outbox)
                with trio.CancelScope() as self._scope:
                    self.set_expiry(self.principal.expires_at)
                    contacts = await self.s.store.call(self._register_user)
                    await self.s.presence.connect(self.peer, contacts)
                    self.registered = True
                    await self._send_unread_summary()
                    await self._read_frames()
                if self._scope.cancelled_caught and self.close_reason is None and not self._socket_gone:
                    self.close_reason = "token_expired"
                await self._leave_everything()
                if self.close_reason == "slow_consumer" or self._socket_gone:
                    outer.cancel_scope.cancel()  # a slow client's backlog stays behind; history has it
                else:
                    outer.cancel_scope.deadline = trio.current_time() + CLOSE_FLUSH_SECONDS
        except Exception:  # the connection's exception barrier
            log.exception("connection %s (user %s) failed", self.id, self.principal.user_id)
            self.close_reason = "internal_error"
        finally:
            with trio.CancelScope(shield=True):
                await self._leave_everything()
                with trio.move_on_after(CLOSE_FLUSH_SECONDS):
                    await self._close_socket()

    def _register_user(self, store: Store) -> set[str]:
        store.upsert_user(self.principal.user_id, self.principal.username, self.principal.avatar_url)
        return store.contacts(self.principal.user_id)

    async def _leave_everything(self) -> None:
        """Leave every room, tell presence, close the outbox. Once; bounded in time."""
        if self._left:
            return
        self._left = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_FLUSH_SECONDS):
            for conversation_id in list(self.joined):
                await self.to_room(conversation_id, Leave(self.peer, None, reply=False))
            if self.registered:
                await self.s.presence.disconnect(self.peer)
            else:
                await self.s.presence.release(self.principal.user_id)
        self._outbox.close()

    async def _close_socket(self) -> None:
        reason = self.close_reason
        if reason is None or self._socket_gone:  # the client closed; nothing to tell it
            await self.ws.aclose()
            return
        code = CLOSE_CODES[reason]
        try:
            await self.ws.send_message(self.s.frames.event("connection:closed", {
                "reason": reason, "code": code, "timestamp": iso(self.s.frames.now())}))
        except ConnectionClosed:
            pass
        await self.ws.aclose(code, reason)

    # --- tasks -----------------------------------------------------------------------

    async def _write_outbox(self) -> None:
        """Outbox → socket until the outbox is closed and drained; also the heartbeat: a ping
        every ``ping_interval`` while the previous one was answered, and ``pong_timeout``
        when one stays unanswered (one task per connection instead of two)."""
        settings, metrics = self.s.settings, self.s.frames.metrics
        next_ping = trio.current_time() + settings.ping_interval
        pong: trio.Event | None = None
        pong_deadline = math.inf
        try:
            while True:
                frame = None
                with trio.move_on_at(min(next_ping, pong_deadline)):
                    try:
                        frame = await self._outbox.receive()
                    except trio.EndOfChannel:
                        return
                if frame is not None:
                    batch = drain(self._outbox, frame, MAX_FRAMES_PER_WRITE)
                    if metrics is not None:
                        metrics.frames_per_write.observe(len(batch))
                    await send_frames(self.ws, batch)
                    continue
                now = trio.current_time()
                if pong is not None and not pong.is_set():
                    if now >= pong_deadline:
                        self.close_soon("pong_timeout")
                        pong_deadline = math.inf
                    next_ping = now + settings.ping_interval  # the last ping is still out: wait
                    continue
                if now >= next_ping:
                    pong = await send_ping(self.ws)
                    pong_deadline = now + settings.pong_timeout
                    next_ping = now + settings.ping_interval
        except ConnectionClosed:
            self._socket_gone = True
            if self._scope is not None:
                self._scope.cancel()

    async def _read_frames(self) -> None:
        while True:
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return
            await self.handle_frame(frame)

    async def handle_frame(self, frame: str | bytes) -> None:
        """Decode, validate and dispatch one client frame; every failure becomes an error
        event and the connection stays usable (except for an oversized frame)."""
        event: str | None = None
        ref: str | None = None
        try:
            envelope = parse_envelope(frame, self.s.settings.limits.max_frame_bytes)
            event, ref = envelope.event, envelope.ref
            if self.s.frames.metrics is not None:
                self.s.frames.metrics.event_in(event)
            request = structure_request(envelope.event, envelope.data)
            await HANDLERS[envelope.event](self, request, ref)
        except EnvelopeError as exc:
            self.reply_error(exc, exc.request_event, exc.ref)
            if exc.code == MESSAGE_TOO_LARGE:
                self.close_soon("message_too_large")
        except ProtocolError as exc:
            self.reply_error(exc, event, ref)
        except Exception:
            log.exception("handler for %s failed on connection %s", event, self.id)
            self.reply_error(ProtocolError(INTERNAL_ERROR, "internal error"), event, ref)

    # --- helpers for handlers --------------------------------------------------------

    def reply(self, event: str, data: dict[str, Any], ref: str | None) -> None:
        self.peer.deliver(self.s.frames.event(event, data, ref))

    def reply_error(self, exc: ProtocolError, request_event: str | None, ref: str | None) -> None:
        self.peer.deliver(self.s.frames.error(exc, request_event, ref))

    async def to_room(self, conversation_id: str, request: Any) -> None:
        """Hand a request to the conversation's room (waking it, or finding its successor)."""
        while True:
            handle = self.rooms.get(conversation_id)
            if handle is None:
                if len(self.rooms) >= MAX_CACHED_ROOMS:
                    self.rooms = {c: h for c, h in self.rooms.items() if c in self.joined}
                handle = self.rooms[conversation_id] = await self.s.hub.room(conversation_id)
            try:
                await handle.send(request)
                return
            except RoomRetired:
                self.rooms.pop(conversation_id, None)

    async def _send_unread_summary(self) -> None:
        from winkr.handlers.catchup import send_unread_summary

        await send_unread_summary(self)
