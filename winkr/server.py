"""The composition root: starts the actors, accepts WebSockets, shuts down gracefully.

Supervision follows the nursery tree: the store writer, rate limiter, presence, hub (with
its rooms) and reaper live in the actors' nursery; connections live in their own nursery,
which closes first on shutdown so that every connection can still say goodbye.
"""
from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from winkr.actor import Frames
from winkr.auth import Principal, TokenVerifier, token_from_handshake
from winkr.clock import WallClock, system_wall_clock
from winkr.config import Settings
from winkr.connection import Connection
from winkr.errors import CONNECTION_ERROR, FORBIDDEN, NOT_FOUND, RATE_LIMITED, UNAUTHORIZED, ProtocolError
from winkr.hub import HubHandle, run_hub
from winkr.metrics import Metrics
from winkr.policy import PolicySettings
from winkr.presence import run_presence
from winkr.ratelimit import Rate, run_rate_limiter
from winkr.reaper import open_reaper_channel, run_reaper
from winkr.room import RoomServices
from winkr.services import Services
from winkr.store.checkpointer import run_checkpointer
from winkr.store.schema import open_database
from winkr.store.store import Store
from winkr.store.writer import RunSync, run_store_writer
from winkr.webhooks import DEFAULT_BACKOFF, Backoff, SenderConfig, open_webhook_channel, run_webhook_sender

log = logging.getLogger("winkr.server")

ROOM_IDLE_SECONDS = 60.0
WS_PATH = "/ws"
RECEIVE_QUEUE = 8  # frames trio-websocket may read ahead of the connection's reader
RECEIVE_BUFFER = 64 * 1024
LIBRARY_FRAME_LIMIT = 1024 * 1024
RUNTIME_SAMPLE_SECONDS = 2.0  # bytes per socket read: a burst of frames in one syscall


