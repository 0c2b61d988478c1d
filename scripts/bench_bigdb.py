#!/usr/bin/env python3
"""Big-database benchmark: start-up time and message:history latency with N stored messages.

usage: python scripts/bench_bigdb.py [--messages 1000000] [--conversations 1000] [--db PATH]
                                     [--requests 2000]

Fills a database through winkr's own schema (fast bulk inserts, reused if it already holds
enough messages), starts `winkr serve --port 0` on it and times until the "listening" line,
then asks for history pages (random conversation, random cursor) over one loopback
connection and prints one JSON line: startup_s, history p50/p95/p99/max in ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/bench_bigdb.py`: the checkout's root, so that `scripts` imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import mint, server_environment, start_server, stop

SECRET = "bench-bigdb-secret-0123456789abcdef0123456789"


def fill(path: str, messages: int, conversations: int) -> list[str]:
    from winkr.store.schema import open_database

    db = open_database(path)
    have = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    if have < messages:
        now = time.time()
        per = messages // conversations
        db.execute("BEGIN")
        for c in range(conversations):
            cid = f"bench-{c:06d}"
            a, b = f"u{2 * c}", f"u{2 * c + 1}"
            db.execute("INSERT OR IGNORE INTO conversations (id, created_at, created_by, pair_key) VALUES (?, ?, ?, ?)",
                       (cid, now, a, f"{a}\x1f{b}"))
            db.executemany("INSERT OR IGNORE INTO participants (conversation_id, user_id) VALUES (?, ?)",
                           [(cid, a), (cid, b)])
            db.executemany(
                "INSERT OR IGNORE INTO messages (conversation_id, seq, sender_id, type, content, metadata, "
                "created_at, updated_at) VALUES (?, ?, ?, 'text', ?, '{}', ?, ?)",
                ((cid, seq, a if seq % 2 else b, f"message number {seq} of a long chat", now, now)
                 for seq in range(1, per + 1)))
        db.execute("COMMIT")
    ids = [row[0] for row in db.execute("SELECT id FROM conversations WHERE id LIKE 'bench-%'")]
    db.close()
    return ids


async def measure_history(url: str, conversations: list[str], per: int, requests: int) -> list[float]:
    from websockets.asyncio.client import connect

    samples = []
    # the benchmark user u0 is in bench-000000 only; a service token may read any conversation
    token = mint(SECRET, "bench-reader", 3600, service=True)
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=2**24,
                       ping_interval=None, compression=None) as ws:
        await ws.recv()  # connection:established
        for i in range(requests):
            conv = random.choice(conversations)
            frame = json.dumps({"event": "message:history", "ref": str(i), "data": {
                "conversation_id": conv, "before_seq": random.randint(2, per + 1), "limit": 50}})
            start = time.perf_counter()
            await ws.send(frame)
            while json.loads(await ws.recv()).get("ref") != str(i):
                pass
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--db", default="bench-bigdb.db")
    args = parser.parse_args()
    from scripts._deps import require

    require("bench_bigdb.py", ["websockets.asyncio.client", "jwt", "winkr.auth"])
    t0 = time.perf_counter()
    conversations = fill(args.db, args.messages, args.conversations)
    fill_s = time.perf_counter() - t0
    start = time.perf_counter()
    server = start_server(["--db", str(Path(args.db).resolve()), "--log-level", "WARNING"],
                          env=server_environment(SECRET), timeout=120)  # a big database starts slowly
    startup_s = time.perf_counter() - start
    try:
        samples = asyncio.run(measure_history(server.url, conversations, args.messages // args.conversations,
                                              args.requests))
    finally:
        stop(server.proc)
    q = statistics.quantiles(samples, n=100)
    stored = sqlite3.connect(args.db).execute("SELECT count(*) FROM messages").fetchone()[0]
    print(json.dumps({"messages": stored, "fill_s": round(fill_s, 1), "startup_s": round(startup_s, 3),
                      "history_ms": {"p50": round(q[49], 3), "p95": round(q[94], 3), "p99": round(q[98], 3),
                                     "max": round(max(samples), 3), "n": len(samples)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
