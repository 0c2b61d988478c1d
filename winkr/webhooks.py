"""The webhook sender actor (contract §14): POSTs the outbox's events, signed, at least once.

Events wait in the database (``winkr.store.webhook_outbox``), written in the transaction of
the change that causes them. This actor claims due events in small batches, POSTs each one
(at most ``concurrency`` in flight, each bounded by ``webhook_timeout_seconds``), deletes it
on a 2xx, and otherwise reschedules it with exponential backoff and full jitter until it is
``webhook_max_age_hours`` old, when it is dropped and counted.

While the endpoint fails, the sender probes it with one event at a time (0.25 s apart,
doubling to 5 s) instead of retrying every waiting event on its own schedule: a dead
endpoint costs an attempt every few seconds, not one per waiting event (measured: a
retry storm against a refusing endpoint took a third of the trio thread and doubled send
latency). The first success sends every due event at once.

One store request per turn of the loop applies what the finished attempts learned
(delivered, rescheduled, dropped), drops what has grown too old, claims the next due events
and says when the next one is due. (Waiting a few ms after a wake-up to batch a burst
was measured and dropped: it saved no CPU, as the HTTP work dominates, and capped the
throughput at ``concurrency`` per wait.)

The chat path never waits on it: it holds a ``WebhookHandle`` whose ``nudge`` never blocks
(one pending wake-up is as good as many); without a nudge the sender sleeps until the next
``next_attempt_at``. Its store work is a few small requests per batch.

Signing follows Standard Webhooks: ``webhook-signature: v1,<base64 HMAC-SHA256>`` keyed with
the secret's decoded bytes, over ``"{webhook-id}.{webhook-timestamp}.{body}"``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import random
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from winkr.clock import WallClock
from winkr.config import Settings, webhook_key
from winkr.store import webhook_outbox as outbox
from winkr.store.store import Store
from winkr.store.webhook_outbox import DueEvent
from winkr.store.writer import StoreHandle

log = logging.getLogger("winkr.webhooks")

USER_AGENT = "winkr-webhooks/1"
LEASE_MARGIN_SECONDS = 15.0  # an attempt is bounded by the timeout; the lease outlasts it
STATS_BUSY_SECONDS = 1.0  # the waiting-events gauge is recounted at most this often...
STATS_IDLE_SECONDS = 15.0  # ...and at least this often (count(*) is 3.7 ms at a million waiting)
ERROR_PAUSE_SECONDS = 1.0  # after an unexpected failure of the loop itself
MAX_ANSWER_BYTES = 64 * 1024  # of a receiver's answer body read (to keep the connection)
PROBE_FIRST_SECONDS = 0.25  # while the endpoint fails: pause before the next probe, doubling...
PROBE_CAP_SECONDS = 5.0  # ...up to this (so a recovered endpoint is noticed within 5 s)


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,`` + base64 HMAC-SHA256 of
    ``"{webhook_id}.{timestamp}.{body}"`` with ``key`` (the secret's decoded bytes)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@attrs.frozen
class Backoff:
    """Full-jitter exponential backoff: retry ``n`` (1 = the first retry) waits a uniform
    random time in ``[0, min(cap, first * 2**(n-1))]`` seconds."""

    first: float = 5.0  # the first retry comes within this
    cap: float = 600.0  # never more than this between attempts
    rng: random.Random = attrs.field(factory=random.Random, eq=False, repr=False)

    def delay(self, retry: int) -> float:
        ceiling = min(self.cap, self.first * 2 ** min(retry - 1, 62))
        return self.rng.uniform(0.0, ceiling)


DEFAULT_BACKOFF = Backoff()


class WebhookHandle:
    """What the chat path holds: the enabled event types (to pass to ``enqueue``) and a
    wake-up for the sender. Never blocks."""

    def __init__(self, events: frozenset[str], nudges: trio.MemorySendChannel[None] | None) -> None:
        self.events = events  # empty when webhooks are off: enqueue writes nothing
        self._nudges = nudges

    def wants(self, event_type: str) -> bool:
        return event_type in self.events

    def nudge(self) -> None:
        """Tell the sender that a commit enqueued events."""
        if self._nudges is None:
            return
        try:
            self._nudges.send_nowait(None)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # a wake-up is already pending, or we are shutting down


WEBHOOKS_OFF = WebhookHandle(frozenset(), None)


def open_webhook_channel(settings: Settings) -> tuple[WebhookHandle, trio.MemoryReceiveChannel[None] | None]:
    """The handle, and the sender's wake-up inbox (``None`` when ``webhook_url`` is empty)."""
    if not settings.webhook_url:
        return WEBHOOKS_OFF, None
    send, receive = trio.open_memory_channel[None](1)
    return WebhookHandle(frozenset(settings.webhook_events), send), receive


