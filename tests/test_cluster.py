"""Two and three full nodes in one trio run, sharing one database and one in-process bus
(tests/cluster_support.py): clients on different nodes chat as on one server (contract §16)."""
from __future__ import annotations

from typing import Any

import trio
from cluster_support import Cluster, running_cluster
from conftest import (
    RATE_LIMITS_OFF,
    Client,
    history_messages,
    join,
    make_settings,
    named,
    send_text,
    settle,
    text,
)

from winkr.config import Settings


def cluster_settings(tmp_path: Any, **overrides: Any) -> Settings:
    return make_settings(tmp_path, limits=RATE_LIMITS_OFF, **overrides)


async def pair_across(cluster: Cluster, *, alice_joined: bool = True,
                      bob_joined: bool = True) -> tuple[Client, Client, str]:
    """alice on node 0, bob on node 1, one conversation between them."""
    alice = await cluster.node(0).connect("alice")
    bob = await cluster.node(1).connect("bob")
    conv = await cluster.node(0).conversation(alice, "bob")
    await bob.expect("conversation:created")  # created on node 0, told on node 1
    if alice_joined:
        await join(alice, conv)
    if bob_joined:
        await join(bob, conv)
    await settle(alice, bob)
    return alice, bob, conv


async def test_clients_on_two_nodes_chat_with_receipts_and_reads(autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        sent = await send_text(alice, conv, "hi from node 0")
        got = await bob.expect("message:new")
        assert got["data"]["message"] == sent
        assert got["data"]["sender"] == {"id": "alice", "username": "name-alice", "avatar_url": None}
        delivered = await alice.expect("message:delivered")  # recorded on node 1, told on node 0
        assert delivered["data"]["message_id"] == sent["id"] and delivered["data"]["recipient_id"] == "bob"

        reply = await bob.request("message:read", {"conversation_id": conv, "message_id": sent["id"]})
        assert reply["event"] == "message:viewed", reply
        viewed = await alice.expect("message:viewed")
        assert viewed["data"]["reader_id"] == "bob" and viewed["data"]["message_id"] == sent["id"]

        answer = await send_text(bob, conv, "hi from node 1")
        assert answer["seq"] == 2
        assert (await alice.expect("message:new"))["data"]["message"] == answer
        rest = await alice.nothing_more() + await bob.nothing_more()
        assert len(named(rest, "message:delivered")) == 1  # bob's message reached alice: once
        assert named(rest, "message:new") == []


async def test_a_recipient_outside_the_room_on_another_node_gets_the_unread_count(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster, bob_joined=False)
        sent = await send_text(alice, conv, "are you there?")
        unread = await bob.expect("conversation:unread")
        assert unread["data"]["conversation_id"] == conv and unread["data"]["unread_count"] == 1
        delivered = await alice.expect("message:delivered")
        assert delivered["data"]["message_id"] == sent["id"]
        assert named(await bob.nothing_more(), "message:new") == []


async def test_typing_crosses_nodes_and_expires_on_the_receiving_node(autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        await alice.send("typing:start", {"conversation_id": conv})
        started = await bob.expect("typing:indicator")
        assert started["data"]["user_id"] == "alice" and started["data"]["is_typing"] is True
        t0 = trio.current_time()
        stopped = await bob.expect("typing:indicator")  # no stop sent: node 1's own timer ends it
        assert stopped["data"]["is_typing"] is False
        assert 5.9 <= trio.current_time() - t0 <= 6.5
        await alice.send("typing:start", {"conversation_id": conv})
        await bob.expect("typing:indicator", where=lambda e: e["data"]["is_typing"])
        await alice.send("typing:stop", {"conversation_id": conv})
        assert (await bob.expect("typing:indicator"))["data"]["is_typing"] is False


async def test_concurrent_senders_on_three_nodes_get_one_gap_free_seq(autojump_clock: Any, tmp_path: Any) -> None:
    per_sender = 15
    async with running_cluster(cluster_settings(tmp_path), nodes=3) as cluster:
        users = ["alice", "bob", "carol"]
        clients = [await cluster.node(i).connect(user) for i, user in enumerate(users)]
        reply = await clients[0].request("conversation:create", {"participant_ids": ["bob", "carol"]})
        conv = reply["data"]["conversation"]["id"]
        for client in clients:
            await join(client, conv)
        await settle(*clients)

        async def storm(client: Client) -> None:
            for n in range(per_sender):
                await client.send("message:send", text(conv, f"{client.user_id} {n}"))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(storm, client)
        total = per_sender * len(clients)
        for client in clients:
            seqs: list[int] = []
            while len(seqs) < total:
                event = await client.expect("message:new")
                seqs.append(event["data"]["message"]["seq"])
            assert seqs == list(range(1, total + 1)), (client.user_id, seqs)  # in order, no gap, no repeat
            assert named(await client.nothing_more(), "message:new") == []
        assert [m["seq"] for m in await history_messages(clients[0], conv)] == list(range(1, total + 1))


async def test_a_message_the_bus_lost_is_filled_from_the_store_at_the_next_one(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        cluster.bus.lose(lambda event, node: event.kind == "message")
        first = await send_text(alice, conv, "lost on the bus")
        assert named(await bob.nothing_more(0.1), "message:new") == []
        cluster.bus.lose(None)
        t0 = trio.current_time()
        second = await send_text(alice, conv, "reveals the gap")
        assert (await bob.expect("message:new"))["data"]["message"] == first  # from the store, first
        assert (await bob.expect("message:new"))["data"]["message"] == second
        assert trio.current_time() - t0 < 1  # at once, not at the next position check
        assert named(await bob.nothing_more(), "message:new") == []


async def test_a_lost_last_message_arrives_by_the_position_check_or_a_reconnect(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        cluster.bus.lose(lambda event, node: event.kind == "message")
        lost = await send_text(alice, conv, "nothing follows me")
        t0 = trio.current_time()
        got = await bob.expect("message:new")  # the room's periodic position check (30 s)
        assert got["data"]["message"] == lost and trio.current_time() - t0 <= 31
        again = await send_text(alice, conv, "lost too")
        cluster.bus.reconnect(cluster.nodes[1].server.node_id)  # what a broker says after a reconnect
        assert (await bob.expect("message:new"))["data"]["message"] == again
        assert trio.current_time() - t0 < 35
        assert named(await bob.nothing_more(), "message:new") == []


async def test_a_sender_sees_messages_of_other_nodes_before_its_own_later_one(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        cluster.bus.lose(lambda event, node: event.kind == "message")
        from_bob = await send_text(bob, conv, "alice's node never hears this")
        cluster.bus.lose(None)
        t0 = trio.current_time()
        from_alice = await send_text(alice, conv, "my send reads what came before")
        got = await alice.expect("message:new")
        assert got["data"]["message"] == from_bob and from_alice["seq"] == from_bob["seq"] + 1
        assert trio.current_time() - t0 < 1
        assert alice.events() == []  # from_bob came before the acknowledgement, not after it


async def test_idempotent_send_through_two_nodes_is_stored_once(autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        alice_elsewhere = await cluster.node(1).connect("alice")
        first = await send_text(alice, conv, "once", client_message_id="cm-1")
        retry = await send_text(alice_elsewhere, conv, "once", client_message_id="cm-1")
        assert retry == first
        assert [m["seq"] for m in await history_messages(bob, conv)] == [1]


async def test_delete_and_block_cross_nodes(autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        sent = await send_text(alice, conv, "regret")
        await bob.expect("message:new")
        reply = await alice.request("message:delete", {"conversation_id": conv, "message_id": sent["id"]})
        assert reply["event"] == "message:deleted", reply
        assert (await bob.expect("message:deleted"))["data"]["message_id"] == sent["id"]

        reply = await bob.request("user:block", {"user_id": "alice"})
        assert reply["event"] == "user:blocked", reply
        closed = await alice.expect("conversation:closed")
        assert closed["data"]["conversation_id"] == conv
        refused = await alice.request("message:send", text(conv, "still there?"))
        assert refused["event"] == "error" and refused["data"]["code"] == "NOT_FOUND", refused
        assert named(await bob.nothing_more(), "message:new") == []
