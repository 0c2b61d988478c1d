"""The Redis broker: Redis pub/sub through redis-py (the ``cluster`` extra; imported only when
``broker_url`` names a Redis).

redis-py is synchronous, so:

- **publishing** runs on worker threads: ``publish`` (never waits) puts the events in a
  bounded queue; a publisher task takes whatever is queued and sends it as one pipeline of
  ``PUBLISH`` in one thread hop. A full queue, or Redis failing, drops the events (logged,
  counted in ``BrokerHealth``): they are committed, and the receiving rooms recover them
  from the database (a gap, the position check, a resync);
- **receiving** runs on ONE dedicated thread that owns the pub/sub connection: it applies the
  subscriptions asked for, reads messages, and hands each to trio with
  ``TrioToken.run_sync_soon`` into the node's bounded inbox (``winkr.dispatcher.NodeInbox``).
  The connection never reconnects silently (redis-py's own retry is off): on any error the
  thread opens a new one, subscribes every wanted channel again, and once Redis confirms,
  hands ``Resync(ALL)`` to the node so every room catches up from the database.

Channels are ``{prefix}{topic}``; a message is the JSON ``{"t", "k", "d", "o"}`` (topic, kind,
data, origin node). A node drops its own events.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

import orjson
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from winkr.broker.base import ALL, RESYNC_MARGIN_SECONDS, BusEvent, Resync, Sink
from winkr.logs import ThrottledLines
from winkr.store.writer import RunSync

log = logging.getLogger("winkr.broker")

CALL_TIMEOUT_SECONDS = 2.0  # a publish pipeline or a connect slower than this counts as failed
SUBSCRIBE_WAIT_SECONDS = 1.0  # a subscribe returns after this even unconfirmed (Redis down): sends go on
PUBLISH_QUEUE = 4096  # batches waiting for the publisher; beyond: dropped and counted
POLL_SECONDS = 0.05  # how long the subscriber thread waits for a message before looking at its commands
IDLE_PING_SECONDS = 15.0  # a pub/sub connection silent this long is pinged (a stale one shows up)
PONG_WAIT_SECONDS = 5.0  # a ping unanswered this long means the connection is dead: reconnect
RECONNECT_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)


class BrokerHealthSink:
    """What the broker reports to (``winkr.cluster.BrokerHealth`` has these methods)."""

    def up(self) -> None: ...

    def down(self, why: str = "the broker cannot reach Redis") -> None: ...

    def publish_failed(self, events: int = 1) -> None: ...


class RedisBroker:
    """One node's ``Broker`` on a Redis. ``run`` (in the node's nursery) must be running."""

    def __init__(self, url: str, node_id: str, sink: Sink, *, prefix: str = "winkr:",
                 health: Any = None, run_sync: RunSync | None = None) -> None:
        self.node_id = node_id
        self._url = url
        self._sink = sink
        self._prefix = prefix
        self._health = health if health is not None else BrokerHealthSink()
        self._client = self._new_client()
        self._threads = trio.CapacityLimiter(4)
        self._run_sync: RunSync = run_sync or partial(trio.to_thread.run_sync, limiter=self._threads)
        self._publish_send, self._publish_receive = trio.open_memory_channel[list[BusEvent]](PUBLISH_QUEUE)
        self._wanted: Counter[str] = Counter()  # topic -> subscribers (trio side)
        self._commands: queue.SimpleQueue[tuple[str, list[str], trio.Event | None]] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopping = threading.Event()
        self._up: bool | None = None  # None: not known yet
        self._errors = ThrottledLines(log, time.monotonic)
        self.dropped = 0  # events not published (queue full or Redis failing)

    def _new_client(self) -> redis.Redis:
        return redis.Redis.from_url(self._url, socket_timeout=CALL_TIMEOUT_SECONDS,
                                    socket_connect_timeout=CALL_TIMEOUT_SECONDS,
                                    retry=Retry(NoBackoff(), 0), client_name=f"winkr-{self.node_id}")

    # --- Broker -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return bool(self._up)

    @property
    def shared(self) -> bool:
        return True

    def publish(self, events: Sequence[BusEvent]) -> None:
        if not events:
            return
        try:
            self._publish_send.send_nowait(list(events))
        except trio.WouldBlock:
            self._dropped(len(events), "the publish queue is full")

    async def subscribe(self, topics: Sequence[str]) -> None:
        new = [topic for topic in topics if self._wanted[topic] == 0]
        for topic in topics:
            self._wanted[topic] += 1
        if not new:
            await trio.lowlevel.checkpoint()
            return
        confirmed = trio.Event()
        self._commands.put(("subscribe", [self._prefix + t for t in new], confirmed))
        try:
            with trio.move_on_after(SUBSCRIBE_WAIT_SECONDS):
                await confirmed.wait()  # else Redis is down: resubscribed and resynced once it is back
        except BaseException:  # cancelled: as if it had not been called (the Broker contract)
            self._release(topics)
            raise

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        self._release(topics)
        await trio.lowlevel.checkpoint()

    def _release(self, topics: Sequence[str]) -> None:
        """Count ``topics`` down; the subscriber thread drops the channels nobody wants."""
        gone = []
        for topic in topics:
            if self._wanted[topic] <= 1:
                self._wanted.pop(topic, None)
                gone.append(self._prefix + topic)
            else:
                self._wanted[topic] -= 1
        if gone:
            self._commands.put(("unsubscribe", gone, None))

    # --- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The publisher task and the subscriber thread, until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publisher)
                nursery.start_soon(partial(trio.to_thread.run_sync, self._subscriber, abandon_on_cancel=True,
                                           limiter=trio.CapacityLimiter(1)))
                task_status.started()
        finally:
            self._stopping.set()
            self._client.close()

    async def _publisher(self) -> None:
        async for batch in self._publish_receive:
            events = list(batch)
            while len(events) < 4096:
                try:
                    events += self._publish_receive.receive_nowait()
                except trio.WouldBlock:
                    break
            messages = [(self._prefix + e.topic, orjson.dumps({"t": e.topic, "k": e.kind, "d": e.data,
                                                                "o": self.node_id})) for e in events]
            try:
                await self._run_sync(partial(self._publish_now, messages))
            except (redis.RedisError, OSError) as exc:
                self._dropped(len(events), f"Redis failed: {type(exc).__name__}")

    def _publish_now(self, messages: list[tuple[str, bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for channel, payload in messages:
            pipe.publish(channel, payload)
        pipe.execute()

    def _dropped(self, count: int, why: str) -> None:
        self.dropped += count
        self._health.publish_failed(count)
        self._errors.info(why, "broker: events not published (receivers catch up from the database)",
                          why=why, events=count)

    # --- the subscriber thread ----------------------------------------------------------------

    def _to_trio(self, fn: Any, *args: Any) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            self._stopping.set()

    def _subscriber(self) -> None:
        """Own the pub/sub connection until the node stops (runs on its own thread)."""
        channels: set[str] = set()  # what this thread has asked Redis for
        waiting: dict[str, list[trio.Event]] = {}  # channel -> subscribers waiting for its confirmation
        pubsub: Any = None
        connected_before = False
        resync_at_confirmation = False
        failures = 0
        last_traffic = time.monotonic()
        last_good = time.time()
        ping_sent: float | None = None
        while not self._stopping.is_set():
            try:
                if pubsub is None:
                    pubsub = self._new_client().pubsub(  # type: ignore[no-untyped-call]
                        ignore_subscribe_messages=False)
                    pubsub.ping()  # connects now: an unreachable Redis fails here
                    if channels:
                        pubsub.subscribe(*channels)
                    resync_at_confirmation = connected_before
                    ping_sent = None
                    if connected_before and not channels:
                        self._to_trio(self._sink, Resync(ALL, last_good - RESYNC_MARGIN_SECONDS))
                    connected_before = True
                    failures = 0
                    self._to_trio(self._set_up, True)
                    last_traffic = time.monotonic()
                while True:
                    try:
                        command, names, event = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if command == "subscribe":
                        channels.update(names)
                        if event is not None:
                            for name in names:
                                waiting.setdefault(name, []).append(event)
                        pubsub.subscribe(*names)
                    else:
                        channels.difference_update(names)
                        pubsub.unsubscribe(*names)
                message = pubsub.get_message(timeout=POLL_SECONDS)
                if not resync_at_confirmation:
                    last_good = time.time()  # the connection answered: nothing lost before this
                now = time.monotonic()
                if message is None:
                    if ping_sent is not None and now - ping_sent > PONG_WAIT_SECONDS:
                        raise redis.ConnectionError("no answer to a ping on the pub/sub connection")
                    if ping_sent is None and now - last_traffic > IDLE_PING_SECONDS:
                        pubsub.ping()
                        ping_sent = now
                    continue
                last_traffic = now
                ping_sent = None  # any answer (a pong included) shows the connection is alive
                self._handle(message, waiting)
                if message["type"] == "subscribe" and resync_at_confirmation:
                    resync_at_confirmation = False
                    # what was published while we were away
                    self._to_trio(self._sink, Resync(ALL, last_good - RESYNC_MARGIN_SECONDS))
            except (redis.RedisError, OSError) as exc:
                self._to_trio(self._set_up, False)
                self._errors.info("pubsub", "broker: the pub/sub connection failed; reconnecting",
                                  error=type(exc).__name__)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001, S110 - closing a broken connection
                        pass
                    pubsub = None
                self._stopping.wait(RECONNECT_BACKOFF[min(failures, len(RECONNECT_BACKOFF) - 1)])
                failures += 1
        if pubsub is not None:
            pubsub.close()

    def _handle(self, message: dict[str, Any], waiting: dict[str, list[trio.Event]]) -> None:
        kind = message["type"]
        if kind == "subscribe":
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            for event in waiting.pop(channel, []):
                self._to_trio(event.set)
        elif kind == "message":
            try:
                body = orjson.loads(message["data"])
                incoming = BusEvent(str(body["t"]), str(body["k"]), dict(body["d"]), str(body["o"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self._errors.info("bad", "broker: a message that is not winkr's was ignored")
                return
            if incoming.origin != self.node_id:
                self._to_trio(self._sink, incoming)

    def _set_up(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        if up:
            self._health.up()
        else:
            self._health.down("the broker cannot reach Redis")
