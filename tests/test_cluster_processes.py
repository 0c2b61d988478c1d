"""More than one node on real engines (contract §16, §17.8-10): ``winkr serve`` processes on
one PostgreSQL schema and one Redis, real clients on loopback, the real clock.

- two nodes: clients on different nodes chat (messages both ways, receipts, typing, presence);
- ``kill -9`` of a node under load: nothing acknowledged is lost, its clients reconnect to the
  other node and catch up, and a partner of a user who does not come back sees ``user:offline``
  within the grace period plus 15 s;
- Redis killed and restarted under load (a ``redis-server`` of the test's own): ``/readyz`` is
  503 while it is away and 200 once it is back; after catch-up every acknowledged message
  reached every receiver once, in order;
- three nodes, concurrent senders into one conversation: one gap-free ``seq``;
- scripts/loadtest.py driving two nodes: nothing lost, cross-node latency reported;
- the connection cap across nodes: a slot closed on one node is usable on the other within
  5 s, one held by a killed node once its lease lapses.

Each test has its own PostgreSQL schema and Redis key prefix, starts its processes itself and
kills them by PID; every wait is bounded (``cluster_processes.WAIT``)."""
from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cluster_processes import SECRET, WAIT, OwnRedis, Peer, Progress, token
from conftest import make_settings
from processes import Servers
from trio_websocket import ConnectionClosed

from scripts._common import RunningServer
from winkr.registry.base import NODE_TTL_SECONDS

pytestmark = [pytest.mark.postgres_only, pytest.mark.trio(run=trio.run)]

ROOT = Path(__file__).resolve().parent.parent
GRACE = 1.0  # presence_grace for these nodes (seconds)
OFFLINE_BOUND = GRACE + 15.0  # contract §16: partners see user:offline within the grace plus 15 s


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.kill_all()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path)
    redis.start()
    yield redis
    redis.kill()


class Nodes:
    """Starts nodes of one cluster: the test's schema, one Redis, the test's key prefix."""

    def __init__(self, servers: Servers, database_url: str, redis_url: str, prefix: str) -> None:
        self.servers, self.database_url, self.redis_url, self.prefix = servers, database_url, redis_url, prefix
        self.started: list[RunningServer] = []
        self.extra_env: dict[str, str] = {}

    def start(self, name: str) -> RunningServer:
        node = self.servers.start(None, args=["--log-format", "json"], WINKR_JWT_SECRET=SECRET,
                                  WINKR_DATABASE_URL=self.database_url, WINKR_BROKER_URL=self.redis_url,
                                  WINKR_REDIS_KEY_PREFIX=self.prefix, WINKR_NODE_ID=name,
                                  WINKR_PRESENCE_GRACE=str(GRACE), **LIMITS_OFF, **self.extra_env)
        self.started.append(node)
        return node


LIMITS_OFF = {"WINKR_MESSAGES_PER_MINUTE": "0", "WINKR_MESSAGES_PER_HOUR": "0", "WINKR_MESSAGES_PER_DAY": "0",
              "WINKR_INBOUND_EVENTS_PER_SECOND": "0"}  # the load is the test's, not an abuser's


@pytest.fixture
def nodes(tmp_path: Path, servers: Servers, redis_url: str, redis_prefix: str, engine: Any) -> Nodes:
    database_url = make_settings(tmp_path).database_url
    assert database_url is not None and database_url.startswith("postgresql://")
    return Nodes(servers, database_url, redis_url, redis_prefix)


async def pair(nursery: trio.Nursery, sender_url: str, receiver_url: str, sender: str,
               receiver: str) -> tuple[Peer, Peer, str]:
    """``sender`` and ``receiver`` connected to their nodes, in one conversation both joined."""
    a, b = Peer(sender, sender_url), Peer(receiver, receiver_url)
    await a.connect(nursery)
    await b.connect(nursery)
    created = await a.request("conversation:create", {"participant_ids": [receiver]})
    assert created["event"] == "conversation:created", created
    conv = created["data"]["conversation"]["id"]
    await b.wait_for(lambda e: e["event"] == "conversation:created")  # across nodes, on u:{receiver}
    for peer in (a, b):
        joined = await peer.request("conversation:join", {"conversation_id": conv})
        assert joined["event"] == "conversation:joined", joined
    return a, b, conv


def text(conv: str, content: str, cmid: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"conversation_id": conv, "content": content, "type": "text", "metadata": {}}
    if cmid is not None:
        data["client_message_id"] = cmid
    return data