@attrs.frozen
class SenderConfig:
    url: str
    key: bytes = attrs.field(repr=False)
    timeout: float
    max_age: float  # seconds
    backoff: Backoff = DEFAULT_BACKOFF
    concurrency: int = 8

    @classmethod
    def from_settings(cls, settings: Settings, backoff: Backoff = DEFAULT_BACKOFF) -> SenderConfig:
        assert settings.webhook_url and settings.webhook_secret  # config._check_webhooks
        return cls(settings.webhook_url, webhook_key(settings.webhook_secret),
                   settings.webhook_timeout_seconds, settings.webhook_max_age_hours * 3600.0, backoff)


def _endpoint(url: str) -> str:
    """The URL without path or query, for logs (a query may carry a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


async def _discard_body(response: httpx.Response) -> None:
    """Read and forget the answer's body, so the connection can carry the next request;
    beyond ``MAX_ANSWER_BYTES`` stop (closing the response then closes the connection)."""
    if response.is_stream_consumed:  # a response made in memory (a test transport)
        return
    seen = 0
    async for chunk in response.aiter_raw():
        seen += len(chunk)
        if seen > MAX_ANSWER_BYTES:
            return


class _Breaker:
    """Endpoint health: closed (send freely) until an attempt fails; then one probe at a
    time after a pause (``PROBE_FIRST_SECONDS`` doubling to ``PROBE_CAP_SECONDS``); any
    success closes it again."""

    def __init__(self) -> None:
        self.failures = 0  # consecutive failed attempts
        self.paused_until = -math.inf  # trio time

    def succeeded(self) -> None:
        if self.failures:
            log.info("webhook endpoint answers again", extra={"failures": self.failures})
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("webhook endpoint failing: probing it with one event at a time")
        pause = min(PROBE_CAP_SECONDS, PROBE_FIRST_SECONDS * 2 ** min(self.failures - 1, 30))
        self.paused_until = trio.current_time() + pause

    def allowance(self, free: int, in_flight: int) -> int:
        """How many events may be claimed now."""
        if not self.failures:
            return free
        return 0 if in_flight or trio.current_time() < self.paused_until else min(1, free)


@attrs.define
class _Outcomes:
    """What finished attempts learned, until the next store request records it."""

    delivered: list[str] = attrs.Factory(list)
    rescheduled: list[tuple[str, float]] = attrs.Factory(list)
    dropped: list[str] = attrs.Factory(list)

    def __bool__(self) -> bool:
        return bool(self.delivered or self.rescheduled or self.dropped)


@attrs.frozen
class _Turn:
    claimed: list[DueEvent]
    next_at: float | None  # wall clock
    stats: tuple[int, float] | None  # (waiting, oldest age) when recounted
    expired: int  # dropped by age without an attempt


def _record_and_claim(store: Store, outcomes: _Outcomes, now: float, limit: int, lease: float,
                      expire_before: float | None) -> _Turn:
    """One store request (on the writer's thread): record outcomes, drop the too old, claim."""
    for event_id in outcomes.delivered:
        outbox.delivered(store, event_id)
    for event_id, next_at in outcomes.rescheduled:
        outbox.reschedule(store, event_id, next_at)
    for event_id in outcomes.dropped:
        outbox.drop(store, event_id)
    expired = 0 if expire_before is None else outbox.drop_expired(store, expire_before, now)
    claimed = outbox.due(store, now, limit, lease) if limit else []
    stats = None if expire_before is None else outbox.stats(store, now)
    return _Turn(claimed, outbox.next_attempt_at(store), stats, expired)


class _Sender:
    def __init__(self, store: StoreHandle, config: SenderConfig, client: httpx.AsyncClient,
                 clock: WallClock, wake: Callable[[], None], metrics: Any) -> None:
        self.store, self.config, self.client, self.clock = store, config, client, clock
        self.wake, self.metrics = wake, metrics
        self.in_flight = 0
        self.outcomes = _Outcomes()
        self.breaker = _Breaker()
        self.oldest_created_at: float | None = None  # for the age gauge, read at scrape time
        self.stats_at = -math.inf  # trio time of the last recount
        self.stats_dirty = True  # something may have changed since

    # --- one attempt -----------------------------------------------------------------

    async def attempt(self, event: DueEvent) -> None:
        """POST ``event`` once and note the outcome; never raises (but for cancellation)."""
        try:
            if self.clock() - event.created_at >= self.config.max_age:
                self._drop(event, None)  # e.g. the service was down longer than the max age
                return
            failure = await self._post(event)
            if failure is None:
                self.breaker.succeeded()
                self.outcomes.delivered.append(event.id)
                self._count("delivered")
                if self.metrics is not None:
                    self.metrics.webhook_delivery_seconds.observe(max(0.0, self.clock() - event.created_at))
                return
            self.breaker.failed()
            next_at = self.clock() + self.config.backoff.delay(event.attempts)
            if next_at - event.created_at >= self.config.max_age:
                self._drop(event, failure)
                return
            self.outcomes.rescheduled.append((event.id, next_at))
            self._count("retry")
            log.info("webhook attempt failed; retrying", extra={
                "webhook_id": event.id, "type": event.type, "attempt": event.attempts, "outcome": failure,
                "retry_in_s": round(next_at - self.clock(), 3)})
        except Exception:  # noqa: BLE001 - the event stays leased and is retried after the lease
            log.exception("webhook %s: the attempt failed unexpectedly", event.id)
        finally:
            self.in_flight -= 1
            self.wake()  # record the outcome; a slot is free; a retry may be due sooner

    async def _post(self, event: DueEvent) -> str | None:
        """``None`` on a 2xx answer, else a short reason (``status 500``, ``timeout``, ...)."""
        timestamp = int(self.clock())
        headers = {"content-type": "application/json", "user-agent": USER_AGENT,
                   "webhook-id": event.id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self.config.key, event.id, timestamp, event.payload)}
        with trio.move_on_after(self.config.timeout) as scope:
            try:
                async with self.client.stream("POST", self.config.url, content=event.payload,
                                              headers=headers) as response:
                    status = response.status_code
                    await _discard_body(response)
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError as exc:
                return type(exc).__name__
        if scope.cancelled_caught:
            return "timeout"
        return None if 200 <= status < 300 else f"status {status}"

    def _drop(self, event: DueEvent, failure: str | None) -> None:
        self.outcomes.dropped.append(event.id)
        self._count("dropped")
        log.warning("webhook dropped: older than webhook_max_age_hours", extra={
            "webhook_id": event.id, "type": event.type, "attempt": event.attempts, "outcome": failure,
            "age_s": round(self.clock() - event.created_at, 3)})

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.webhook_deliveries.labels(outcome).inc(n)

    # --- the loop --------------------------------------------------------------------

    async def turn(self, nursery: trio.Nursery) -> float:
        """Record outcomes and claim due events in one store request, start their attempts;
        returns how long (trio seconds) to sleep unless woken."""
        free = self.config.concurrency - self.in_flight
        limit = self.breaker.allowance(free, self.in_flight)
        recount = self.stats_due_in() <= 0
        if not (limit or recount or self.outcomes):  # nothing a store request could change
            if self.in_flight:
                return max(0.0, self.stats_due_in())  # a finishing attempt wakes us
            return max(0.0, min(self.breaker.paused_until - trio.current_time(), self.stats_due_in()))
        now = self.clock()
        outcomes, self.outcomes = self.outcomes, _Outcomes()
        try:
            turn = await self.store.call(partial(
                _record_and_claim, outcomes=outcomes, now=now, limit=limit,
                lease=self.config.timeout + LEASE_MARGIN_SECONDS,
                expire_before=now - self.config.max_age if recount else None))
        except BaseException:
            self._restore(outcomes)
            raise
        for event in turn.claimed:
            self.in_flight += 1
            nursery.start_soon(self.attempt, event)
        if turn.expired:
            self._count("dropped", turn.expired)
            log.warning("webhooks dropped unsent: older than webhook_max_age_hours",
                        extra={"count": turn.expired})
        if turn.stats is not None:
            self._update_stats(now, *turn.stats)
        if turn.claimed:
            self.stats_dirty = True
        if self.in_flight >= self.config.concurrency or (self.breaker.failures and self.in_flight):
            return max(0.0, self.stats_due_in())  # a finishing attempt wakes us
        until_due = math.inf if turn.next_at is None else turn.next_at - self.clock()
        if self.breaker.failures:
            until_due = max(until_due, self.breaker.paused_until - trio.current_time())
        return max(0.0, min(until_due, self.stats_due_in()))

    def _restore(self, outcomes: _Outcomes) -> None:
        """The store request failed: keep its outcomes for the next one."""
        self.outcomes.delivered[:0] = outcomes.delivered
        self.outcomes.rescheduled[:0] = outcomes.rescheduled
        self.outcomes.dropped[:0] = outcomes.dropped

    def stats_due_in(self) -> float:
        """Trio seconds until the next recount (which also drops the events grown too old)."""
        period = STATS_BUSY_SECONDS if self.stats_dirty else STATS_IDLE_SECONDS
        return self.stats_at + period - trio.current_time()

    def _update_stats(self, now: float, waiting: int, oldest_age: float) -> None:
        self.stats_at, self.stats_dirty = trio.current_time(), False
        if self.metrics is not None:
            self.metrics.webhook_waiting.set(waiting)
        self.oldest_created_at = now - oldest_age if waiting else None

    def oldest_age(self) -> float:
        """The age gauge's value, computed at scrape time (on the scrape thread)."""
        oldest = self.oldest_created_at
        if oldest is None:
            return 0.0
        try:
            return max(0.0, self.clock() - oldest)
        except RuntimeError:  # a test's trio-driven clock read from the scrape thread
            return 0.0


