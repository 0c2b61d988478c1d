"""The node's inbox of events from other nodes is bounded: what does not fit is dropped and
remembered as "resync everything" (the bus's own rule: overflow means resync, not growth)."""
from __future__ import annotations

from winkr.broker import BusEvent, Resync
from winkr.dispatcher import NodeInbox


def test_a_full_inbox_drops_and_asks_for_a_resync() -> None:
    inbox = NodeInbox(size=2)
    events = [BusEvent("c:x", "message", {"n": n}, "other") for n in range(3)]
    for event in events:
        inbox.offer(event)
    inbox.offer(Resync())
    assert inbox.overflowed and inbox.dropped == 2
    assert [inbox.receive.receive_nowait(), inbox.receive.receive_nowait()] == events[:2]