async def test_clients_on_two_nodes_chat(nodes: Nodes) -> None:
    node1, node2 = nodes.start("n1"), nodes.start("n2")
    async with trio.open_nursery() as nursery:
        alice, bob, conv = await pair(nursery, node1.url, node2.url, "alice", "bob")
        sent = []
        for n in range(10):
            for peer in (alice, bob):
                ack = await peer.request("message:send", text(conv, f"{peer.user_id} {n}"))
                assert ack["event"] == "message:new", ack
                sent.append(ack["data"]["message"])
        assert [m["seq"] for m in sent] == list(range(1, 21))
        for peer, other in ((alice, bob), (bob, alice)):
            with trio.fail_after(WAIT):
                while len(peer.messages(conv)) < 10:
                    await peer.changed.wait()
            got = peer.messages(conv)
            assert [m["seq"] for m in got] == [m["seq"] for m in sent if m["sender_id"] == other.user_id]
            assert got == [m for m in sent if m["sender_id"] == other.user_id]  # the same objects
        # Receipts and typing cross too.
        last_of_alice = sent[-2]
        await alice.wait_for(lambda e: e["event"] == "message:delivered"
                             and e["data"]["message_id"] == last_of_alice["id"])
        viewed = await bob.request("message:read", {"conversation_id": conv, "message_id": last_of_alice["id"]})
        assert viewed["event"] == "message:viewed", viewed
        await alice.wait_for(lambda e: e["event"] == "message:viewed" and e["data"]["reader_id"] == "bob"
                             and "ref" not in e)
        await bob.send("typing:start", {"conversation_id": conv})
        await alice.wait_for(lambda e: e["event"] == "typing:indicator" and e["data"]["is_typing"])
        # And presence: bob leaves (his only connection) and alice is told after the grace.
        await bob.aclose()
        await alice.wait_for(lambda e: e["event"] == "user:offline" and e["data"]["user_id"] == "bob",
                             timeout=OFFLINE_BOUND)
        await alice.aclose()
        nursery.cancel_scope.cancel()


