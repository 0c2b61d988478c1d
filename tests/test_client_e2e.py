"""winkr.client against real `winkr serve` processes on loopback: the server is killed with
kill -9 and restarted on the same database and port, and the clients reconnect and catch up
with nothing missed and nothing doubled (real time, not MockClock)."""
from __future__ import annotations

import time
from pathlib import Path

import trio
from conftest import until
from live_server import LiveServer, record, token
from processes import Servers

from winkr.client import Client, open_client


def _recorder(client: Client, conversation_id: str) -> list[int]:
    seqs: list[int] = []
    client.on("message:new", lambda d, _e: d["message"]["conversation_id"] == conversation_id
              and seqs.append(d["message"]["seq"]))
    return seqs


def test_kill9_restart_every_message_exactly_once(tmp_path: Path, servers: Servers) -> None:
    server = LiveServer(servers, tmp_path / "chat.db")
    server.start()
    trio.run(_scenario, server, server.port)


async def _scenario(server: LiveServer, port: int) -> None:
    url = server.url
    async with open_client(url, lambda: token("alice")) as alice, open_client(url, lambda: token("bob")) as bob:
        reply = await alice.request("conversation:create", {"participant_ids": ["bob"]})
        conversation = reply["data"]["conversation"]["id"]
        got_alice, got_bob = _recorder(alice, conversation), _recorder(bob, conversation)
        await alice.join(conversation)
        await bob.join(conversation)
        for n in range(3):
            await (alice if n % 2 else bob).send_message(conversation, f"before {n}")
        await until(lambda: len(got_alice) == 3 and len(got_bob) == 3, 10)  # the first messages

        await trio.to_thread.run_sync(server.kill9)
        async with trio.open_nursery() as nursery:
            for n in range(2):  # queued: the server is gone
                nursery.start_soon(alice.send_message, conversation, f"while down {n}")
            await until(lambda: alice.state == "reconnecting" and bob.state == "reconnecting", 10)  # reconnecting
            # Meanwhile bob's phone writes through a server on another port: alice and bob
            # must find these in history when they are back.
            await trio.to_thread.run_sync(server.start)
            async with open_client(server.url, lambda: token("bob")) as phone:
                for n in range(3):
                    await phone.send_message(conversation, f"from the phone {n}")
            await trio.to_thread.run_sync(server.stop)
            opened: dict[str, float] = {}
            for name, client in (("alice", alice), ("bob", bob)):
                client.on("state", lambda state, _i, name=name: state == "open" and opened.setdefault(
                    name, time.monotonic()))
            listening = await trio.to_thread.run_sync(server.start, port)
            await until(lambda: len(got_alice) >= 8 and len(got_bob) >= 8, 60)  # the catch-up
            caught_up = time.monotonic()
        await trio.sleep(1)  # a late duplicate would show up here
        assert got_alice == list(range(1, 9)), got_alice
        assert got_bob == list(range(1, 9)), got_bob
        page = await alice.history(conversation, limit=100)
        assert [m["seq"] for m in page["messages"]] == list(range(1, 9))
        contents = [m["content"] for m in page["messages"]]
        assert contents[3:6] == [f"from the phone {n}" for n in range(3)], contents
        assert sorted(contents[6:]) == ["while down 0", "while down 1"], contents
        record("python reconnect-to-caught-up after kill -9 + restart",
               restart_to_open_ms=round((max(opened.values()) - listening) * 1000),
               open_to_caught_up_ms=round((caught_up - max(opened.values())) * 1000),
               restart_to_caught_up_ms=round((caught_up - listening) * 1000))
