"""winkr.client against the real server code, in-process under MockClock (tests/client_support.py):
round trips, refusals, backoff, exactly-once catch-up across a crash and restart, queued sends,
token expiry and refresh, typing debounce, close()."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from client_support import Board, Recorder
from conftest import bearer, until, welcomed
from trio_websocket import wrap_client_stream, wrap_server_stream

from winkr.client import MemoryCache, WinkrError, open_client
from winkr.config import Settings


@pytest.fixture
def board(settings: Settings, watchdog: dict[str, Any]) -> Board:
    return Board(settings)


async def _conversation(client: Any, *others: str) -> str:
    reply = await client.request("conversation:create", {"participant_ids": list(others)})
    return str(reply["data"]["conversation"]["id"])


async def test_round_trip_events_and_errors(board: Board, watchdog: dict[str, Any]) -> None:
    watchdog["token"] = trio.lowlevel.current_trio_token()
    async with board.serving(), board.client(board.token("alice")) as alice, \
            board.client(board.token("bob")) as bob:
        assert alice.state == "open" and alice.user_id == "alice"
        got_bob = Recorder().attach(bob)
        got_alice = Recorder().attach(alice)
        conversation = await _conversation(alice, "bob")
        joined = await bob.join(conversation)
        assert joined["event"] == "conversation:joined" and joined["ref"]
        await alice.join(conversation)
        sent = await alice.send_message(conversation, "hi bob", metadata={"k": 1})
        assert sent["seq"] == 1 and sent["content"] == "hi bob" and sent["client_message_id"]
        await until(lambda: got_bob.seqs.get(conversation) == [1])
        assert got_alice.seqs[conversation] == [1], "the ack is the sender's own message:new"
        again = await alice.send_message(conversation, "hi bob", client_message_id=sent["client_message_id"])
        assert again["id"] == sent["id"], "a resend returns the original"
        await trio.sleep(1)
        assert got_alice.seqs[conversation] == [1] and got_bob.seqs[conversation] == [1], "and emits nothing twice"
        viewed = await bob.mark_read(conversation, sent["id"])
        assert viewed["event"] == "message:viewed"
        await until(lambda: bool(got_alice.named("message:viewed")))
        page = await bob.history(conversation, limit=10)
        assert [m["seq"] for m in page["messages"]] == [1] and page["has_more"] is False
        assert [m["seq"] for m in await bob.cache.get(conversation)] == [1]
        with pytest.raises(WinkrError) as refused:
            await alice.request("user:status", {"status": "dancing"})
        assert refused.value.code == "VALIDATION_ERROR"
        assert refused.value.details == {"field": "status"}
        assert refused.value.envelope is not None and refused.value.envelope["event"] == "error"
        with pytest.raises(WinkrError) as too_big:
            await alice.send_message(conversation, "x" * 40_000)
        assert too_big.value.code == "MESSAGE_TOO_LARGE"


async def test_first_connect_refused_raises_and_never_retries(board: Board) -> None:
    async with board.serving():
        with pytest.raises(WinkrError) as refused:
            async with board.client("not-a-jwt"):
                pytest.fail("connected with a bad token")
        assert refused.value.code == "UNAUTHORIZED"
        await trio.sleep(120)
        assert len(board.attempts) == 1
    with pytest.raises(WinkrError) as down:
        async with board.client(lambda: board.token("alice")):
            pytest.fail("connected to nothing")
    assert down.value.code == "CONNECTION_ERROR"
    assert len(board.attempts) == 2


async def test_backoff_is_exponential_full_jitter_and_capped(board: Board) -> None:
    for jitter in (1.0, 0.5):
        board.attempts.clear()
        async with board.serving() as server:
            client_cm = board.client(lambda: board.token("alice"), random=lambda j=jitter: j)
            async with client_cm as alice:
                board.server = None  # nothing accepts from now on
                dropped_at = trio.current_time()
                await board.drop_all()
                await until(lambda: len(board.attempts) >= 9, timeout=400)
                assert alice.state == "reconnecting"
                board.server = server
                await until(lambda: alice.state == "open", timeout=60)
        times = [dropped_at] + [t for t, _ in board.attempts[1:]]
        gaps = [round(b - a, 3) for a, b in zip(times, times[1:])]
        windows = [1, 2, 4, 8, 16, 30, 30, 30]
        assert gaps[:8] == [pytest.approx(w * jitter, abs=0.05) for w in windows], gaps
        tokens = [token for _, token in board.attempts]
        assert len(tokens) == len(board.attempts) and all(tokens), "the token function is asked every time"


async def test_crash_restart_catch_up_exactly_once_in_order(board: Board, watchdog: dict[str, Any]) -> None:
    watchdog["token"] = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as tasks:
        async with board.serving():
            cm_alice = board.client(lambda: board.token("alice"))
            cm_bob = board.client(lambda: board.token("bob"))
            alice = await _enter(tasks, cm_alice)
            bob = await _enter(tasks, cm_bob)
            got_alice, got_bob = Recorder().attach(alice), Recorder().attach(bob)
            conversation = await _conversation(alice, "bob", "carol")
            await alice.join(conversation)
            await bob.join(conversation)
            for n in range(3):
                await alice.send_message(conversation, f"before {n}")
            await until(lambda: got_bob.seqs.get(conversation) == [1, 2, 3])
            await board.drop_all()  # the server "dies": every connection cut at once
        assert board.server is None
        # While it is down, alice sends twice: both wait for the connection.
        queued: list[dict[str, Any]] = []

        async def send_later(text: str) -> None:
            queued.append(await alice.send_message(conversation, text))

        tasks.start_soon(send_later, "while down 1")
        await trio.sleep(0.5)
        tasks.start_soon(send_later, "while down 2")
        await trio.sleep(3)
        assert alice.state == "reconnecting" and bob.state == "reconnecting"
        async with board.serving():
            # Carol writes before alice and bob are back.
            carol = await _raw_client(board, "carol")
            for n in range(4):
                await carol.send("message:send", {"conversation_id": conversation, "type": "text",
                                                  "content": f"carol {n}"})
            await until(lambda: alice.state == "open" and bob.state == "open", timeout=60)
            await until(lambda: len(queued) == 2 and len(got_bob.seqs[conversation]) >= 9, timeout=60)
            await trio.sleep(5)  # anything doubled would have arrived by now
            expected = list(range(1, 10))
            assert got_bob.seqs[conversation] == expected
            assert got_alice.seqs[conversation] == expected
            assert set(got_bob.replayed) >= {4, 5, 6, 7}, "carol's messages came from history"
            assert sorted(m["content"] for m in queued) == ["while down 1", "while down 2"]
            page = await bob.history(conversation, limit=100)
            assert [m["seq"] for m in page["messages"]] == expected, "nothing stored twice"
            await alice.close()
            await bob.close()
            await carol.ws.aclose()
        tasks.cancel_scope.cancel()


async def _enter(nursery: trio.Nursery, cm: Any) -> Any:
    """Enter an async context manager in a task of ``nursery`` (kept until the nursery ends)."""
    ready: trio.MemorySendChannel[Any]
    ready, got = trio.open_memory_channel[Any](1)

    async def hold() -> None:
        async with cm as value:
            await ready.send(value)
            await trio.sleep_forever()

    nursery.start_soon(hold)
    return await got.receive()


async def _raw_client(board: Board, user_id: str) -> Any:
    """A plain protocol client (conftest's Client) on the board's running server."""
    assert board.server is not None
    client_stream, server_stream = trio.testing.memory_stream_pair()
    board.server.accept_stream(server_stream)
    nursery = board.server._connections
    assert nursery is not None
    ws = await wrap_client_stream(nursery, client_stream, "localhost", "/ws",
                                  extra_headers=bearer(board.token(user_id)))
    return await welcomed(ws, user_id)


async def test_token_expiry_static_token_stops_function_reconnects(board: Board) -> None:
    async with board.serving():
        async with board.client(board.token("alice", ttl=30)) as alice:
            got = Recorder().attach(alice)
            await trio.sleep(31)
            assert alice.state == "closed"
            assert [e["data"]["reason"] for e in got.named("connection:closed")] == ["token_expired"]
            await trio.sleep(120)
            assert len(board.attempts) == 1
        board.attempts.clear()
        async with board.client(lambda: board.token("alice", ttl=30)) as alice:
            # The 60 s margin is capped at half the remaining life: a refresh every 15 s.
            got = Recorder().attach(alice)
            await trio.sleep(100)
            assert alice.state == "open"
            assert got.named("connection:closed") == [] and len(board.attempts) == 1
            assert len(got.named("auth:refreshed")) >= 4


async def test_token_function_reconnects_after_4001(board: Board) -> None:
    async with board.serving():
        issued: list[str] = []

        def token() -> str:
            # The second call (the auth:refresh) gets a token the server refuses, so the
            # connection runs into its exp and the server closes it with 4001.
            issued.append("refused-by-the-server" if len(issued) == 1 else board.token("alice", ttl=20))
            return issued[-1]

        async with board.client(token) as alice:
            got = Recorder().attach(alice)
            conversation = await _conversation(alice, "bob")
            await alice.join(conversation)
            await until(lambda: any(e["data"].get("reason") == "token_expired"
                                    for e in got.named("connection:closed")), timeout=30)
            await until(lambda: alice.state == "open" and len(board.attempts) == 2, timeout=10)
            assert len(issued) == 3 and board.attempts[1][1] == issued[2] != issued[0]
            assert alice.joined == [conversation]


async def test_refused_token_after_restart_is_not_retried(board: Board) -> None:
    async with board.serving():
        async with board.client(board.token("alice", ttl=20)) as alice:
            await board.drop_all()
            board.server = None
            await trio.sleep(25)  # the token expires while the server is away
            async with board.serving():
                await until(lambda: alice.state == "closed", timeout=120)
            attempts = len(board.attempts)
            await trio.sleep(300)
            assert len(board.attempts) == attempts


async def test_typing_debounce_against_the_server(board: Board) -> None:
    async with board.serving(), board.client(board.token("alice")) as alice, \
            board.client(board.token("bob")) as bob:
        conversation = await _conversation(alice, "bob")
        await bob.join(conversation)
        await alice.join(conversation)
        seen: list[tuple[float, bool]] = []
        bob.on("typing:indicator", lambda d, _e: seen.append((trio.current_time(), d["is_typing"])))
        start = trio.current_time()
        for _ in range(15):  # 15 s of keystrokes: longer than the server's 6 s typing expiry
            alice.typing(conversation)
            await trio.sleep(1)
        last_key = trio.current_time() - 1
        await trio.sleep(10)
        assert [typing for _, typing in seen] == [True, False], seen
        assert seen[0][0] - start < 0.1
        assert seen[1][0] - last_key == pytest.approx(3.0, abs=0.1)
        # Sending ends a burst at once.
        seen.clear()
        await alice.typing(conversation)  # awaiting it is optional
        await alice.send_message(conversation, "sent")
        await trio.sleep(0.5)
        assert [typing for _, typing in seen] == [True, False]


async def test_close_stops_reconnecting_and_settles_everything(board: Board) -> None:
    async with board.serving():
        async with board.client(lambda: board.token("alice")) as alice:
            conversation = await _conversation(alice, "bob")
            board.server = None
            await board.drop_all()
            await trio.sleep(2)
            assert alice.state == "reconnecting"
            outcomes: list[str] = []

            async def attempt(coro: Any) -> None:
                try:
                    await coro
                    outcomes.append("ok")
                except WinkrError as exc:
                    outcomes.append(exc.code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt, alice.send_message(conversation, "never"))
                nursery.start_soon(attempt, alice.history(conversation))
                await trio.sleep(0.1)
                await alice.close()
            assert outcomes == ["CLOSED", "CLOSED"]
            assert alice.state == "closed"
            attempts = len(board.attempts)
            await trio.sleep(300)
            assert len(board.attempts) == attempts
            with pytest.raises(WinkrError, match="CLOSED"):
                await alice.request("conversation:list")


async def test_4004_disconnected_is_never_retried() -> None:
    """The server API's revocation (contract §13) closes with 4004; a scripted server plays it."""
    attempts = 0

    @asynccontextmanager
    async def scripted(url: str, headers: list[tuple[str, str]], timeout: float) -> Any:
        nonlocal attempts
        attempts += 1
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            async def serve() -> None:
                request = await wrap_server_stream(nursery, server_stream)
                ws = await request.accept()
                await ws.send_message(orjson.dumps({"event": "connection:established",
                                                    "data": {"user_id": "alice"}}).decode())
                await trio.sleep(5)
                await ws.send_message(orjson.dumps({"event": "connection:closed",
                                                    "data": {"reason": "disconnected", "code": 4004}}).decode())
                await ws.aclose(4004, "disconnected")

            nursery.start_soon(serve)
            ws = await wrap_client_stream(nursery, client_stream, "localhost", "/ws", extra_headers=headers)
            yield ws
            nursery.cancel_scope.cancel()

    states: list[str] = []
    async with open_client("ws://scripted/ws", lambda: "t", connector=scripted, cache=MemoryCache()) as client:
        client.on("state", lambda state, info: states.append(f"{state}:{info['code']}"))
        await trio.sleep(300)
        assert client.state == "closed"
    assert attempts == 1
    assert states == ["closed:4004"]
