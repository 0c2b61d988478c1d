#!/usr/bin/env python3
"""Abuse measurements (issue 8), on loopback against a real `winkr serve` with default limits.

1. **Send flood**: one connection pipelines N sends, each padded with PII-looking digits,
   far above its rate limit, while another user measures message:send round trips
   (send -> acknowledgement) at a steady pace. Prints the victim's round trips without and
   during the flood, and how the flood's sends were answered.
2. **Non-reading client**: a client asks for many large history pages and never reads.
   Prints the server's resident memory (VmRSS) before and at its peak.

Bounded in count and time; talks only to 127.0.0.1; stops the server it started.

    .venv/bin/python scripts/flood.py [--flood 3160] [--pages 270]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

if __package__ in (None, ""):  # `python scripts/flood.py`: the checkout's root, so that `scripts` imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import mint, process_usage, server_environment, start_server, stop

SECRET = "flood-measurement-secret-0123456789abcdef"
# trio, trio-websocket and orjson come with winkr: imported where used, once main() checked them.


async def request(ws: WebSocketConnection, event: str, data: dict[str, object], ref: str) -> dict[str, object]:
    import orjson

    await ws.send_message(orjson.dumps({"event": event, "data": data, "ref": ref}).decode())
    while True:
        reply = orjson.loads(await ws.get_message())
        if reply.get("ref") == ref:
            return reply  # type: ignore[no-any-return]


def connect(url: str, user: str) -> Any:
    from trio_websocket import open_websocket_url

    return open_websocket_url(url, extra_headers=[(b"authorization", f"Bearer {mint(SECRET, user, 3600)}".encode())],
                              message_queue_size=4096)


async def victim_round_trips(ws: WebSocketConnection, conv: str, seconds: float, pace: float) -> list[float]:
    import trio

    times: list[float] = []
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        n += 1
        started = time.perf_counter()
        reply = await request(ws, "message:send", {"conversation_id": conv, "type": "text", "content": f"ping {n}"},
                              f"v{n}")
        if reply["event"] == "message:new":
            times.append((time.perf_counter() - started) * 1000)
        await trio.sleep(pace)
    return times


def summary(times: list[float]) -> str:
    if not times:
        return "no round trips"
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"n={len(times)} median {statistics.median(times):.1f} ms, p99 {p99:.1f} ms, "
            f"max {max(times):.1f} ms")


async def send_flood(url: str, count: int) -> None:
    import orjson
    import trio

    # The victim sends 2 messages a second: within the default 30/minute limit.
    async with connect(url, "victim") as victim, connect(url, "flooder") as flooder:  # type: ignore[attr-defined]
        await victim.get_message()
        await flooder.get_message()
        conv = (await request(victim, "conversation:create", {"participant_ids": ["friend"]}, "c"))
        conv_id = conv["data"]["conversation"]["id"]  # type: ignore[index]
        flood_conv = (await request(flooder, "conversation:create", {"participant_ids": ["target"]}, "c"))
        flood_id = flood_conv["data"]["conversation"]["id"]  # type: ignore[index]
        quiet = await victim_round_trips(victim, conv_id, 10, 0.5)
        print(f"victim round trips, no flood:     {summary(quiet)}")
        padded = "call me 415 555 2671 or 4111 1111 1111 1111 " * 40
        answers: dict[str, int] = {}

        async def flood() -> None:
            frames = [orjson.dumps({"event": "message:send", "ref": f"f{n}", "data": {
                "conversation_id": flood_id, "type": "text", "content": padded}}).decode() for n in range(count)]
            for frame in frames:
                await flooder.send_message(frame)

        async def drain() -> None:
            got = 0
            while got < count:
                reply = orjson.loads(await flooder.get_message())
                if reply.get("ref", "").startswith("f"):
                    got += 1
                    key = reply["event"] if reply["event"] != "error" else reply["data"]["details"].get("limit")
                    answers[key] = answers.get(key, 0) + 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            nursery.start_soon(drain)
            during = await victim_round_trips(victim, conv_id, 10, 0.5)
        print(f"victim round trips, during flood: {summary(during)}")
        print(f"flood of {count} sends answered in {time.perf_counter() - started:.1f} s: {answers}")


async def non_reader(url: str, pages: int, pid: int) -> None:
    import orjson
    import trio
    from trio_websocket import ConnectionClosed

    async with connect(url, "writer") as writer:  # type: ignore[attr-defined]
        await writer.get_message()
        conv = await request(writer, "conversation:create", {"participant_ids": ["reader"]}, "c")
        conv_id = conv["data"]["conversation"]["id"]  # type: ignore[index]
        # The default limits allow 30 messages a minute: 30 of the largest kind (ciphertext,
        # 8,000 characters), so each page is ~240 KB.
        for n in range(30):
            await request(writer, "message:send", {"conversation_id": conv_id, "type": "text",
                                                   "metadata": {"encrypted": True},
                                                   "content": f"{n:02d}" + "x" * 7998}, f"w{n}")
    before = process_usage(pid)["rss_kb"]
    peak = before
    async with connect(url, "reader") as reader:  # type: ignore[attr-defined]
        frame = orjson.dumps({"event": "message:history", "data": {"conversation_id": conv_id, "limit": 100}})
        try:
            for _ in range(pages):
                await reader.send_message(frame.decode())
            for _ in range(60):  # 30 s of not reading
                peak = max(peak, process_usage(pid)["rss_kb"])
                await trio.sleep(0.5)
        except ConnectionClosed:
            pass
    print(f"non-reading client asking for {pages} history pages of ~240 KB: server RSS {before / 1024:.1f} MiB "
          f"before, peak {peak / 1024:.1f} MiB (+{(peak - before) / 1024:.1f} MiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=3160, help="pipelined sends in the flood")
    parser.add_argument("--pages", type=int, default=270, help="history pages the non-reading client asks for")
    args = parser.parse_args()
    from scripts._deps import require

    require("flood.py", ["trio", "trio_websocket", "orjson", "winkr.auth"])
    import trio

    with tempfile.TemporaryDirectory(prefix="winkr-flood-") as folder:
        server = start_server(["--db", str(Path(folder) / "w.db")], env=server_environment(SECRET),
                              log=Path(folder) / "server.log")
        try:
            trio.run(send_flood, server.url, args.flood)
            trio.run(non_reader, server.url, args.pages, server.proc.pid)
        finally:
            stop(server.proc, timeout=15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