class HandshakeRefused(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: float = 0.0,
                 limit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after, self.limit = retry_after, limit

    def body(self) -> bytes:
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            data["details"] = {"retry_after": max(0.001, round(self.retry_after, 3)), "limit": self.limit}
        return orjson.dumps({"event": "error", "data": data})


def _library_frame_limit(max_frame_bytes: int) -> int:
    """trio-websocket closes 1009 by itself above this: keep it well above our own limit so
    that an oversized frame normally gets our MESSAGE_TOO_LARGE and connection:closed."""
    return max(LIBRARY_FRAME_LIMIT, 4 * max_frame_bytes) if max_frame_bytes else 16 * LIBRARY_FRAME_LIMIT


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _remote_ip(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        return str(sock.getpeername()[0])
    return "local"


class Server:
    """One winkr server. ``serve`` runs it; ``handle_stream`` serves one byte stream (a TCP
    connection, or an in-memory stream in tests)."""

    def __init__(self, settings: Settings, secret: str | None, *, clock: WallClock = system_wall_clock,
                 run_sync: RunSync = trio.to_thread.run_sync, webhook_transport: Any = None,
                 webhook_backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.settings = settings
        self.clock = clock
        self.run_sync = run_sync
        self.webhook_transport = webhook_transport  # tests: an httpx transport instead of the network
        self.webhook_backoff = webhook_backoff
        self.metrics = Metrics()
        self.frames = Frames(clock, self.metrics)
        self.verifier = TokenVerifier(settings, secret)
        self.policy = PolicySettings(
            blocked_words=settings.blocked_words, pii_policy=settings.pii_policy,
            max_text_chars=settings.max_text_chars, max_encrypted_chars=settings.max_encrypted_chars,
            max_photo_bytes=settings.max_photo_bytes, max_url_chars=settings.max_url_chars)
        self.services: Services | None = None
        self._shutdown = trio.Event()
        self._connections: trio.Nursery | None = None
        self.ports: list[int] = []

    def request_shutdown(self) -> None:
        self._shutdown.set()

    # --- running -----------------------------------------------------------------------

    async def serve(self, listeners: list[trio.SocketListener] | None = None, *,
                    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``request_shutdown``; then close every connection and return."""
        settings = self.settings
        db = await self.run_sync(open_database, settings.db, settings.sqlite_synchronous)
        try:
            async with trio.open_nursery() as actors:
                await self._start_actors(actors, Store(db))
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    async with trio.open_nursery() as listening:
                        if listeners is None:
                            listeners = list(await trio.open_tcp_listeners(settings.port, host=settings.host))
                        self.ports = [lsn.socket.getsockname()[1] for lsn in listeners if hasattr(lsn, "socket")]
                        if listeners:  # none in tests that hand streams to handle_stream
                            await listening.start(partial(trio.serve_listeners, self.handle_stream,
                                                          listeners, handler_nursery=connections))
                        task_status.started(self)
                        await self._shutdown.wait()
                        listening.cancel_scope.cancel()
                    log.info("shutting down: closing connections")
                    assert self.services is not None
                    await self.services.presence.close_all("server_shutdown")
                    connections.cancel_scope.deadline = trio.current_time() + settings.shutdown_timeout
                actors.cancel_scope.cancel()
        finally:
            await self.run_sync(db.close)
        log.info("stopped")

    async def _start_actors(self, nursery: trio.Nursery, store: Store) -> None:
        settings, frames = self.settings, self.frames
        store_handle = await nursery.start(partial(run_store_writer, store, self.run_sync,
                                                   metrics=self.metrics))
        nursery.start_soon(run_checkpointer, settings.db, self.run_sync)
        limiter = await nursery.start(run_rate_limiter, self.clock)
        presence = await nursery.start(partial(run_presence, frames, store_handle,
                                               grace=settings.presence_grace,
                                               online_gauge=self.metrics.online_users))
        reaper, reaper_inbox = open_reaper_channel()
        webhooks, webhook_inbox = open_webhook_channel(settings)
        if webhook_inbox is not None:
            await nursery.start(partial(
                run_webhook_sender, store_handle, SenderConfig.from_settings(settings, self.webhook_backoff),
                webhooks, webhook_inbox, clock=self.clock, metrics=self.metrics,
                transport=self.webhook_transport))
        limits = settings.limits
        message_rates = tuple(Rate(n, period) for n, period in (
            (limits.messages_per_minute, "minute"), (limits.messages_per_hour, "hour"),
            (limits.messages_per_day, "day")) if n)

        def room_services(hub: HubHandle) -> RoomServices:
            return RoomServices(frames, store_handle, presence, hub.room, hub.retire, reaper.nudge,
                                settings.typing_timeout, settings.max_room_connections,
                                ROOM_IDLE_SECONDS, message_rates, webhooks)

        hub = await nursery.start(partial(run_hub, room_services, rooms_gauge=self.metrics.rooms))
        nursery.start_soon(run_reaper, store_handle, hub.room, self.clock, reaper_inbox)
        self.services = Services(settings, frames, self.verifier, self.policy, store_handle, presence,
                                 hub, reaper, limiter, webhooks)
        nursery.start_soon(self._sample_runtime)

    async def _sample_runtime(self) -> None:
        """Keep the task-count gauge fresh (the scrape runs on another thread, so it cannot ask
        trio itself)."""
        while True:
            self.metrics.tasks.set(trio.lowlevel.current_statistics().tasks_living)
            await trio.sleep(RUNTIME_SAMPLE_SECONDS)

    # --- one connection ----------------------------------------------------------------

    def accept_stream(self, stream: trio.abc.Stream) -> None:
        """Serve a stream that did not come from a listener (an in-memory one in tests) in
        the connections nursery, so shutdown treats it like any other connection."""
        assert self._connections is not None, "the server is not running"
        self._connections.start_soon(self.handle_stream, stream)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client stream: handshake (within the timeout), then the connection."""
        ip = _remote_ip(stream)
        limits = self.settings.limits
        try:
            async with trio.open_nursery() as nursery:
                request = None
                with trio.move_on_after(self.settings.handshake_timeout):
                    request = await wrap_server_stream(
                        nursery, stream, max_message_size=_library_frame_limit(limits.max_frame_bytes),
                        message_queue_size=RECEIVE_QUEUE, receive_buffer_size=RECEIVE_BUFFER)
                if request is not None:
                    await self._serve_request(request, ip)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - one bad stream must not stop the listener
            log.debug("stream from %s ended with %r", ip, exc, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_request(self, request: WebSocketRequest, ip: str) -> None:
        assert self.services is not None
        try:
            principal, subprotocol = await self._check_handshake(request, ip)
        except HandshakeRefused as refusal:
            await self._refuse(request, ip, refusal)
            return
        services = self.services
        try:
            ws = await request.accept(subprotocol=subprotocol)
        except BaseException:
            with trio.CancelScope(shield=True):
                await services.presence.release(principal.user_id)
            raise
        connection = Connection(ws, principal, services)
        started = trio.current_time()
        self.metrics.connections.inc()
        self.metrics.handshakes_accepted.inc()
        log.info("connection open", extra={"user_id": principal.user_id, "connection_id": connection.id})
        try:
            await connection.run()
        finally:
            self.metrics.connections.dec()
            self.metrics.closes.labels(connection.close_reason or "client_closed").inc()
            log.info("connection closed", extra={
                "user_id": principal.user_id, "connection_id": connection.id,
                "reason": connection.close_reason or "client_closed",
                "duration_s": round(trio.current_time() - started, 3)})

    async def _check_handshake(self, request: WebSocketRequest, ip: str) -> tuple[Principal, str | None]:
        assert self.services is not None
        services, settings = self.services, self.settings
        limits = settings.limits
        ip_rate = Rate(limits.failed_handshakes_per_minute_per_ip, "minute")
        if ip_rate.count and (wait := await services.limiter.check(f"failed\x1f{ip}", ip_rate)):
            raise HandshakeRefused(429, RATE_LIMITED, "too many failed handshakes from this address",
                                   wait, ip_rate.label)
        if urlsplit(request.path).path != WS_PATH:
            raise HandshakeRefused(404, NOT_FOUND, f"the WebSocket endpoint is {WS_PATH}")
        origin = _header(request, b"origin")
        if settings.allowed_origins and origin is not None and origin not in settings.allowed_origins:
            raise HandshakeRefused(403, FORBIDDEN, "origin not allowed")
        found = token_from_handshake(request.headers, request.path, request.proposed_subprotocols)
        if not found.token:
            raise HandshakeRefused(401, UNAUTHORIZED, "missing token")
        try:
            principal = self.verifier.verify(found.token, self.clock())
        except ProtocolError as exc:
            raise HandshakeRefused(401, UNAUTHORIZED, exc.message) from None
        conn_rate = Rate(limits.connections_per_minute, "minute")
        user_key = f"connect\x1f{principal.user_id}"
        if conn_rate.count and (wait := await services.limiter.check(user_key, conn_rate)):
            raise HandshakeRefused(429, RATE_LIMITED, f"too many new connections: limit {conn_rate.label}",
                                   wait, conn_rate.label)
        if not await services.presence.admit(principal.user_id, principal.username, limits.connections_per_user):
            raise HandshakeRefused(429, CONNECTION_ERROR,
                                   f"at most {limits.connections_per_user} open connections per user")
        if conn_rate.count:
            await services.limiter.hit(user_key, conn_rate)
        return principal, found.subprotocol

    async def _refuse(self, request: WebSocketRequest, ip: str, refusal: HandshakeRefused) -> None:
        assert self.services is not None
        limits = self.settings.limits
        ip_rate = Rate(limits.failed_handshakes_per_minute_per_ip, "minute")
        if ip_rate.count:
            await self.services.limiter.hit(f"failed\x1f{ip}", ip_rate)
        self.metrics.handshakes_refused.labels(refusal.code).inc()
        if refusal.limit is not None:
            self.metrics.rate_limited.labels(refusal.limit).inc()
        log.info("handshake refused", extra={"ip": ip, "status": refusal.status, "code": refusal.code,
                                             "reason": refusal.message})
        headers = [(b"content-type", b"application/json")]
        if refusal.limit is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(refusal.retry_after))).encode()))
        await request.reject(refusal.status, extra_headers=headers, body=refusal.body())


async def serve_forever(settings: Settings, secret: str, *, on_listening: Callable[[list[int]], None]) -> None:
    """Run a server until SIGINT/SIGTERM (the CLI's entry point)."""
    import signal

    server = Server(settings, secret)
    if settings.metrics_port is not None:
        port = server.metrics.serve_http(settings.metrics_port, settings.metrics_host)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    # Signals are caught before the "listening" line, so a signal right after it is graceful.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            on_listening(server.ports)
            async for _ in signals:
                server.request_shutdown()
                break
