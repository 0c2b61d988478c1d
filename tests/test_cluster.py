"""Two and three full nodes in one trio run, sharing one database and one in-process bus
(tests/cluster_support.py): clients on different nodes chat as on one server (contract §16)."""
from __future__ import annotations

from typing import Any

import trio
import trio.testing
from cluster_support import Cluster, attempt, pair_across, running_cluster
from conftest import (
    RATE_LIMITS_OFF,
    Client,
    assert_refused,
    bearer,
    history_messages,
    join,
    make_settings,
    named,
    refused,
    send_text,
    settle,
    text,
    until_closed,
)

from winkr.api.operations import disconnect_user
from winkr.config import Settings
from winkr.server import POSITION_CHECK_SECONDS


def cluster_settings(tmp_path: Any, **overrides: Any) -> Settings:
    return make_settings(tmp_path, limits=RATE_LIMITS_OFF, **overrides)


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


# --- presence across nodes (the shared in-process registry) -------------------------------------

async def contacts_across(cluster: Cluster) -> tuple[Client, Client]:
    """bob on node 1 and alice on node 0, contacts (one conversation), setup frames read."""
    bob = await cluster.node(1).connect("bob")
    alice = await cluster.node(0).connect("alice")
    await cluster.node(0).conversation(alice, "bob")
    await bob.expect("conversation:created")
    await settle(alice, bob)
    return alice, bob


async def test_offline_after_grace_once_and_no_flap_when_reconnecting_to_another_node(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob = await contacts_across(cluster)
        await alice.close()
        t0 = trio.current_time()
        offline = await bob.expect("user:offline")  # alice's node alone decides, after the grace period
        assert offline["data"]["user_id"] == "alice" and 5 <= trio.current_time() - t0 < 6

        back = await cluster.node(1).connect("alice")  # comes back through the other node
        assert (await bob.expect("user:online"))["data"]["user_id"] == "alice"
        await back.close()
        await trio.sleep(2)  # within the grace period ...
        alice_again = await cluster.node(0).connect("alice")  # ... back on the first node
        events = await bob.nothing_more(30)
        assert named(events, "user:offline") == [] and named(events, "user:online") == []  # no flap
        reply = await bob.request("conversation:list")
        online = {p["id"]: p["online"] for p in reply["data"]["conversations"][0]["participants"]}
        assert online.get("alice") is True, reply
        await alice_again.close()


async def test_the_connection_cap_counts_every_node(autojump_clock: Any, tmp_path: Any) -> None:
    settings = make_settings(tmp_path, limits={**RATE_LIMITS_OFF, "connections_per_user": 2,
                                               "connections_per_minute": 0})
    async with running_cluster(settings, nodes=3) as cluster:
        first = await cluster.node(0).connect("alice")
        await cluster.node(1).connect("alice")
        rejection = await refused(cluster.node(2), bearer(cluster.node(2).token("alice")))
        assert_refused(rejection, 429, "CONNECTION_ERROR")
        await first.close()
        await trio.sleep(0.01)
        await cluster.node(2).connect("alice")  # the slot freed on node 0 is usable on node 2


async def test_a_killed_node_s_users_go_offline_and_free_their_slots(autojump_clock: Any, tmp_path: Any) -> None:
    settings = make_settings(tmp_path, limits={**RATE_LIMITS_OFF, "connections_per_user": 1,
                                               "connections_per_minute": 0})
    async with running_cluster(settings, nodes=3) as cluster:
        alice, bob = await contacts_across(cluster)
        assert await attempt(cluster.node(2), "alice") is None  # the cap (1) holds across nodes
        t0 = trio.current_time()
        await cluster.kill(0)  # alice's only connection dies with it, nobody says goodbye
        for _ in range(40):  # a client retrying every 0.25 s
            if (again := await attempt(cluster.node(2), "alice")) is not None:
                break
            await trio.sleep(0.25)
        assert 2.5 <= trio.current_time() - t0 <= 5  # the slot frees with node 0's lease (§17.8)
        # She came back before her contacts were told: no offline, no second online (§17.10).
        events = await bob.nothing_more(30)
        assert named(events, "user:offline") == [] and named(events, "user:online") == []

        t1 = trio.current_time()
        await cluster.kill(2)  # now she goes for good
        offline = await bob.expect("user:offline")
        assert offline["data"]["user_id"] == "alice"
        assert 5 <= trio.current_time() - t1 <= 5 + 15  # grace + 15 s (contract §16)
        assert named(await bob.nothing_more(30), "user:offline") == []  # told once
        del again


async def test_reconnecting_elsewhere_before_a_dead_node_is_noticed_causes_no_flap(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path), nodes=3) as cluster:
        alice, bob = await contacts_across(cluster)
        await cluster.kill(0)
        await cluster.node(2).connect("alice")  # her client reconnects at once, through the LB
        events = await bob.nothing_more(30)
        assert named(events, "user:offline") == [] and named(events, "user:online") == []