async def test_kill_9_of_a_node_under_load_loses_nothing_acknowledged(nodes: Nodes) -> None:
    node1, node2 = nodes.start("n1"), nodes.start("n2")
    pairs = 4
    async with trio.open_nursery() as nursery:
        conversations = []
        for n in range(pairs):
            # Senders alternate between the nodes; every receiver is on node 2 (it survives).
            sender_url = node1.url if n % 2 == 0 else node2.url
            conversations.append(await pair(nursery, sender_url, node2.url, f"s{n}", f"r{n}"))
        # yves receives on node 1 from xena on node 2: after the kill he reconnects to node 2
        # and catches up with message:history after_seq.
        xena, yves, catch_up_conv = await pair(nursery, node2.url, node1.url, "xena", "yves")
        conversations.append((xena, yves, catch_up_conv))
        # carol is on node 1 alone and never comes back; dave, her partner, is on node 2 and
        # sees her come online (across nodes) once they share a conversation.
        dave, carol = Peer("dave", node2.url), Peer("carol", node1.url)
        await dave.connect(nursery)
        assert (await dave.request("conversation:create", {"participant_ids": ["carol"]}))["event"] == \
            "conversation:created"
        await carol.connect(nursery)
        await dave.wait_for(lambda e: e["event"] == "user:online" and e["data"]["user_id"] == "carol")
        acked: dict[str, dict[str, dict[str, Any]]] = {conv: {} for _, _, conv in conversations}
        killed = trio.Event()
        caught_up: list[dict[str, Any]] = []

        async def send_until_stopped(sender: Peer, conv: str, stop: trio.Event) -> None:
            n = 0
            while not stop.is_set():
                cmid = f"{sender.user_id}-{n}"
                while True:  # this message until acknowledged, on whichever node is alive
                    try:
                        ack = await sender.request("message:send", text(conv, cmid, cmid), timeout=10)
                    except (ConnectionClosed, trio.TooSlowError):
                        await killed.wait()
                        if sender.closed.is_set():
                            await sender.connect(nursery, node2.url)  # clients reconnect elsewhere
                        continue
                    assert ack["event"] == "message:new", ack
                    acked[conv][cmid] = ack["data"]["message"]
                    progress.notify()
                    break
                n += 1

        stop, progress = trio.Event(), Progress()
        async with trio.open_nursery() as load:
            for sender, _, conv in conversations:
                load.start_soon(send_until_stopped, sender, conv, stop)
            await progress.wait_until(lambda: sum(map(len, acked.values())) >= 40)
            os.kill(node1.proc.pid, signal.SIGKILL)  # mid-load, no goodbye
            killed_at = trio.current_time()
            killed.set()
            before = sum(map(len, acked.values()))  # the load goes on through node 2
            await progress.wait_until(lambda: sum(map(len, acked.values())) >= before + 40)
            stop.set()
        # yves lost his node: he reconnects to node 2, joins, and reads what he missed.
        await yves.closed.wait()
        seen = max((m["seq"] for m in yves.messages(catch_up_conv)), default=0)
        await yves.connect(nursery, node2.url)
        assert (await yves.request("conversation:join", {"conversation_id": catch_up_conv}))["event"] == \
            "conversation:joined"
        while True:
            page = await yves.request("message:history", {"conversation_id": catch_up_conv, "after_seq": seen,
                                                         "limit": 100})
            caught_up += page["data"]["messages"]
            if not page["data"]["has_more"]:
                break
            seen = page["data"]["messages"][-1]["seq"]
        everything = {m["seq"]: m for m in yves.messages(catch_up_conv) + caught_up}
        assert {m["client_message_id"] for m in everything.values()} >= set(acked[catch_up_conv])
        assert sorted(everything) == list(range(1, len(everything) + 1))
        # carol's partner sees her offline within the grace plus 15 s of the kill.
        await dave.wait_for(lambda e: e["event"] == "user:offline" and e["data"]["user_id"] == "carol",
                            timeout=OFFLINE_BOUND)
        assert trio.current_time() - killed_at <= OFFLINE_BOUND
        for sender, receiver, conv in conversations:
            # Everything acknowledged is in the record, once, gap-free; the receiver (who stayed
            # on node 2) has it all, catching up by after_seq for whatever it missed live.
            history = await receiver.request("message:history", {"conversation_id": conv, "limit": 100})
            stored = history["data"]["messages"]
            assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1)), conv
            by_cmid = {m["client_message_id"]: m for m in stored}
            assert len(by_cmid) == len(stored)  # a re-sent message is not stored twice
            assert set(acked[conv]) <= set(by_cmid), set(acked[conv]) - set(by_cmid)
            for cmid, message in acked[conv].items():
                assert by_cmid[cmid]["seq"] == message["seq"]
            live = receiver.messages(conv)
            assert len({m["seq"] for m in live}) == len(live)  # no message:new twice on one connection
            assert [m["seq"] for m in live] == sorted(m["seq"] for m in live)
            assert sender.user_id  # (the senders of node 1 reconnected to node 2 to get here)
        nursery.cancel_scope.cancel()


async def test_a_redis_restart_under_load_loses_nothing_after_catch_up(
        tmp_path: Path, servers: Servers, own_redis: OwnRedis, redis_prefix: str, engine: Any) -> None:
    database_url = make_settings(tmp_path).database_url
    assert database_url is not None
    cluster = Nodes(servers, database_url, own_redis.url, redis_prefix)
    node1, node2 = cluster.start("n1"), cluster.start("n2")
    async with trio.open_nursery() as nursery:
        conversations = [await pair(nursery, node1.url if n % 2 else node2.url, node2.url if n % 2 else node1.url,
                                    f"s{n}", f"r{n}") for n in range(4)]
        acked: dict[str, list[dict[str, Any]]] = {conv: [] for _, _, conv in conversations}
        progress = Progress()

        async def send(sender: Peer, conv: str, count: int) -> None:
            for n in range(count):
                ack = await sender.request("message:send", text(conv, f"{n}", f"{sender.user_id}-{n}"))
                assert ack["event"] == "message:new", ack  # the database is the record: acks go on
                acked[conv].append(ack["data"]["message"])
                progress.notify()
                await trio.sleep(0.01)

        async with trio.open_nursery() as load:
            for sender, _, conv in conversations:
                load.start_soon(send, sender, conv, 150)
            await progress.wait_until(lambda: min(map(len, acked.values())) >= 30)
            own_redis.kill()
            # Sends go on without Redis; the balancer's check takes the nodes out meanwhile.
            assert await readiness_becomes(node1.port, 503)
            own_redis.start()  # empty: no persistence
            assert await readiness_becomes(node1.port, 200)
        # Within 30 s of Redis's return every receiver has every message once, in order (§17.9).
        for _, receiver, conv in conversations:
            with trio.fail_after(30):
                while len(receiver.messages(conv)) < len(acked[conv]):
                    await receiver.changed.wait()
            assert receiver.messages(conv) == acked[conv]
        assert sum(map(len, acked.values())) == 4 * 150
        nursery.cancel_scope.cancel()


