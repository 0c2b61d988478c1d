#!/usr/bin/env python3
"""Instructions (callgrind's Ir) per operation of the send-path steps issue 10 changed, each
alone: noise-free per-change evidence on a shared machine (timings swing with other work;
instruction counts do not). Each step runs ``--n`` and ``2 * --n`` times in its own process
under ``valgrind --tool=callgrind``; the difference divided by ``--n`` is the step's cost
without start-up. Run it against an older checkout with ``PYTHONPATH=<that checkout>`` to
compare versions of the winkr steps (``policy-*``, ``metrics``); the ``pattern-*`` steps
contrast the old and new shape of a change directly.

    .venv/bin/python scripts/bench/step_ir.py [--n 2000] [--steps policy-plain,metrics,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

LINES = {
    "bench": "!#$%,;=?^~!#$%,;=?^~!#$%:" + "x" * 64,  # what the shared load generator sends
    "plain": "hey, how are you doing tonight? want to grab a coffee tomorrow at the usual place?",
    "short": "haha ok 😂",
}
STEPS = ["policy-bench", "policy-plain", "policy-short", "metrics", "iso", "iso-two-seconds", "send-in",
         "fanout-frames", "records",
         "pattern-two-scopes", "pattern-moved-deadline", "pattern-to-thread", "pattern-own-thread",
         "pattern-channel-hop", "pattern-direct-call", "store-pair", "store-alone"]


def run_step(step: str, n: int) -> None:  # noqa: C901 - one small body per step
    """In the child: ``n`` operations of ``step``."""
    if step.startswith("policy-"):
        from winkr.policy import PolicySettings, check_message, default_blocked_words
        settings = PolicySettings(blocked_words=default_blocked_words())
        line = LINES[step.split("-", 1)[1]]
        for _ in range(n):
            check_message("text", line, {}, is_service=False, settings=settings)
        return
    if step == "metrics":
        from winkr.metrics import Metrics
        metrics = Metrics(["message:send"])
        for _ in range(n):  # what one message of the realistic shape counts
            metrics.event_in("message:send")
            metrics.frame_out("message:new")
            metrics.frame_out("message:new")
            metrics.frame_out("message:delivered")
            metrics.frames_per_write.observe(1)
            metrics.frames_per_write.observe(2)
            metrics.fanout_seconds.observe(0.0012)
            metrics.commit_seconds.observe(0.0004)
            metrics.commit_batch.observe(1)
        return
    if step.startswith("store-"):
        store_step(step, n)
        return
    if step in PER_MESSAGE:
        op = PER_MESSAGE[step]()
        for _ in range(n):
            op()
        return
    import trio
    import trio.lowlevel

    async def two_scopes() -> None:  # the outbox writer before: two new deadline scopes per write
        for _ in range(n):
            with trio.move_on_at(trio.current_time() + 30):
                await trio.lowlevel.checkpoint()
            with trio.move_on_after(20):
                await trio.lowlevel.checkpoint()

    async def moved_deadline() -> None:  # after: one scope, its deadline moved twice per write
        with trio.CancelScope() as scope:
            for _ in range(n):
                scope.deadline = trio.current_time() + 30
                await trio.lowlevel.checkpoint()
                scope.deadline = trio.current_time() + 20
                await trio.lowlevel.checkpoint()

    async def to_thread() -> None:
        for _ in range(n):
            await trio.to_thread.run_sync(int)

    async def own_thread() -> None:
        from winkr.actor import Reply
        from winkr.store.writer import _Request, _WriterThread

        class _NoStore:
            db = None

        writer = _WriterThread(_NoStore(), 64, 512, None)  # type: ignore[arg-type]
        import winkr.store.writer as w
        w._run_batch = lambda store, batch: [(None, None)] * len(batch)  # the hop alone, no SQL
        writer.start()
        for _ in range(n):
            reply: Reply[object] = Reply()
            await writer.submit(_Request(lambda store: None, reply))
            await reply.wait()
        writer.stop()
        await trio.to_thread.run_sync(writer.join)

    async def channel_hop() -> None:  # trio-websocket's reader → message channel → our reader
        send, receive = trio.open_memory_channel[int](8)

        async def reader() -> None:
            async for _ in receive:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(n):
                await send.send(i)
                await trio.lowlevel.checkpoint()
            await send.aclose()

    async def direct_call() -> None:  # the reader hands the frame to the handler itself
        async def handle(i: int) -> None:
            pass

        for i in range(n):
            await handle(i)
            await trio.lowlevel.checkpoint()

    patterns = {"pattern-two-scopes": two_scopes, "pattern-moved-deadline": moved_deadline,
                "pattern-to-thread": to_thread, "pattern-own-thread": own_thread,
                "pattern-channel-hop": channel_hop, "pattern-direct-call": direct_call}
    trio.run(patterns[step])


def _iso() -> Callable[[], object]:
    import time

    from winkr.clock import iso
    return lambda: iso(time.time())


def _iso_two_seconds() -> Callable[[], object]:
    """Timestamps of two seconds interleaved (a room's ``created_at`` taken before its commit,
    frames stamped after it, with the second turning in between)."""
    from winkr.clock import iso
    return lambda: (iso(1_767_225_600.25), iso(1_767_225_601.5))


# The saturation shape's frame, as the shared winkr adapter writes it (a 89-character payload).
SEND_FRAME = ('{"event":"message:send","data":{"conversation_id":"c0123456789abcdef","content":"'
              + LINES["bench"] + '","type":"text","metadata":{}},"ref":"b"}')


def _send_in() -> Callable[[], object]:
    """Reading one ``message:send``: the envelope, then the request."""
    from winkr.protocol.codec import parse_envelope
    from winkr.protocol.requests import MessageSend, structure_request

    def op() -> object:
        return structure_request(MessageSend, parse_envelope(SEND_FRAME, 65536).data)
    return op


def _stored() -> Any:
    from winkr.records import Delivery, StoredMessage
    message = StoredMessage("c0123456789abcdef", 41, "u1", "text", LINES["bench"], {}, None,
                            1_767_225_600.25, 1_767_225_600.25)
    return message, Delivery("c0123456789abcdef", 41, "u1", "u2", 1_767_225_600.25)


def _fanout_frames() -> Callable[[], object]:
    """The frames of one message as the room builds them (``_fan_out``): the sender's ack, the
    peer's ``message:new``, the ``message:delivered`` receipt."""
    from winkr.actor import Frames
    from winkr.metrics import Metrics
    from winkr.protocol.wire import delivered_data, message_object, sender_object

    frames = Frames(lambda: 1_767_225_600.5, Metrics(["message:send"]))
    message, delivery = _stored()
    try:
        from winkr.handlers.messages import message_frames  # type: ignore[attr-defined]
    except ImportError:  # an older checkout: the ack and the peer's frame encoded apart
        def message_frames(frames: Frames, message: Any, sender: Any, ref: str) -> tuple[str, str]:
            data = {"message": message_object(message), "sender": sender}
            return frames.event("message:new", data, ref), frames.event("message:new", data)

    def op() -> object:
        sender = sender_object("u1", "user one", None)
        ack, new = message_frames(frames, message, sender, "b")
        return ack, new, frames.event("message:delivered", delivered_data(delivery))
    return op


