"""The node's inbox of events from other nodes is bounded: what does not fit is dropped and
remembered as "resync everything" (the bus's own rule: overflow means resync, not growth)."""
from __future__ import annotations

import pytest
import trio

from winkr.broker import BusEvent, Resync
from winkr.broker.base import RESYNC_MARGIN_SECONDS
from winkr.dispatcher import NodeInbox


def test_a_full_inbox_drops_and_asks_for_a_resync() -> None:
    now = [100.0]
    inbox = NodeInbox(size=2, clock=lambda: now[0])
    events = [BusEvent("c:x", "message", {"n": n}, "other") for n in range(3)]
    for event in events:
        inbox.offer(event)
    now[0] = 105.0
    inbox.offer(Resync())
    assert inbox.dropped == 2
    assert [inbox.receive.receive_nowait(), inbox.receive.receive_nowait()] == events[:2]
    # Everything since the first drop, as a bus reconnect: rooms and presence's unread counts
    # (a dropped u: event was lost for good when only the rooms caught up).
    assert inbox.take_overflow() == Resync(None, 100.0 - RESYNC_MARGIN_SECONDS)
    assert inbox.take_overflow() is None


@pytest.mark.sqlite_only  # no store involved
async def test_a_cancelled_subscribe_leaves_the_in_process_bus_as_it_was() -> None:
    # The Broker contract: a cancelled subscribe changes nothing (a room or an admission
    # cancelled while subscribing would otherwise keep its node on the topic for good).
    from winkr.broker import InProcessBroker

    got: list[object] = []
    bus = InProcessBroker()
    node_a, node_b = bus.attach("a", got.append), bus.attach("b", got.append)
    with trio.CancelScope() as scope:
        scope.cancel()
        await node_b.subscribe(["c:x"])
    assert scope.cancelled_caught
    assert bus.subscribers("c:x") == frozenset()
    node_a.publish([BusEvent("c:x", "message", {"n": 1})])
    assert got == []
