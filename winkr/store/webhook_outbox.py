"""The webhook outbox (contract §14): events waiting to be POSTed, in the database.

Every function here is synchronous and runs inside the store writer's transaction (through
``StoreHandle.call``/``fire``, never on a connection of its own). ``enqueue`` is called by
the change that causes the event, in the same store request, so the event commits or rolls
back with it: no crash loses one and no rolled-back change sends one. The other functions
belong to the delivery actor (``winkr.webhooks``).

Times are wall-clock seconds (they must survive a restart). An event's row lives until it
is delivered (2xx) or dropped for age.
"""
from __future__ import annotations

import secrets
from collections.abc import Collection
from typing import Any

import attrs
import orjson

from winkr.clock import iso
from winkr.store.store import Store


@attrs.frozen
class DueEvent:
    """An event claimed for one delivery attempt."""

    id: str  # the webhook-id
    type: str
    payload: bytes  # the exact body to POST
    created_at: float  # when it happened (wall clock)
    attempts: int  # including the attempt it was claimed for


def new_event_id() -> str:
    """``msg_`` + 32 hex digits: unique per event, the same on every retry."""
    return "msg_" + secrets.token_hex(16)


def enqueue(store: Store, type_: str, data: dict[str, Any], happened_at: float,
            enabled: Collection[str]) -> str | None:
    """Store one event (body ``{"type", "timestamp", "data"}``, ``timestamp`` = ``happened_at``)
    due at once; returns its webhook-id, or ``None`` (nothing written) when ``type_`` is not in
    ``enabled`` (empty when webhooks are off). Call it inside the request that makes the change."""
    if type_ not in enabled:
        return None
    event_id = new_event_id()
    body = orjson.dumps({"type": type_, "timestamp": iso(happened_at), "data": data})
    store.db.execute("INSERT INTO webhook_events (id, type, payload, created_at, next_attempt_at) "
                     "VALUES (?, ?, ?, ?, ?)", (event_id, type_, body.decode(), happened_at, happened_at))
    return event_id


def due(store: Store, now: float, limit: int, lease: float) -> list[DueEvent]:
    """Claim up to ``limit`` events whose time has come (earliest first): each gets one more
    attempt counted and ``next_attempt_at = now + lease``, so it is not claimed again while
    its attempt runs, and is attempted again after the lease if the process dies meanwhile."""
    # Nodes drain one queue (contract §16): on PostgreSQL the rows another node is claiming are
    # passed over (SKIP LOCKED), and the outer condition is checked again on the row as it is
    # once its lock is ours, so an event is never claimed twice for one attempt.
    rows = store.db.execute(
        "UPDATE webhook_events SET next_attempt_at = ?, attempts = attempts + 1 WHERE next_attempt_at <= ? "
        "AND id IN (SELECT id FROM webhook_events WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
        + store.db.dialect.skip_locked + ") RETURNING id, type, payload, created_at, attempts",
        (now + lease, now, now, limit)).fetchall()
    events = [DueEvent(id_, type_, payload.encode(), created_at, attempts)
              for id_, type_, payload, created_at, attempts in rows]
    events.sort(key=lambda event: event.created_at)
    return events


def delivered(store: Store, event_id: str) -> None:
    """The receiver answered 2xx: the event is done."""
    store.db.execute("DELETE FROM webhook_events WHERE id = ?", (event_id,))


def reschedule(store: Store, event_id: str, next_at: float) -> None:
    """The attempt failed: try again at ``next_at``."""
    store.db.execute("UPDATE webhook_events SET next_attempt_at = ? WHERE id = ?", (next_at, event_id))


def drop(store: Store, event_id: str) -> None:
    """Too old to retry (``webhook_max_age_hours``): give up on it."""
    store.db.execute("DELETE FROM webhook_events WHERE id = ?", (event_id,))


def drop_expired(store: Store, created_before: float, now: float) -> int:
    """Drop every event that happened before ``created_before`` and is not in flight (its
    lease is over); returns how many. While the endpoint is down most events are not
    attempted, so age alone must end them."""
    cursor = store.db.execute("DELETE FROM webhook_events WHERE created_at < ? AND next_attempt_at <= ?",
                              (created_before, now))
    return cursor.rowcount


def next_attempt_at(store: Store) -> float | None:
    """When the earliest waiting event is due (or its lease ends); ``None`` when none waits."""
    value: float | None = store.db.execute("SELECT min(next_attempt_at) FROM webhook_events").fetchone()[0]
    return value


def stats(store: Store, now: float) -> tuple[int, float]:
    """``(events waiting, age in seconds of the oldest)``; ``(0, 0.0)`` when none waits."""
    # Two statements: each is answered from an index (one aggregate would scan the table).
    count = store.db.execute("SELECT count(*) FROM webhook_events").fetchone()[0]
    oldest = store.db.execute("SELECT min(created_at) FROM webhook_events").fetchone()[0]
    return count, (max(0.0, now - oldest) if oldest is not None else 0.0)
