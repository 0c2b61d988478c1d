#!/usr/bin/env python3
"""What one step of a message's path costs on this machine, each measured alone (issue 10):
the pieces the realistic shape pays once or several times per message, so that a proposed
change can be priced in µs. Runs in one process, on trio, loopback only; a few seconds.

    .venv-bench/bin/python scripts/bench/micro.py [--n 2000] [--json out.json]

Each figure is the median over ``--repeats`` rounds of the mean over ``--n`` operations (these
machines are shared: the median of rounds resists other work better than one long mean).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import trio
import trio.lowlevel
import trio.testing
from wsproto import ConnectionType
from wsproto.connection import Connection as WsConnection
from wsproto.events import TextMessage

from winkr.actor import Frames, Reply
from winkr.clock import system_wall_clock
from winkr.config import Settings
from winkr.policy import PolicySettings, check_message, default_blocked_words
from winkr.protocol.codec import parse_envelope
from winkr.protocol.requests import MessageSend, structure_request
from winkr.protocol.wire import delivered_data, message_object, sender_object
from winkr.records import Delivery, SendItem
from winkr.store.schema import open_database
from winkr.store.store import Store
from winkr.store.writer import _Request, _run_batch

TEXT = "!#$%,;=?^~!#$%,;=?^~!#$%:" + "x" * 64  # what winkr_adapter sends: punctuation, then padding
FRAME = ('{"event":"message:send","data":{"conversation_id":"c0b5d3a2-0000-4000-8000-000000000001",'
         f'"content":"{TEXT}","type":"text","metadata":{{}}}},"ref":"b"}}')

Bench = Callable[[int], Awaitable[float]]  # runs n operations, returns the seconds they took


def timed_sync(fn: Callable[[], object]) -> Bench:
    async def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - started
    return run


async def channel_hop(n: int) -> float:
    """One actor hop: a request through a bounded memory channel to another task, which wakes."""
    send, receive = trio.open_memory_channel[int](64)
    done = trio.Event()

    async def actor() -> None:
        count = 0
        async for _ in receive:
            count += 1
            if count == n:
                done.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        await trio.testing.wait_all_tasks_blocked()
        started = time.perf_counter()
        for i in range(n):
            await send.send(i)
            await trio.lowlevel.checkpoint()  # let the actor run: one hop, one task switch each way
        await done.wait()
        return time.perf_counter() - started


async def reply_round_trip(n: int) -> float:
    """A request with a ``Reply`` answered by another actor: two hops and two task switches."""
    send, receive = trio.open_memory_channel[Reply[int]](64)

    async def actor() -> None:
        async for reply in receive:
            reply.set(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        started = time.perf_counter()
        for _ in range(n):
            reply: Reply[int] = Reply()
            await send.send(reply)
            await reply.wait()
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return elapsed


async def thread_hop(n: int) -> float:
    """``trio.to_thread.run_sync`` of nothing: the store writer pays it once per commit."""
    started = time.perf_counter()
    for _ in range(n):
        await trio.to_thread.run_sync(int)
    return time.perf_counter() - started


async def cancel_scope_with_deadline(n: int) -> float:
    """``move_on_at`` around an await that does not block: the outbox writer opens two per
    write (the heartbeat timer and the stall limit), the room one per batch."""
    started = time.perf_counter()
    deadline = trio.current_time() + 3600
    for _ in range(n):
        with trio.move_on_at(deadline):
            await trio.lowlevel.checkpoint()
    return time.perf_counter() - started


async def checkpoint(n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await trio.lowlevel.checkpoint()
    return time.perf_counter() - started


async def loopback_send(n: int, size: int = 330) -> float:
    """One ``send_all`` of a ~330-byte frame on a loopback TCP connection (trio's SocketStream),
    while another task reads it: the cost of each frame written as a write of its own."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    payload = b"x" * size
    async with trio.open_nursery() as nursery:
        async def drain(stream: trio.SocketStream) -> None:
            while await stream.receive_some(65536):
                pass

        await nursery.start(trio.serve_listeners, drain, listeners)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        started = time.perf_counter()
        for _ in range(n):
            await client.send_all(payload)
            await trio.lowlevel.checkpoint()  # the reader takes it, as a client would
        elapsed = time.perf_counter() - started
        await client.aclose()
        nursery.cancel_scope.cancel()
    return elapsed


def store_benches(folder: Path) -> dict[str, Callable[[int], float]]:
    """The store writer's transaction for one message of the realistic shape, on a real SQLite
    file (WAL, synchronous=NORMAL): insert + the delivery to the joined recipient (the
    conversation's delivery position moves with last_seq: no delivery row) + commit, and the
    pieces."""
    db = open_database(str(folder / "micro.db"))
    store = Store(db)
    conversations = []
    for k in range(500):
        conversation, _ = store.create_conversation(f"u{2 * k}", [f"u{2 * k + 1}"], is_service=False,
                                                    max_participants=10, now=time.time())
        conversations.append(conversation.id)
    counter = [0]

    def item() -> tuple[str, SendItem]:
        counter[0] += 1
        k = counter[0] % 500
        return conversations[k], SendItem(f"u{2 * k}", "text", TEXT, {}, None, (f"u{2 * k + 1}",))

    def one_request_per_commit(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            conversation, send = item()
            _run_batch(store, [_Request(lambda s, c=conversation, i=send: s.insert_messages(c, [i], time.time()),
                                        None)])
        return time.perf_counter() - started

    def ten_requests_per_commit(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n // 10):
            batch = []
            for _ in range(10):
                conversation, send = item()
                batch.append(_Request(lambda s, c=conversation, i=send: s.insert_messages(c, [i], time.time()), None))
            _run_batch(store, batch)
        return time.perf_counter() - started

    def run_of_32(n: int) -> float:  # the saturation shape: a room's run of 32 sends is one request
        runs = max(1, n // 32)
        started = time.perf_counter()
        for _ in range(runs):
            conversation, _ = item()
            k = conversations.index(conversation)
            run = [SendItem(f"u{2 * k}", "text", TEXT, {}, None, (f"u{2 * k + 1}",)) for _ in range(32)]
            _run_batch(store, [_Request(lambda s, c=conversation, r=run: s.insert_messages(c, r, time.time()),
                                        None)])
        return (time.perf_counter() - started) * n / (runs * 32)  # the time of n messages

    def nobody_reached(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            conversation, send = item()
            bare = SendItem(send.sender_id, send.type, send.content, send.metadata, None, ())
            _run_batch(store, [_Request(lambda s, c=conversation, i=bare: s.insert_messages(c, [i], time.time()),
                                        None)])
        return time.perf_counter() - started

    def empty_transaction(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            _run_batch(store, [_Request(lambda s: None, None)])
        return time.perf_counter() - started

    return {"SQLite: one message per transaction (BEGIN, savepoint, seq, INSERT, delivery, COMMIT)":
            one_request_per_commit,
            "SQLite: the same with nobody reached (nothing written for deliveries)": nobody_reached,
            "SQLite: per message, 10 messages per transaction": ten_requests_per_commit,
            "SQLite: per message, a room's run of 32 in one request and transaction (saturation)": run_of_32,
            "SQLite: an empty transaction (BEGIN, savepoint, COMMIT)": empty_transaction}


def sync_benches() -> dict[str, Callable[[], object]]:
    settings = Settings()
    policy = PolicySettings(blocked_words=default_blocked_words(), pii_policy=settings.pii_policy)
    frames = Frames(system_wall_clock)
    envelope = parse_envelope(FRAME)
    request = structure_request(MessageSend, envelope.data)
    from winkr.records import StoredMessage

    message = StoredMessage("c0b5d3a2-0000-4000-8000-000000000001", 42, "u1", "text", TEXT, {}, None,
                            time.time(), time.time())
    data = {"message": message_object(message), "sender": sender_object("u1", "u1", None)}
    delivery = Delivery(message.conversation_id, 42, "u1", "u2", time.time())
    frame = frames.event("message:new", data)
    proto = WsConnection(ConnectionType.SERVER)
    return {
        "parse_envelope (orjson.loads + checks)": lambda: parse_envelope(FRAME),
        "structure_request(MessageSend) (cattrs)": lambda: structure_request(MessageSend, envelope.data),
        "check_message (type rules, block list, PII) on the bench's text": lambda: check_message(
            request.type, request.content, request.metadata, is_service=False, settings=policy),
        "message:new data (message_object + sender_object)": lambda: {
            "message": message_object(message), "sender": sender_object("u1", "u1", None)},
        "frames.event (orjson.dumps + timestamp) of message:new": lambda: frames.event("message:new", data, "b"),
        "frames.event of message:delivered (+ delivered_data)": lambda: frames.event(
            "message:delivered", delivered_data(delivery)),
        "wsproto: encode one text frame": lambda: proto.send(TextMessage(data=frame)),
        "orjson.dumps alone, message:new": lambda: orjson.dumps({"event": "message:new", "data": data}),
    }


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    results: dict[str, float] = {}
    benches: dict[str, Bench] = {name: timed_sync(fn) for name, fn in sync_benches().items()}
    benches.update({
        "actor hop: memory channel send → another task receives (incl. the task switch)": channel_hop,
        "request + Reply round trip to another actor (2 hops)": reply_round_trip,
        "trio.to_thread.run_sync round trip (the store writer's thread hop)": thread_hop,
        "cancel scope with a deadline (move_on_at) around a checkpoint": cancel_scope_with_deadline,
        "trio checkpoint (one task switch to itself)": checkpoint,
        "loopback send_all of a 330-byte frame + the peer task reading it (a write of its own)": loopback_send,
    })
    for name, bench in benches.items():
        if args.only not in name:
            continue
        rounds = []
        for _ in range(args.repeats):
            n = args.n if "thread" not in name and "loopback" not in name else max(200, args.n // 4)
            rounds.append(await bench(n) / n * 1e6)
        results[name] = round(statistics.median(rounds), 2)
        print(f"{results[name]:9.2f} µs  {name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="winkr-micro-") as tmp:
        for name, fn in store_benches(Path(tmp)).items():
            if args.only not in name:
                continue
            n = max(200, args.n // 4)
            rounds = [fn(n) / n * 1e6 for _ in range(args.repeats)]
            results[name] = round(statistics.median(rounds), 2)
            print(f"{results[name]:9.2f} µs  {name}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--only", default="", help="only the steps whose name contains this (e.g. SQLite)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin to CPU 0 (as the server is in the shapes)")
    args = ap.parse_args()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})  # one core for the trio thread and the worker thread alike
    results = trio.run(main_async, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
