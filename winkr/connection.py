"""The connection actor: one per WebSocket.

Owns its principal, its outbox (its mailbox), the rooms it has joined, its inbound budget
and its heartbeat. Two tasks: the reader (this task: decode → budget → validate → route to
a handler, ``winkr.handlers.registry``) and the writer (outbox → socket, and the heartbeat).
Everything that goes wrong inside is caught here, so one bad connection never takes the
server down. Other actors reach a connection only through its ``Peer``: a frame into its
outbox, or a request to close.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict
from functools import partial

import trio
from trio_websocket import ConnectionClosed

from winkr.auth import Principal
from winkr.clock import iso
from winkr.errors import CONVERSATION_FULL, INTERNAL_ERROR, MESSAGE_TOO_LARGE, VALIDATION_ERROR, ProtocolError
from winkr.handlers.catchup import send_unread_summary
from winkr.handlers.context import Json, RoomCall
from winkr.handlers.registry import ROUTES
from winkr.handlers.session import open_session
from winkr.logs import ThrottledLog
from winkr.outbox import Outbox
from winkr.peer import Peer
from winkr.protocol.codec import EnvelopeError, parse_envelope
from winkr.protocol.requests import ConversationRef, MessageHistory, MessageRef, MessageSend, structure_request
from winkr.protocol.wire import settings_object
from winkr.ratelimit import Limits, Rate, rate_limited
from winkr.room import Depart, RoomHandle, RoomMessage, RoomRetired
from winkr.services import Services
from winkr.transport import Pong, WinkrWebSocket, abort, direct_writer, send_frames, send_ping

log = logging.getLogger("winkr.connection")
_failures = ThrottledLog(log)

CLOSE_CODES = {"normal_closure": 1000, "server_shutdown": 1001, "protocol_error": 1002,
               "invalid_payload": 1007, "message_too_large": 1009, "internal_error": 1011,
               "token_expired": 4001, "pong_timeout": 4002, "slow_consumer": 4003, "disconnected": 4004}
CLOSE_FLUSH_SECONDS = 2.0
MAX_FRAMES_PER_WRITE = 64
MAX_CHARS_PER_WRITE = 256 * 1024
EXTRA_CACHED_ROOMS = 32  # room handles kept for rooms this connection talks to without joining
_ROOM_EVENTS = (MessageSend, MessageRef, ConversationRef, MessageHistory)


class _OverBudget(Exception):
    def __init__(self, error: ProtocolError, wait: float) -> None:
        super().__init__(error.message)
        self.error, self.wait = error, wait


class Connection:
    """One client connection; ``run`` serves it. Implements ``handlers.context.ConnectionContext``."""

    __slots__ = ("ws", "_principal", "_services", "_id", "_outbox", "_peer", "_rooms", "_joined",
                 "close_reason", "_registered", "_left", "_socket_gone", "_write_interrupted", "_scope",
                 "_budget_tat", "_send_budget")

    def __init__(self, ws: WinkrWebSocket, principal: Principal, services: Services) -> None:
        self.ws = ws
        self._principal = principal
        self._services = services
        self._id = secrets.token_hex(8)
        limits = services.settings.limits
        self._outbox = Outbox(limits.outbound_queue, limits.outbound_queue_bytes, limits.slow_consumer_seconds)
        direct = direct_writer(ws, services.frames.metrics)
        if direct is not None:  # a TCP socket: actors' bursts are written without waking the writer
            self._outbox.attach_direct(direct, MAX_FRAMES_PER_WRITE, MAX_CHARS_PER_WRITE)
        self._joined: set[str] = set()
        self._peer = Peer(self._id, principal.user_id, principal.username, principal.avatar_url,
                          principal.is_service, self._outbox, self._joined)
        self._rooms: OrderedDict[str, RoomHandle] = OrderedDict()  # a cache: the hub knows every room
        self.close_reason: str | None = None
        self._registered = False  # whether presence holds this connection (else: its admission)
        self._left = False
        self._socket_gone = False
        self._write_interrupted = False  # a write was cut mid-frame: no goodbye can follow
        self._scope: trio.CancelScope | None = None
        self._budget_tat = -math.inf
        self._send_budget = Limits()
        ws.goodbye = self._goodbye_frame

    # --- ConnectionContext ------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def principal(self) -> Principal:
        return self._principal

    @property
    def peer(self) -> Peer:
        return self._peer

    @property
    def services(self) -> Services:
        return self._services

    async def reply(self, event: str, data: Json, ref: str | None) -> None:
        await self._put(self._services.frames.event(event, data, ref))

    async def to_room(self, conversation_id: str, call: RoomCall) -> None:
        await self._to_room(conversation_id, call)

    def check_can_join(self, conversation_id: str) -> None:
        limit = self._services.settings.limits.joined_per_connection
        if limit and conversation_id not in self._joined and len(self._joined) >= limit:
            raise ProtocolError(CONVERSATION_FULL, f"this connection has joined {limit} conversations, the most "
                                "one connection may; leave one first", field="conversation_id")

    def joined_room(self, conversation_id: str) -> bool:
        if conversation_id in self._joined:
            return False
        self._joined.add(conversation_id)
        return True

    def left_room(self, conversation_id: str) -> None:
        self._joined.discard(conversation_id)

    def refresh_principal(self, principal: Principal) -> None:
        self._principal = principal
        self._set_expiry(principal.expires_at)

    def charge(self, units: int) -> None:
        rate = self._services.settings.limits.inbound_events_per_second
        if rate and units > 0:
            self._budget_tat = max(self._budget_tat, trio.current_time()) + units / rate

    def check_send_budget(self) -> None:
        rates = self._services.message_rates
        if not rates:  # every message window off: no clock read
            return
        now = self._services.frames.now()
        for rate in rates:
            if wait := self._send_budget.would_allow("send", rate, now):
                raise rate_limited(rate, wait, "messages")

    def count_send(self) -> None:
        rates = self._services.message_rates
        if not rates:
            return
        now = self._services.frames.now()
        for rate in rates:
            self._send_budget.hit("send", rate, now)

    # --- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client leaves or the server closes it. Returns once
        the socket is closed; never raises (one connection's failure stays its own)."""
        services = self._services
        try:
            # The writer lives outside the reader's scope: when the connection closes it still
            # sends what was queued (an error, an acknowledgement) and the goodbye.
            async with trio.open_nursery() as outer:
                outer.start_soon(self._write_outbox)
                with trio.CancelScope() as self._scope:
                    self._outbox.interrupt_on_close(self._scope)
                    self._set_expiry(self._principal.expires_at)
                    session = await services.store.call(partial(open_session, principal=self._principal))
                    await self.reply("connection:established", {
                        "user_id": self._principal.user_id, "connection_id": self._id,
                        "timestamp": iso(services.frames.now()), "settings": settings_object(session.settings)},
                        None)
                    # Registered from the moment the request may reach presence: if the client
                    # leaves while this waits for the answer, presence holds the peer all the
                    # same, and the disconnect that follows (FIFO) must take it out again.
                    self._registered = True
                    await services.presence.connect(self._peer, session.contacts, session.settings, session.apart)
                    if session.revoked:
                        self._outbox.request_close("disconnected")
                    await send_unread_summary(self)
                    await self._read_frames()
                if self.close_reason is None:
                    self.close_reason = self._outbox.close_request
                if self._scope.cancelled_caught and self.close_reason is None and not self._socket_gone:
                    self.close_reason = "token_expired"
                await self._leave_everything()
                if self.close_reason == "slow_consumer":
                    self._outbox.discard()  # a slow client's backlog stays behind; history has it
                if self._socket_gone:
                    outer.cancel_scope.cancel()
                else:
                    outer.cancel_scope.deadline = trio.current_time() + CLOSE_FLUSH_SECONDS
        except Exception as exc:  # the connection's exception barrier
            _failures.exception(exc, "connection %s (user %s) failed", self._id, self._principal.user_id)
            self.close_reason = "internal_error"
        finally:
            with trio.CancelScope(shield=True):
                await self._leave_everything()
                with trio.move_on_after(CLOSE_FLUSH_SECONDS):
                    await self._close_socket()

    def _set_expiry(self, expires_at: float) -> None:
        """The reader's scope ends when the token does."""
        if self._scope is not None:
            self._scope.deadline = trio.current_time() + (expires_at - self._services.frames.now())

    async def _leave_everything(self) -> None:
        """Leave every room, tell presence, close the outbox. Once; bounded in time."""
        if self._left:
            return
        self._left = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_FLUSH_SECONDS):
            try:
                for conversation_id in list(self._joined):
                    await self._to_room(conversation_id, Depart(self._peer))
                if self._registered:
                    await self._services.presence.disconnect(self._peer)
                else:
                    await self._services.presence.release(self._principal.user_id)
            except trio.BrokenResourceError:
                pass  # the server is going down around us: nothing left to leave
        self._outbox.close()

    def _goodbye_frame(self, reason: str, code: int) -> str:
        return self._services.frames.event("connection:closed", {
            "reason": reason, "code": code, "timestamp": iso(self._services.frames.now())})

    async def _close_socket(self) -> None:
        if self.ws.protocol_error is not None:  # the transport said goodbye itself
            self.close_reason = self.ws.protocol_error[1]
            return
        reason = self.close_reason
        if self._write_interrupted:  # a frame was cut in half: nothing more can be said
            await abort(self.ws)
            return
        if reason is None or self._socket_gone:  # the client closed: nothing to tell it
            await self.ws.aclose()
            return
        code = CLOSE_CODES[reason]
        try:
            await send_frames(self.ws, [self._goodbye_frame(reason, code)])
        except ConnectionClosed:
            pass
        await self.ws.aclose(code, reason)

    # --- the writer --------------------------------------------------------------------------

    async def _write_outbox(self) -> None:
        """Outbox → socket until the outbox is closed and drained; also the heartbeat: a ping
        every ``ping_interval`` while the previous one was answered, and ``pong_timeout``
        when one stays unanswered (one task per connection for both). A socket that accepts
        nothing for twice ``slow_consumer_seconds`` is cut (the goodbye could not pass)."""
        settings = self._services.settings
        metrics = self._services.frames.metrics
        stall_limit = 2 * settings.limits.slow_consumer_seconds or math.inf
        next_ping = trio.current_time() + settings.ping_interval
        pong: Pong | None = None
        pong_deadline = math.inf
        try:
            while True:
                # One cancel scope serves every wait and write until its deadline fires; its
                # deadline is moved (the next timer while waiting, the stall limit while
                # writing) instead of a new scope per write: a scope with a deadline costs
                # ~8 µs to open and close, and their churn feeds trio's deadline heap
                # (docs/performance.md, issue 10, proposal 2).
                writing = False
                with trio.CancelScope() as timer:
                    while True:
                        timer.deadline = min(next_ping, pong_deadline)
                        try:
                            batch = await self._outbox.receive_batch(MAX_FRAMES_PER_WRITE, MAX_CHARS_PER_WRITE)
                        except trio.EndOfChannel:
                            return
                        if metrics is not None and batch:
                            metrics.frames_per_write.observe(len(batch))
                        timer.deadline = trio.current_time() + stall_limit
                        writing = True
                        try:
                            await send_frames(self.ws, batch)  # a direct write's rest goes first
                        except BaseException:
                            self._write_interrupted = not self._socket_gone
                            raise
                        writing = False
                        self._outbox.drained()
                if writing:  # the stall limit fired mid-write
                    self._write_interrupted = True
                    self._outbox.request_close("slow_consumer")
                    return
                now = trio.current_time()
                if pong is not None:
                    if not pong.arrived:
                        if now >= pong_deadline:
                            self._outbox.request_close("pong_timeout")
                            pong_deadline = math.inf
                        next_ping = now + settings.ping_interval  # the last ping is still out: wait
                        continue
                    pong, pong_deadline = None, math.inf  # answered: hold nothing until the next ping
                if now >= next_ping:
                    # A ping is a write like any other: bounded by the stall limit. Without it,
                    # a client that floods pings and reads nothing held the connection until its
                    # token expired: the reader waits in a pong's write holding the stream, so
                    # this ping waited for the stream forever and pong_timeout never came.
                    # (A scope per ping, every ping_interval: not the per-write cost above.)
                    with trio.move_on_after(stall_limit) as ping_stalled:
                        pong = await send_ping(self.ws)
                    if ping_stalled.cancelled_caught:
                        self._write_interrupted = True  # a ping may be cut mid-frame
                        self._outbox.request_close("slow_consumer")
                        return
                    pong_deadline = now + settings.pong_timeout
                    next_ping = now + settings.ping_interval
        except ConnectionClosed:
            self._socket_gone = True
            self._write_interrupted = False
            # On a protocol violation the reader is saying goodbye itself: let it finish.
            if self._scope is not None and self.ws.protocol_error is None:
                self._scope.cancel()

    # --- the reader --------------------------------------------------------------------------

    async def _read_frames(self) -> None:
        # In this task, frame by frame: no read-ahead queue and no second task (transport.py).
        await self.ws.read_frames(self.handle_frame)
        self._socket_gone = True

    async def handle_frame(self, frame: str | bytes) -> None:
        """Decode, budget, validate and route one client frame; every failure becomes an error
        event and the connection stays usable (except for an oversized frame)."""
        event: str | None = None
        ref: str | None = None
        metrics = self._services.frames.metrics
        try:
            try:
                envelope = parse_envelope(frame, self._services.settings.limits.max_frame_bytes)
            except EnvelopeError:
                self._spend_budget(1)
                raise
            event, ref = envelope.event, envelope.ref
            if metrics is not None:
                metrics.event_in(event)
            route = ROUTES.get(event)
            # The budget comes before any work beyond reading the envelope (which gives the ref).
            self._spend_budget(route.cost if route is not None else 1)
            if route is None:
                raise ProtocolError(VALIDATION_ERROR, f"unknown event {event!r}", field="event")
            request = structure_request(route.request_type, envelope.data)
            if route.on_connection is not None:
                await route.on_connection(self, request, ref)
                return
            assert isinstance(request, _ROOM_EVENTS)
            prepared = await route.prepare(self, request) if route.prepare is not None else None
            # (perf_counter, not trio's clock: a metric's duration, read for a tenth of the cost)
            await self._to_room(request.conversation_id, RoomCall(route, self._peer, request, ref, prepared,
                                                                  time.perf_counter()))
        except _OverBudget as exc:
            await self._reply_error(exc.error, event, ref)
            # Read nothing more from this client until the budget allows it: a flood then
            # costs one refusal per wait, and the rest waits in the client's TCP buffers.
            await trio.sleep(exc.wait)
        except EnvelopeError as exc:
            await self._reply_error(exc, exc.request_event, exc.ref)
            if exc.code == MESSAGE_TOO_LARGE:
                self._outbox.request_close("message_too_large")
        except ProtocolError as exc:
            await self._reply_error(exc, event, ref)
        except Exception as exc:
            _failures.exception(exc, "handler for %s failed on connection %s", event, self._id)
            await self._reply_error(ProtocolError(INTERNAL_ERROR, "internal error"), event, ref)

    def _spend_budget(self, cost: int) -> None:
        """Take ``cost`` units of the inbound budget (GCRA: a burst of ``inbound_burst``, then
        ``inbound_events_per_second``), or raise ``_OverBudget``."""
        limits = self._services.settings.limits
        rate = limits.inbound_events_per_second
        if not rate:
            return
        interval = 1.0 / rate
        now = trio.current_time()
        tat = max(self._budget_tat, now) + cost * interval
        wait = tat - now - max(limits.inbound_burst, cost) * interval
        if wait <= 0:
            self._budget_tat = tat
            return
        raise _OverBudget(rate_limited(Rate(rate, "second"), wait, "events on this connection"), wait)

    async def _reply_error(self, exc: ProtocolError, request_event: str | None, ref: str | None) -> None:
        await self._put(self._services.frames.error(exc, request_event, ref))

    async def _put(self, frame: str) -> None:
        try:
            await self._outbox.put(frame)
        except trio.ClosedResourceError:
            pass  # closing: the client will not read it

    async def _to_room(self, conversation_id: str, message: RoomMessage) -> None:
        """Hand a message to the conversation's room (waking it, or finding its successor)."""
        while True:
            handle = self._rooms.get(conversation_id)
            if handle is None:
                handle = await self._services.hub.room(conversation_id)
                self._cache_room(conversation_id, handle)
            else:
                self._rooms.move_to_end(conversation_id)
            try:
                await handle.send(message)
                return
            except RoomRetired:
                self._rooms.pop(conversation_id, None)

    def _cache_room(self, conversation_id: str, handle: RoomHandle) -> None:
        self._rooms[conversation_id] = handle
        # Bounded: every joined room, plus a few recent others (oldest first out).
        while len(self._rooms) > len(self._joined) + EXTRA_CACHED_ROOMS:
            oldest = next(c for c in self._rooms if c not in self._joined)
            del self._rooms[oldest]

