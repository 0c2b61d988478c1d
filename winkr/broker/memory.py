"""The in-process broker: one node's behaviour of old, and the bus several nodes share inside
one trio run (the multi-node tests, ``tests/cluster_support.py``).

Delivery is synchronous: ``publish`` hands each event to the sink of every other node that
subscribes to its topic, in publish order. Like Redis pub/sub it keeps nothing for a node that
is not subscribed. ``lose`` and ``reconnect`` let fault tests drop events and announce a
reconnection, the two ways a real bus fails.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import attrs
import trio

from winkr.broker.base import ALL, BusEvent, Resync, Sink


@attrs.define(eq=False)
class _Node:
    node_id: str
    sink: Sink
    topics: Counter[str] = attrs.Factory(Counter)


class InProcessBroker:
    """The bus. ``attach`` gives each node its ``Broker``. ``shared``: more than one node will
    attach (a lone server's own bus is not shared)."""

    def __init__(self, *, shared: bool = True) -> None:
        self.shared = shared
        self._nodes: dict[str, _Node] = {}
        self._subscribers: dict[str, set[str]] = {}  # topic -> node ids
        self._lose: Callable[[BusEvent, str], bool] | None = None
        self.published = 0  # events handed to at least one other node (tests read it)

    def attach(self, node_id: str, sink: Sink) -> InProcessNode:
        """Join ``node_id`` to the bus; incoming events go to ``sink``. ``ValueError`` if a node
        of that id is attached already."""
        if node_id in self._nodes:
            raise ValueError(f"node {node_id!r} is already attached")
        node = self._nodes[node_id] = _Node(node_id, sink)
        return InProcessNode(self, node)

    def detach(self, node_id: str) -> None:
        """The node is gone (stopped or "killed"): it hears nothing more."""
        node = self._nodes.pop(node_id, None)
        if node is not None:
            for topic in node.topics:
                self._subscribers.get(topic, set()).discard(node_id)

    def lose(self, predicate: Callable[[BusEvent, str], bool] | None) -> None:
        """Fault injection: drop every event for which ``predicate(event, receiving_node_id)``
        is true (``None``: lose nothing again)."""
        self._lose = predicate

    def reconnect(self, node_id: str, since: float | None = None) -> None:
        """Fault injection: tell ``node_id`` its connection to the bus was re-established, as a
        real broker does after a reconnect (``Resync(ALL)``; ``since``: when it was lost)."""
        if (node := self._nodes.get(node_id)) is not None:
            node.sink(Resync(ALL, since))

    def subscribers(self, topic: str) -> frozenset[str]:
        return frozenset(self._subscribers.get(topic, ()))

    def _publish(self, origin: str, events: Sequence[BusEvent]) -> None:
        for event in events:
            receivers = self._subscribers.get(event.topic)
            if not receivers:
                continue
            event = attrs.evolve(event, origin=origin)
            for node_id in list(receivers):
                if node_id == origin or (self._lose is not None and self._lose(event, node_id)):
                    continue
                self.published += 1
                self._nodes[node_id].sink(event)

    def _subscribe(self, node: _Node, topics: Sequence[str]) -> None:
        for topic in topics:
            node.topics[topic] += 1
            if node.node_id in self._nodes:
                self._subscribers.setdefault(topic, set()).add(node.node_id)

    def _unsubscribe(self, node: _Node, topics: Sequence[str]) -> None:
        for topic in topics:
            if node.topics[topic] <= 1:
                node.topics.pop(topic, None)
                receivers = self._subscribers.get(topic)
                if receivers is not None:
                    receivers.discard(node.node_id)
                    if not receivers:
                        del self._subscribers[topic]
            else:
                node.topics[topic] -= 1


class InProcessNode:
    """One node's ``Broker`` on an ``InProcessBroker``."""

    def __init__(self, bus: InProcessBroker, node: _Node) -> None:
        self._bus = bus
        self._node = node
        self.node_id = node.node_id

    def publish(self, events: Sequence[BusEvent]) -> None:
        self._bus._publish(self.node_id, events)

    async def subscribe(self, topics: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled subscribe changes nothing
        self._bus._subscribe(self._node, topics)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def unsubscribe(self, topics: Sequence[str]) -> None:
        self._bus._unsubscribe(self._node, topics)
        await trio.lowlevel.checkpoint()

    @property
    def healthy(self) -> bool:
        return True

    @property
    def shared(self) -> bool:
        return self._bus.shared

    def close(self) -> None:
        self._bus.detach(self.node_id)