async def test_appearing_offline_on_one_node_is_seen_on_the_other(autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob = await contacts_across(cluster)
        alice_laptop = await cluster.node(1).connect("alice")
        reply = await alice.request("user:status", {"status": "offline"})
        assert reply["event"] != "error", reply
        assert (await bob.expect("user:offline"))["data"]["user_id"] == "alice"
        reply = await alice_laptop.request("user:status", {"status": "online"})
        assert reply["event"] != "error", reply
        assert (await bob.expect("user:online"))["data"]["user_id"] == "alice"
        assert named(await bob.nothing_more(), "user:online") == []


async def test_a_revocation_through_one_node_closes_and_refuses_everywhere(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob = await contacts_across(cluster)
        old_token = cluster.node(1).token("bob")
        await trio.sleep(1)  # a token issued before the revocation's second
        asked = await disconnect_user(cluster.nodes[0].server.gateway.services, "bob", revoke_tokens=True)
        assert asked == 1  # bob's one connection, on the other node
        events, code = await until_closed(bob)
        assert code == 4004, events
        rejection = await refused(cluster.node(1), bearer(old_token))
        assert_refused(rejection, 401, "UNAUTHORIZED")


async def test_after_a_block_on_one_node_presence_stops_on_the_other(autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob = await contacts_across(cluster)
        reply = await bob.request("user:block", {"user_id": "alice"})
        assert reply["event"] == "user:blocked", reply
        await alice.expect("conversation:closed")
        await settle(alice, bob)
        await alice.close()
        again = await cluster.node(0).connect("alice")
        await again.close()
        events = await bob.nothing_more(30)
        assert named(events, "user:offline") == [] and named(events, "user:online") == []


async def test_an_unmatch_on_one_node_closes_for_the_other_and_ends_presence(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice = await cluster.node(0).connect("alice")
        bob = await cluster.node(1).connect("bob")
        conv = await cluster.node(0).conversation(alice, "bob")
        await bob.expect("conversation:created")
        await join(bob, conv)
        await settle(alice, bob)
        reply = await alice.request("conversation:close", {"conversation_id": conv})
        assert reply["event"] == "conversation:closed", reply
        assert (await bob.expect("conversation:closed"))["data"]["conversation_id"] == conv
        refused_send = await bob.request("message:send", text(conv, "hello?"))
        assert refused_send["data"]["code"] == "NOT_FOUND", refused_send
        await alice.close()
        assert named(await bob.nothing_more(30), "user:offline") == []


async def test_after_a_bus_outage_connections_outside_the_room_get_the_unread_counts_again(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster, bob_joined=False)
        lost_since = cluster.nodes[1].server.clock()
        cluster.bus.lose(lambda event, node: True)  # the bus is away: nothing reaches node 1
        await send_text(alice, conv, "one")
        last = await send_text(alice, conv, "two")
        assert named(await bob.nothing_more(1), "conversation:unread") == []
        cluster.bus.lose(None)
        cluster.bus.reconnect(cluster.nodes[1].server.node_id, since=lost_since)
        unread = await bob.expect("conversation:unread")
        assert unread["data"]["conversation_id"] == conv and unread["data"]["unread_count"] == 2
        assert unread["data"]["last_message"]["id"] == last["id"]


async def test_the_message_limit_counts_a_user_s_sends_through_every_node(autojump_clock: Any, tmp_path: Any) -> None:
    settings = make_settings(tmp_path, limits={**RATE_LIMITS_OFF, "messages_per_minute": 3})
    async with running_cluster(settings) as cluster:
        alice, bob, conv = await pair_across(cluster)
        alice_laptop = await cluster.node(1).connect("alice")
        await send_text(alice, conv, "one")
        await send_text(alice_laptop, conv, "two")
        await send_text(alice, conv, "three")
        refused_send = await alice_laptop.request("message:send", text(conv, "four"))
        assert refused_send["event"] == "error" and refused_send["data"]["code"] == "RATE_LIMITED", refused_send
        assert [m["seq"] for m in await history_messages(bob, conv)] == [1, 2, 3]


async def test_an_ephemeral_photo_is_erased_even_when_the_node_that_set_its_deadline_dies(
        autojump_clock: Any, tmp_path: Any) -> None:
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        ref = await alice.send("message:send", {"conversation_id": conv, "type": "photo_ephemeral", "content": "peek",
                                                "metadata": {"url": "https://cdn.winkr.test/p/abc.jpg",
                                                             "ttl_seconds": 5}})
        message = (await alice.expect("message:new", ref=ref))["data"]["message"]
        await bob.expect("message:new")
        reply = await bob.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
        assert reply["event"] == "message:viewed", reply
        read_at = trio.current_time()
        await cluster.kill(1)  # the node whose reaper knew the deadline
        deleted = await alice.expect("message:deleted")
        assert deleted["data"]["message_id"] == message["id"] and deleted["data"]["deleted_by"] == "system"
        assert trio.current_time() - read_at <= 5 + 30  # node 0's reaper looks at least every 30 s


async def test_a_position_check_the_store_fails_is_made_again_at_the_next_one(
        autojump_clock: Any, tmp_path: Any) -> None:
    """Every 30 s each node reads its awake rooms' positions on a reader. When that read
    failed (PostgreSQL restarted: the pool's connections dead) the exception ended the whole
    node ("winkr: cannot open the database ...: terminating connection due to administrator
    command", exit 2); now the check is made again at the next interval."""
    async with running_cluster(cluster_settings(tmp_path)) as cluster:
        alice, bob, conv = await pair_across(cluster)
        store = cluster.nodes[0].server.gateway.services.store  # one database behind every node
        # A real failure of the real store, for the readers too: the conversations table is gone.
        await store.call(lambda s: s.db.execute("ALTER TABLE conversations RENAME TO conversations_away"))
        await trio.sleep(POSITION_CHECK_SECONDS + 1)  # every node's check failed meanwhile
        await store.call(lambda s: s.db.execute("ALTER TABLE conversations_away RENAME TO conversations"))
        cluster.bus.lose(lambda event, node: event.kind == "message")
        lost = await send_text(alice, conv, "found by the next position check")
        t0 = trio.current_time()
        got = await bob.expect("message:new")
        assert got["data"]["message"] == lost and trio.current_time() - t0 <= POSITION_CHECK_SECONDS + 1