async def readiness_becomes(port: int, status: int, timeout: float = WAIT) -> bool:
    """Whether ``GET /readyz`` on the node answers ``status`` within ``timeout`` (asked every 0.1 s)."""
    for _ in range(int(timeout / 0.1)):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(4096):
                answer += chunk
        await stream.aclose()
        if answer.startswith(f"HTTP/1.1 {status} ".encode()):
            return True
        await trio.sleep(0.1)
    return False


async def test_concurrent_senders_on_three_nodes_into_one_conversation_get_one_gap_free_seq(nodes: Nodes) -> None:
    started = [nodes.start(f"n{i}") for i in range(3)]
    per_sender, senders = 40, 6
    async with trio.open_nursery() as nursery:
        peers = [Peer(f"u{i}", started[i % 3].url) for i in range(senders)]
        for peer in peers:
            await peer.connect(nursery)
        created = await peers[0].request("conversation:create",
                                         {"participant_ids": [p.user_id for p in peers[1:]]})
        assert created["event"] == "conversation:created", created
        conv = created["data"]["conversation"]["id"]
        for peer in peers:
            assert (await peer.request("conversation:join", {"conversation_id": conv}))["event"] == \
                "conversation:joined"
        acked: list[dict[str, Any]] = []

        async def send_all(peer: Peer) -> None:
            for n in range(per_sender):
                ack = await peer.request("message:send", text(conv, f"{peer.user_id} {n}"))
                assert ack["event"] == "message:new", ack
                acked.append(ack["data"]["message"])

        async with trio.open_nursery() as load:
            for peer in peers:
                load.start_soon(send_all, peer)
        total = per_sender * senders
        assert sorted(m["seq"] for m in acked) == list(range(1, total + 1))
        for peer in peers:  # every member sees everyone else's messages once, ascending
            others = total - per_sender
            with trio.fail_after(WAIT):
                while len(peer.messages(conv)) < others:
                    await peer.changed.wait()
            seqs = [m["seq"] for m in peer.messages(conv)]
            assert seqs == sorted(set(seqs)) and len(seqs) == others
        nursery.cancel_scope.cancel()


async def test_the_load_test_drives_two_nodes_and_reports_cross_node_latency(nodes: Nodes) -> None:
    node1, node2 = nodes.start("n1"), nodes.start("n2")
    run = await trio.run_process(
        [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", node1.url, "--url", node2.url,
         f"--secret={SECRET}", "--users", "10", "--rate", "50", "--duration", "2", "--drain", "5", "--json-only"],
        capture_stdout=True, capture_stderr=True, check=False)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    summary = json.loads(run.stdout.decode().splitlines()[-1])
    assert summary["nodes"] == 2 and summary["lost"] == 0 and summary["duplicated"] == 0, summary
    assert summary["delivered_cross_node"] > 0 and summary["cross_node_peer_latency_ms"]["p50"] is not None, summary


async def test_a_freed_connection_slot_is_usable_on_the_other_node(nodes: Nodes) -> None:
    # connections_per_user = 1 on both nodes: the cap counts across them (contract §16), a slot
    # closed on one node is usable on the other within 5 s (§17.8), and one held by a node that
    # was killed frees itself once the node's lease lapses.
    nodes.extra_env = {"WINKR_CONNECTIONS_PER_USER": "1"}
    node1, node2 = nodes.start("n1"), nodes.start("n2")
    async with trio.open_nursery() as nursery:
        first = Peer("alice", node1.url)
        await first.connect(nursery)
        assert await handshake_status(node2.port, "alice") == 429
        await first.aclose()
        closed_at = trio.current_time()
        second = Peer("alice", node2.url)
        await second.connect(nursery)  # retried while refused
        assert trio.current_time() - closed_at <= 5.0
        os.kill(node2.proc.pid, signal.SIGKILL)
        killed_at = trio.current_time()
        third = Peer("alice", node1.url)
        await third.connect(nursery)
        assert trio.current_time() - killed_at <= NODE_TTL_SECONDS + 5.0
        nursery.cancel_scope.cancel()


async def handshake_status(port: int, user_id: str) -> int:
    """The HTTP status a WebSocket handshake of ``user_id`` gets (101 when accepted)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          f"Authorization: Bearer {token(user_id)}\r\n\r\n".encode())
    with trio.fail_after(WAIT):
        head = await stream.receive_some(4096)
    await stream.aclose()
    return int(head.split(b" ", 2)[1])