async def run_webhook_sender(store: StoreHandle, config: SenderConfig, handle: WebhookHandle,
                             wake: trio.MemoryReceiveChannel[None], *, clock: WallClock, metrics: Any = None,
                             transport: httpx.AsyncBaseTransport | None = None,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Deliver the outbox's events until cancelled. ``handle`` and ``wake`` come from
    ``open_webhook_channel``: the chat path's nudges, and the sender's own wake-up when an
    attempt ends, arrive on ``wake``. ``transport`` replaces httpx's network transport (tests).
    Cancellation abandons attempts in flight and outcomes not yet recorded: those events stay
    leased and are attempted again after the lease (``webhook_timeout_seconds`` + 15 s), so
    each is still delivered at least once."""
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(transport=transport, timeout=config.timeout, limits=limits,
                                 follow_redirects=False, trust_env=False) as client, \
            trio.open_nursery() as attempts:
        sender = _Sender(store, config, client, clock, handle.nudge, metrics)
        if metrics is not None:
            metrics.webhook_oldest_age.set_function(sender.oldest_age)
        # httpx logs every request with its full URL at INFO; a URL may carry a token.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        log.info("webhooks on: delivering to %s", _endpoint(config.url))
        task_status.started()
        while True:
            try:
                wait = await sender.turn(attempts)
            except Exception:  # noqa: BLE001 - a store failure must not end the deliveries
                log.exception("webhook sender failed; retrying")
                wait = ERROR_PAUSE_SECONDS
            with trio.move_on_after(wait):
                await wake.receive()
                sender.stats_dirty = True  # an enqueue or a finished attempt
