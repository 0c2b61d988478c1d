"""What travels between nodes, and the interface every broker implements.

Topics: ``c:{conversation}`` carries a room's events (a committed message, a deletion, typing,
a close); a node subscribes while it has the conversation's room awake. ``u:{user}`` carries
what is addressed to a user's connections (presence announcements, receipts, unread counts,
closes, contacts and settings changes); a node subscribes while it holds a connection of that
user. ``all`` carries the few events every node must know (token revocations).

An event's ``data`` is plain JSON (dicts, lists, strings, numbers, booleans, None): an
in-process broker hands the object over, Redis carries its JSON.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

ALL = None
"""``Resync.topics`` for "everything this node subscribes to"."""

BROADCAST_TOPIC = "all"

RESYNC_MARGIN_SECONDS = 2.0
"""A ``Resync.since`` reaches back this far before the loss was noticed (other nodes' clocks,
events committed just before they were published)."""


def conversation_topic(conversation_id: str) -> str:
    return f"c:{conversation_id}"


def user_topic(user_id: str) -> str:
    return f"u:{user_id}"


@attrs.frozen
class BusEvent:
    """One event published on ``topic`` by node ``origin``: ``kind`` names it, ``data`` is JSON."""

    topic: str
    kind: str
    data: dict[str, Any]
    origin: str = ""


@attrs.frozen
class Resync:
    """The broker may have lost events on ``topics`` (``ALL``: every subscription of this node):
    a reconnect, a resubscription, or this node's inbox overflowing. Rooms fill their gaps
    from the store. ``since``: the wall-clock time (seconds) from which events may be missing,
    when known; presence then re-sends the unread counts of the conversations that got messages
    since (connections outside a room hear of those only through the bus)."""

    topics: frozenset[str] | None = ALL
    since: float | None = None


Incoming = BusEvent | Resync
"""What a broker hands to its node (``Sink``)."""

Sink = Callable[[Incoming], None]
"""Takes one incoming item without waiting (the node's bounded inbox: ``winkr.dispatcher``;
when it is full the item is dropped and the node resyncs everything, the bus's own rule)."""


class Broker(Protocol):
    """One node's attachment to the bus.

    ``publish`` never waits and never raises: it is called after a commit, and a failure (the
    bus down, a full queue) is logged and counted, never turned into a failed acknowledgement;
    the receiving rooms recover from the store. Events of one publisher arrive in the order it
    published them (when they arrive). ``subscribe`` returns once the subscription is
    confirmed, so a read made after it plus the events after it cover everything; a node's own
    events never come back to it. Subscriptions are counted per topic: the broker subscribes
    at the first ``subscribe`` and unsubscribes at the last matching ``unsubscribe``.
    Cancellation: ``subscribe``/``unsubscribe`` may be cancelled; a cancelled subscribe leaves
    the count as if it had not been called."""

    node_id: str

    def publish(self, events: Sequence[BusEvent]) -> None: ...

    async def subscribe(self, topics: Sequence[str]) -> None: ...

    async def unsubscribe(self, topics: Sequence[str]) -> None: ...

    @property
    def healthy(self) -> bool:
        """Whether the bus is reachable now (for /readyz and metrics)."""

    @property
    def shared(self) -> bool:
        """Whether other nodes may publish to this node's topics (False for a lone node: rooms
        then skip the periodic position checks a cluster needs)."""
