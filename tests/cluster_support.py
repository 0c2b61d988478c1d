"""Several full winkr nodes in one trio run, for the multi-node tests (contract §16).

Each node is a complete ``Server`` (its own gateway, actors, store writer and readers) with its
own ``node_id``, on the test's database (one SQLite file, or one PostgreSQL schema), and all
share one ``InProcessBroker`` (and, once they use one, one in-process presence registry).
Everything runs under MockClock like the single-node harness. ``Cluster.node(i)`` is a
``Harness`` for connecting clients to node ``i``; ``kill(i)`` cancels a node at once, without
its graceful shutdown (what ``kill -9`` leaves behind, minus the database: it was committed).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio
import trio.testing
from conftest import SECRET, Client, Harness, bearer, joined_pair, welcomed
from trio_websocket import ConnectionRejected, WebSocketConnection, wrap_client_stream

from winkr.broker import InProcessBroker
from winkr.clock import trio_wall_clock
from winkr.config import Settings
from winkr.registry import InProcessRegistry
from winkr.server import Server
from winkr.store.writer import run_inline


@attrs.define
class Node:
    harness: Harness
    scope: trio.CancelScope
    stopped: trio.Event

    @property
    def server(self) -> Server:
        return self.harness.server


@attrs.define
class Cluster:
    bus: InProcessBroker
    registry: InProcessRegistry
    nodes: list[Node]
    clients: trio.Nursery
    servers: trio.Nursery
    settings: Settings

    def node(self, index: int) -> Harness:
        return self.nodes[index].harness

    async def kill(self, index: int) -> None:
        """Stop node ``index`` abruptly: its tasks are cancelled, nobody is told goodbye, its
        heartbeats stop (the others find it dead after ``node_ttl``)."""
        node = self.nodes[index]
        node.scope.cancel()
        await node.stopped.wait()

    async def add_node(self, settings: Settings | None = None) -> Harness:
        """Start one more node on the same database and bus; returns its harness."""
        base = settings if settings is not None else self.settings
        node_settings = attrs.evolve(base, node_id=f"node{len(self.nodes)}")
        if node_settings.clustered:  # the nodes meet in Redis, as separate processes would
            server = Server(node_settings, SECRET, clock=trio_wall_clock(), run_sync=run_inline)
        else:
            server = Server(node_settings, SECRET, clock=trio_wall_clock(), run_sync=run_inline, bus=self.bus,
                            registry=self.registry)
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await server.serve([], task_status=task_status)
            finally:
                stopped.set()

        await self.servers.start(run)
        node = Node(Harness(server, self.clients, node_settings), scope, stopped)
        self.nodes.append(node)
        return node.harness


@asynccontextmanager
async def running_cluster(settings: Settings, nodes: int = 2) -> AsyncIterator[Cluster]:
    """``nodes`` servers on ``settings`` (each with node id ``node<i>``) sharing one bus, for the
    body of the ``async with``; shut down gracefully after it. With a ``broker_url`` the nodes
    use that Redis (its broker and presence registry) instead of the in-process ones."""
    bus = InProcessBroker(shared=True)
    registry = InProcessRegistry(shared=True)
    async with trio.open_nursery() as clients:
        async with trio.open_nursery() as servers:
            cluster = Cluster(bus, registry, [], clients, servers, settings)
            try:
                for _ in range(nodes):
                    await cluster.add_node()
                yield cluster
            finally:
                for node in cluster.nodes:
                    node.server.request_shutdown()
        clients.cancel_scope.cancel()


async def attempt(harness: Harness, user_id: str) -> Client | None:
    """A connection of ``user_id``, or None when the handshake is refused. The accepted one
    lives in a task of the harness's client nursery."""
    result: list[WebSocketConnection] = []
    done = trio.Event()

    async def run() -> None:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        harness.server.accept_stream(server_stream)
        try:
            async with trio.open_nursery() as inner:
                result.append(await wrap_client_stream(inner, client_stream, "localhost", "/ws",
                                                       extra_headers=bearer(harness.token(user_id))))
                done.set()
                await trio.sleep_forever()
        except* ConnectionRejected:
            pass
        finally:
            done.set()

    harness.nursery.start_soon(run)
    await done.wait()
    return await welcomed(result[0], user_id) if result else None


async def pair_across(cluster: Cluster, *, alice_joined: bool = True,
                      bob_joined: bool = True) -> tuple[Client, Client, str]:
    """alice on node 0, bob on node 1, one conversation between them (``joined_pair``)."""
    return await joined_pair(cluster.node(0), alice_joined=alice_joined, bob_joined=bob_joined,
                             bob_on=cluster.node(1))