def _records() -> Callable[[], object]:
    """The per-message records: envelope, request, room call, send item, stored message,
    delivery, send result, what presence gets."""
    from winkr.handlers.context import RoomCall
    from winkr.handlers.registry import ROUTES
    from winkr.presence import Published
    from winkr.protocol.codec import Envelope
    from winkr.protocol.requests import Id, MessageSend
    from winkr.records import Delivery, SendItem, SendResult, StoredMessage

    route = ROUTES["message:send"]

    def op() -> object:
        Envelope("message:send", {}, "b")
        request = MessageSend(Id("c0123456789abcdef"), "text", LINES["bench"], {}, None)
        RoomCall(route, None, request, "b", None, 1.0)  # type: ignore[arg-type]
        SendItem("u1", "text", LINES["bench"], {}, None, ("u2",))
        message = StoredMessage("c0123456789abcdef", 41, "u1", "text", LINES["bench"], {}, None,
                                1_767_225_600.25, 1_767_225_600.25)
        delivery = Delivery("c0123456789abcdef", 41, "u1", "u2", 1_767_225_600.25)
        SendResult(message, False, (delivery,))
        return Published(message, ("u1", "u2"), frozenset(), (delivery,))
    return op


PER_MESSAGE: dict[str, Callable[[], Callable[[], object]]] = {
    "iso": _iso, "iso-two-seconds": _iso_two_seconds, "send-in": _send_in, "fanout-frames": _fanout_frames,
    "records": _records}


def store_step(step: str, n: int) -> None:
    """The store writer's transaction for one message of a quiet pair, one per transaction, on
    an SQLite file (WAL): ``store-pair`` with its recipient joined (the delivery recorded with
    the message), ``store-alone`` with nobody else in the room. 500 conversations in turn."""
    import time

    from winkr.records import SendItem
    from winkr.store.schema import open_database
    from winkr.store.store import Store
    from winkr.store.writer import _Request, _run_batch

    with tempfile.TemporaryDirectory(prefix="winkr-step-ir-db-") as tmp:
        store = Store(open_database(str(Path(tmp) / "step.db")))
        conversations = [store.create_conversation(f"u{2 * k}", [f"u{2 * k + 1}"], is_service=False,
                                                   max_participants=10, now=time.time())[0].id for k in range(500)]
        for i in range(n):
            k = i % 500
            item = SendItem(f"u{2 * k}", "text", LINES["bench"], {}, None,
                            (f"u{2 * k + 1}",) if step == "store-pair" else ())
            _run_batch(store, [_Request(lambda s, c=conversations[k], i=item: s.insert_messages(c, [i], time.time()),
                                        None)])


def ir_of(step: str, n: int, workdir: Path) -> int:
    out = workdir / f"{step}-{n}.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                    "--child", step, "--n", str(n)], check=True, capture_output=True, env=dict(os.environ))
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_step(args.child, args.n)
        return
    with tempfile.TemporaryDirectory(prefix="winkr-step-ir-") as tmp:
        for step in args.steps.split(","):
            once, twice = ir_of(step, args.n, Path(tmp)), ir_of(step, 2 * args.n, Path(tmp))
            print(json.dumps({"step": step, "n": args.n, "ir_per_op": round((twice - once) / args.n)}), flush=True)


if __name__ == "__main__":
    main()
