"""The composition root: starts the actors, accepts WebSockets, shuts down gracefully.

Supervision follows the nursery tree: the store writer, rate limiter, presence, hub (with
its rooms) and reaper live in the actors' nursery; connections live in their own nursery,
which closes first on shutdown so that every connection can still say goodbye. The
:class:`Gateway` serves one byte stream: the handshake checks, then the connection.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from urllib.parse import urlsplit

import httpx
import trio
from starlette.types import ASGIApp
from trio_websocket import WebSocketRequest

from winkr import plain_http
from winkr.actor import Frames
from winkr.auth import Principal, TokenVerifier, token_from_handshake
from winkr.broker import BROADCAST_TOPIC, Broker, InProcessBroker
from winkr.clock import WallClock, system_wall_clock
from winkr.cluster import BrokerHealth, cluster_redis_url, node_name
from winkr.config import Settings
from winkr.connection import Connection
from winkr.dispatcher import NodeInbox, run_dispatcher, run_position_checks
from winkr.errors import (
    CONNECTION_ERROR,
    FORBIDDEN,
    NOT_FOUND,
    RATE_LIMITED,
    UNAUTHORIZED,
    ProtocolError,
    retry_after_header,
)
from winkr.handlers.registry import EVENTS
from winkr.hub import HubHandle, run_hub
from winkr.logs import ThrottledLines
from winkr.metrics import Metrics
from winkr.policy import PolicySettings, default_blocked_words
from winkr.presence import run_presence, run_registry_upkeep
from winkr.protocol.codec import refusal_body
from winkr.proxy_protocol import ProxyHeader, ProxyHeaderError, is_trusted, parse_networks, read_proxy_header
from winkr.ratelimit import (
    Limiter,
    LimiterUnavailable,
    Rate,
    RateLimiterHandle,
    message_rates,
    rate_limited,
    run_rate_limiter,
)
from winkr.reaper import open_reaper_channel, run_reaper
from winkr.registry import InProcessRegistry, PresenceRegistry, RegistryUnavailable
from winkr.revocations import run_revocations
from winkr.room import RoomServices
from winkr.services import Services
from winkr.store.checkpointer import run_checkpointer
from winkr.store.engine import Engine, Readers, open_engine
from winkr.store.readers import READERS, ReaderHandle
from winkr.store.store import Store
from winkr.store.writer import RunSync, run_store_writer, store_problem
from winkr.transport import WinkrWebSocket, wrap_server_stream
from winkr.webhooks import DEFAULT_BACKOFF, Backoff, SenderConfig, open_webhook_channel, run_webhook_sender

log = logging.getLogger("winkr.server")

ROOM_IDLE_SECONDS = 60.0
WS_PATH = "/ws"
RECEIVE_BUFFER = 64 * 1024  # bytes per socket read: a burst of frames in one syscall
LIBRARY_FRAME_LIMIT = 1024 * 1024
RUNTIME_SAMPLE_SECONDS = 2.0
POSITION_CHECK_SECONDS = 30.0  # in a cluster, every awake room's position is compared with the store this often


class HandshakeRefused(Exception):
    """A handshake answered with an HTTP error: ``status`` and the protocol error for the body."""

    def __init__(self, status: int, error: ProtocolError) -> None:
        super().__init__(error.message)
        self.status, self.error = status, error


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


class Gateway:
    """Serves client streams for a running server: handshake (within the timeout), checks in
    the documented order (docs/protocol.md §1.2), then the connection actor."""

    def __init__(self, services: Services, metrics: Metrics, clock: WallClock,
                 readiness: plain_http.Readiness | None = None) -> None:
        self.services = services
        self.readiness = readiness  # for GET /readyz on this port
        self.metrics = metrics
        self.clock = clock
        self._refusal_log = ThrottledLines(log, trio.current_time)
        self._proxies = parse_networks(services.settings.proxy_protocol_from)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one stream until its connection ends; never raises (one bad stream must not
        stop the listener). The stream is closed on return."""
        ip = _remote_ip(stream)
        settings = self.services.settings
        try:
            async with trio.open_nursery() as nursery:
                request = None
                with trio.move_on_after(settings.handshake_timeout):
                    if is_trusted(ip, self._proxies):
                        # A load balancer: the client's address comes first (winkr/proxy_protocol.py).
                        header = await self._read_proxy_header(stream, ip)
                        if header is None:
                            return
                        ip = header.client_ip or ip
                        if header.rest:
                            stream = plain_http.ReplayStream(header.rest, stream)
                    # Plain HTTP (health checks, a browser) is answered here; upgrades go on.
                    opening = await plain_http.read_opening(stream)
                    if opening is not None and opening.is_tls:  # https/wss on the plain port
                        log.debug("TLS handshake on the plain WebSocket port", extra={"ip": ip})
                    elif opening is not None and not opening.is_websocket:
                        status = await plain_http.answer(stream, opening, self.readiness)
                        log.debug("plain HTTP request answered", extra={"ip": ip, "status": status})
                    elif opening is not None:
                        request = await wrap_server_stream(
                            nursery, opening.replay(stream),
                            max_message_size=_library_frame_limit(settings.limits.max_frame_bytes),
                            receive_buffer_size=RECEIVE_BUFFER)
                connection = await self._open_connection(request, ip) if request is not None else None
                # Hold nothing of the handshake while the connection lives (its head, replayed
                # bytes and headers: ~1.5 KB per idle connection, docs/performance.md).
                request = opening = None
                if connection is not None:
                    await self._run_connection(connection)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - one bad stream must not stop the listener
            log.debug("stream from %s ended with %r", ip, exc, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_proxy_header(self, stream: trio.abc.Stream, peer: str) -> ProxyHeader | None:
        """The PROXY header a trusted balancer must send first, or None (logged, counted) when
        it is missing or malformed: the caller closes the stream."""
        try:
            return await read_proxy_header(stream)
        except ProxyHeaderError as exc:
            self.metrics.proxy_headers_refused.inc()
            self._refusal_log.info((peer, "proxy"), "PROXY header refused", ip=peer, reason=str(exc))
            return None

    async def _open_connection(self, request: WebSocketRequest, ip: str) -> Connection | None:
        """Check the handshake and accept it (the connection, not yet running), or refuse it."""
        services = self.services
        try:
            principal, subprotocol = await self._check_handshake(request, ip)
        except HandshakeRefused as refusal:
            await self._refuse(request, ip, refusal)
            return None
        try:
            ws = await request.accept(subprotocol=subprotocol)
        except BaseException:
            with trio.CancelScope(shield=True):
                await services.presence.release(principal.user_id)
            raise
        assert isinstance(ws, WinkrWebSocket)  # made by winkr.transport.wrap_server_stream
        return Connection(ws, principal, services)

    async def _run_connection(self, connection: Connection) -> None:
        principal = connection.principal
        started = trio.current_time()
        self.metrics.connections.inc()
        self.metrics.handshakes_accepted.inc()
        log.info("connection open", extra={"user_id": principal.user_id, "connection_id": connection.id})
        try:
            await connection.run()
        finally:
            reason = connection.close_reason or "client_closed"
            self.metrics.connections.dec()
            self.metrics.closes.labels(reason).inc()
            log.info("connection closed", extra={
                "user_id": principal.user_id, "connection_id": connection.id, "reason": reason,
                "duration_s": round(trio.current_time() - started, 3)})

    async def _check_handshake(self, request: WebSocketRequest, ip: str) -> tuple[Principal, str | None]:
        try:
            return await self._check_handshake_limited(request, ip)
        except (LimiterUnavailable, RegistryUnavailable):
            # A cluster's limiter or presence registry cannot count new connections (Redis
            # down): refuse them
            # rather than accept unlimited ones; established connections go on (§17.9).
            raise HandshakeRefused(503, ProtocolError(
                CONNECTION_ERROR, "cannot accept new connections right now: retry later")) from None

    async def _check_handshake_limited(self, request: WebSocketRequest, ip: str) -> tuple[Principal, str | None]:
        services, settings = self.services, self.services.settings
        limits = settings.limits
        ip_rate = Rate(limits.failed_handshakes_per_minute_per_ip, "minute")
        if ip_rate.count and (wait := await services.limiter.check(f"failed\x1f{ip}", ip_rate)):
            error = rate_limited(ip_rate, wait, "failed handshakes")
            error.message = "too many failed handshakes from this address"
            raise HandshakeRefused(429, error)
        if urlsplit(request.path).path != WS_PATH:
            raise HandshakeRefused(404, ProtocolError(NOT_FOUND, f"the WebSocket endpoint is {WS_PATH}"))
        origin = _header(request, b"origin")
        if settings.allowed_origins and origin is not None and origin not in settings.allowed_origins:
            raise HandshakeRefused(403, ProtocolError(FORBIDDEN, "origin not allowed"))
        found = token_from_handshake(request.headers, request.path, request.proposed_subprotocols)
        if not found.token:
            raise HandshakeRefused(401, ProtocolError(UNAUTHORIZED, "missing token"))
        try:
            principal = services.verifier.verify(found.token, self.clock())
        except ProtocolError as exc:
            raise HandshakeRefused(401, exc) from None
        if await services.revocations.is_revoked(principal):
            raise HandshakeRefused(401, ProtocolError(UNAUTHORIZED, "this token has been revoked: get a new one"))
        conn_rate = Rate(limits.connections_per_minute, "minute")
        user_key = f"connect\x1f{principal.user_id}"
        if conn_rate.count and (wait := await services.limiter.check(user_key, conn_rate)):
            raise HandshakeRefused(429, rate_limited(conn_rate, wait, "new connections"))
        if not await services.presence.admit(principal.user_id, principal.username, limits.connections_per_user):
            raise HandshakeRefused(429, ProtocolError(
                CONNECTION_ERROR, f"at most {limits.connections_per_user} open connections per user"))
        if conn_rate.count:
            try:
                await services.limiter.hit(user_key, conn_rate)
            except BaseException:  # the slot just taken is not going to be used
                with trio.CancelScope(shield=True):
                    await services.presence.release(principal.user_id)
                raise
        return principal, found.subprotocol

    async def _refuse(self, request: WebSocketRequest, ip: str, refusal: HandshakeRefused) -> None:
        limits = self.services.settings.limits
        ip_rate = Rate(limits.failed_handshakes_per_minute_per_ip, "minute")
        if ip_rate.count:
            with contextlib.suppress(LimiterUnavailable):  # uncounted while a cluster's Redis is down
                await self.services.limiter.hit(f"failed\x1f{ip}", ip_rate)
        error = refusal.error
        self.metrics.handshakes_refused.labels(error.code).inc()
        headers = [(b"content-type", b"application/json")]
        if error.code == RATE_LIMITED:
            self.metrics.rate_limited.labels(str(error.details["limit"])).inc()
            headers.append((b"retry-after", retry_after_header(float(error.details["retry_after"])).encode()))
        # One line per address and code a minute (the reason can vary at the client's will: not
        # in the key); winkr_handshakes_refused_total keeps the exact count.
        self._refusal_log.info((ip, refusal.status, error.code), "handshake refused",
                               ip=ip, status=refusal.status, code=error.code, reason=error.message)
        await request.reject(refusal.status, extra_headers=headers, body=refusal_body(error))


class Server:
    """One winkr server. ``serve`` runs it; ``accept_stream`` serves an in-memory stream in tests."""

    def __init__(self, settings: Settings, secret: str | None, *, clock: WallClock = system_wall_clock,
                 run_sync: RunSync = trio.to_thread.run_sync, api_sockets: list[socket.socket] | None = None,
                 webhook_transport: httpx.AsyncBaseTransport | None = None,
                 webhook_backoff: Backoff = DEFAULT_BACKOFF, limiter: Limiter | None = None,
                 bus: InProcessBroker | None = None, registry: InProcessRegistry | None = None) -> None:
        self.settings = settings
        self.limiter = limiter  # tests: one shared by several nodes; None: chosen by the settings
        self.bus = bus  # tests: the in-process bus several nodes of one trio run share
        self.shared_registry = registry  # tests: the presence state several nodes of one trio run share
        self.registry: PresenceRegistry | None = None  # while serving
        self.broker: Broker | None = None  # while serving (``broker.healthy`` for health checks)
        self.api_sockets = api_sockets  # bound by the CLI; None: bound here when api_port is set
        self.api_port: int | None = None
        self.api_app: ASGIApp | None = None  # the server API (served over HTTP when api_port is set)
        self._accepting = False
        self.clock = clock
        self.run_sync = run_sync
        self.webhook_transport = webhook_transport  # tests: an httpx transport instead of the network
        self.webhook_backoff = webhook_backoff
        self.metrics = Metrics(EVENTS)
        self.node_id = node_name(settings)
        self.metrics.node.info({"node_id": self.node_id})
        self.broker_health = BrokerHealth(self.metrics)  # the broker reports here (winkr/cluster.py)
        self.frames = Frames(clock, self.metrics)
        self.verifier = TokenVerifier(settings, secret)
        self.policy = PolicySettings(
            blocked_words=settings.blocked_words if settings.blocked_words is not None else default_blocked_words(),
            pii_policy=settings.pii_policy, max_text_chars=settings.max_text_chars,
            max_encrypted_chars=settings.max_encrypted_chars, max_photo_bytes=settings.max_photo_bytes,
            max_url_chars=settings.max_url_chars)
        self._shutdown = trio.Event()
        self._gateway: Gateway | None = None
        self._connections: trio.Nursery | None = None
        self.ports: list[int] = []

    def request_shutdown(self) -> None:
        self._shutdown.set()

    @property
    def gateway(self) -> Gateway:
        """The running server's gateway; ``RuntimeError`` before ``serve`` has started."""
        if self._gateway is None:
            raise RuntimeError("the server is not running")
        return self._gateway

    async def serve(self, listeners: list[trio.SocketListener] | None = None, *,
                    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``request_shutdown``; then close every connection and return. With
        ``listeners=None`` it listens on the configured host and port."""
        settings = self.settings
        engine = open_engine(settings.database, sqlite_synchronous=settings.sqlite_synchronous)
        db = await self.run_sync(engine.open_writer)
        readers: Readers | None = None
        try:
            readers = await self.run_sync(engine.open_readers, READERS)
            async with trio.open_nursery() as actors:
                inbox = NodeInbox(clock=self.clock)
                self.broker = await self._open_broker(actors, inbox)
                services = await self._start_actors(actors, Store(db), engine, ReaderHandle(readers, self.run_sync),
                                                    self.broker, inbox)
                self._gateway = gateway = Gateway(services, self.metrics, self.clock, self.ready_problem)
                api_stop = trio.Event()
                async with trio.open_nursery() as api:
                    await self._start_api(api, services, api_stop)
                    async with trio.open_nursery() as connections:
                        self._connections = connections
                        async with trio.open_nursery() as listening:
                            if listeners is None:
                                listeners = list(await trio.open_tcp_listeners(settings.port, host=settings.host))
                            self.ports = [lsn.socket.getsockname()[1] for lsn in listeners]
                            if listeners:  # none in tests that hand streams to accept_stream
                                await listening.start(partial(trio.serve_listeners, gateway.handle_stream,
                                                              listeners, handler_nursery=connections))
                            self._accepting = True
                            task_status.started(self)
                            await self._shutdown.wait()
                            self._accepting = False
                            listening.cancel_scope.cancel()
                        log.info("shutting down: closing connections")
                        await services.presence.close_all("server_shutdown")
                        connections.cancel_scope.deadline = trio.current_time() + settings.shutdown_timeout
                    api_stop.set()  # the API drives the actors: it stops before them
                if self.registry is not None and self.registry.shared:
                    # Gone on purpose: this node's members stop counting now, and the others
                    # finish the offline checks its connections left (a crash: after node_ttl).
                    with trio.move_on_after(settings.shutdown_timeout):
                        await self.registry.leave()
                actors.cancel_scope.cancel()
        finally:
            self._gateway = None
            if self.broker is not None:
                close = getattr(self.broker, "close", None)
                if close is not None:
                    close()
                self.broker = None
            with trio.CancelScope(shield=True):  # connections are closed however serve ends
                if readers is not None:
                    await self.run_sync(readers.close)
                await self.run_sync(db.close)
        log.info("stopped")

    def _readiness(self) -> str | None:
        if not self._accepting:
            return "not accepting WebSocket connections (starting or shutting down)"
        return self.broker_health.problem

    async def ready_problem(self) -> str | None:
        """Why this node should not get new clients (not accepting, the broker cannot reach
        Redis, the database does not commit within 2 s), or None: ``/readyz`` on both ports."""
        gateway = self._gateway
        if gateway is None:
            return "not running"
        return self._readiness() or await store_problem(gateway.services.store)

    async def _start_api(self, nursery: trio.Nursery, services: Services, stop: trio.Event) -> None:
        """Make the server API's app; serve it on ``api_port`` when that is set (docs/server-api.md)."""
        from winkr.api.app import ServerApi
        from winkr.api.keys import KeyChecker, api_keys

        settings = self.settings
        serving = settings.api_port is not None
        keys = await self.run_sync(partial(api_keys, settings, create=serving))
        self.api_app = ServerApi(services, KeyChecker(keys), self._readiness).app()
        if serving:
            from winkr.api.server import bind_api, serve_api

            sockets = self.api_sockets or await self.run_sync(bind_api, settings)
            self.api_port = await nursery.start(serve_api, self.api_app, sockets, stop)
            log.info("server API on http://%s:%d", settings.api_host, self.api_port)

    async def _open_broker(self, nursery: trio.Nursery, inbox: NodeInbox) -> Broker:
        """This node's attachment to the bus: its own in-process bus when alone, the shared one
        given to the constructor (tests), or Redis when ``broker_url`` names one."""
        broker: Broker
        redis_url = cluster_redis_url(self.settings)
        if self.bus is None and redis_url is not None:
            from winkr.broker.redis import RedisBroker  # the cluster extra: only when configured

            threads = self.run_sync is trio.to_thread.run_sync  # else tests' inline calls
            redis_broker = RedisBroker(redis_url, self.node_id, inbox.offer, prefix=self.settings.redis_key_prefix,
                                       health=self.broker_health, run_sync=None if threads else self.run_sync)
            await nursery.start(redis_broker.run)
            broker = redis_broker
        else:
            bus = self.bus if self.bus is not None else InProcessBroker(shared=False)
            broker = bus.attach(self.node_id, inbox.offer)
        await broker.subscribe([BROADCAST_TOPIC])
        return broker

    def _open_registry(self, nursery: trio.Nursery) -> PresenceRegistry | None:
        """The presence state shared with the other nodes (None: this node's alone)."""
        if self.shared_registry is not None:
            return self.shared_registry.attach(self.node_id)
        redis_url = cluster_redis_url(self.settings)
        if redis_url is None:
            return None
        from winkr.registry.redis import RedisRegistry  # the cluster extra: only when configured

        threads = self.run_sync is trio.to_thread.run_sync
        registry = RedisRegistry.from_url(redis_url, self.node_id, prefix=self.settings.redis_key_prefix,
                                          run_sync=None if threads else self.run_sync)
        nursery.start_soon(partial(_close_when_cancelled, registry.aclose))
        return registry

    async def _start_actors(self, nursery: trio.Nursery, store: Store, engine: Engine,
                            readers: ReaderHandle, broker: Broker, inbox: NodeInbox) -> Services:
        settings, frames = self.settings, self.frames
        store_handle = await nursery.start(partial(run_store_writer, store, self.run_sync, metrics=self.metrics))
        if engine.sqlite_path is not None:
            await nursery.start(run_checkpointer, engine.sqlite_path, self.run_sync)
        limiter = self.limiter or await self._open_limiter(nursery)
        registry = self.registry = self._open_registry(nursery)
        presence = await nursery.start(partial(run_presence, frames, store_handle, grace=settings.presence_grace,
                                               online_gauge=self.metrics.online_users, broker=broker,
                                               registry=registry))
        if registry is not None and registry.shared:
            with contextlib.suppress(RegistryUnavailable):  # Redis down at start: the upkeep retries
                await registry.heartbeat()  # before the first admission: our members count at once
            nursery.start_soon(run_registry_upkeep, registry, presence, settings.presence_grace)
        reaper, reaper_inbox = open_reaper_channel()
        webhooks, webhook_inbox = open_webhook_channel(settings)
        if webhook_inbox is not None:
            await nursery.start(partial(
                run_webhook_sender, store_handle, SenderConfig.from_settings(settings, self.webhook_backoff),
                webhooks, webhook_inbox, clock=self.clock, metrics=self.metrics, transport=self.webhook_transport))
        rates = message_rates(settings.limits)

        def room_services(hub: HubHandle) -> RoomServices:
            return RoomServices(frames, store_handle, presence, hub.room, hub.retire, reaper.nudge,
                                settings.typing_timeout, settings.max_room_connections,
                                ROOM_IDLE_SECONDS, rates, webhooks, broker)

        hub = await nursery.start(partial(run_hub, room_services, rooms_gauge=self.metrics.rooms))
        nursery.start_soon(partial(run_reaper, store_handle, hub.room, self.clock, reaper_inbox,
                                   poll=POSITION_CHECK_SECONDS if broker.shared else math.inf))
        nursery.start_soon(self._sample_runtime)
        revocations = await nursery.start(partial(run_revocations, store_handle, broker=broker))
        nursery.start_soon(partial(run_dispatcher, inbox, hub, presence, revocations,
                                   on_resync=self.broker_health.resynced))
        if broker.shared:
            nursery.start_soon(run_position_checks, hub, readers, POSITION_CHECK_SECONDS)
        return Services(settings, frames, self.verifier, self.policy, store_handle, presence, hub, reaper, limiter,
                        rates, webhooks, revocations, readers)

    async def _open_limiter(self, nursery: trio.Nursery) -> Limiter:
        """The in-process limiter on one node; Redis's when the cluster shares one (closed
        when ``nursery`` ends)."""
        redis_url = cluster_redis_url(self.settings)
        if redis_url is None:
            in_process: RateLimiterHandle = await nursery.start(run_rate_limiter, self.clock)
            return in_process
        from winkr.redis_limiter import RedisLimiter  # the cluster extra: only when configured

        threads = self.run_sync is trio.to_thread.run_sync  # else tests' inline calls
        limiter = RedisLimiter.from_url(redis_url, prefix=self.settings.redis_key_prefix,
                                        on_error=self.metrics.limiter_errors.inc,
                                        run_sync=None if threads else self.run_sync)
        nursery.start_soon(partial(_close_when_cancelled, limiter.aclose))
        return limiter

    async def _sample_runtime(self) -> None:
        """Keep the task-count gauge fresh (the scrape runs on another thread, so it cannot ask
        trio itself)."""
        while True:
            self.metrics.tasks.set(trio.lowlevel.current_statistics().tasks_living)
            await trio.sleep(RUNTIME_SAMPLE_SECONDS)

    def accept_stream(self, stream: trio.abc.Stream) -> None:
        """Serve a stream that did not come from a listener (an in-memory one in tests) in
        the connections nursery, so shutdown treats it like any other connection."""
        if self._connections is None:
            raise RuntimeError("the server is not running")
        self._connections.start_soon(self.gateway.handle_stream, stream)


async def _close_when_cancelled(aclose: Callable[[], Awaitable[None]]) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await aclose()


GC_YOUNGEST_THRESHOLD = 10_000
"""Net allocations between collections of the youngest generation while serving (Python's
default: 700)."""


def settle_gc() -> None:
    """The cyclic GC for serving, once the server has started (docs/performance.md, issue 10,
    "The realistic shape's tail"). The youngest generation is collected every
    ``GC_YOUNGEST_THRESHOLD`` net allocations instead of 700: at the height of a room's run (up to
    32 messages' frames, records and coroutines alive at once) 700 meant a collection every few
    messages over objects reference counting frees a moment later (~50 k instructions per
    message at saturation); cycles are still collected, later. Then what start-up left is
    collected and everything alive now (modules, settings, actors, caches: ~72,000 objects)
    moves to the permanent generation, which no collection traverses again. With CPython's
    defaults ~5 % of the realistic shape's time went to pauses of up to 150 ms (a full
    collection over ~220,000 objects every few seconds) that never found garbage; now a
    benchmark window runs none. Start-up objects that later become cyclic garbage are never
    freed (they live as long as the process anyway). Runs on the trio thread: tens of ms, once,
    before the listening line."""
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])
    gc.collect()
    gc.freeze()


async def serve_forever(settings: Settings, secret: str, *, on_listening: Callable[[list[int]], None],
                        listeners: list[trio.SocketListener] | None = None,
                        api_sockets: list[socket.socket] | None = None) -> None:
    """Run a server until SIGINT/SIGTERM (the CLI's entry point), on ``listeners`` (and the
    server API on ``api_sockets``) when given (the CLI binds them before it creates anything)."""
    server = Server(settings, secret, api_sockets=api_sockets)
    if settings.metrics_port is not None:
        port = server.metrics.serve_http(settings.metrics_port, settings.metrics_host)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    # Signals are caught before the "listening" line, so a signal right after it is graceful.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve, listeners))
            settle_gc()
            on_listening(server.ports)
            async for _ in signals:
                server.request_shutdown()
                break
