#!/usr/bin/env python3
"""Connect storm: N users open a connection each as fast as they can; how long until every
one has its ``connection:established``, and the handshake latency distribution.

usage: WINKR_JWT_SECRET=... python scripts/connect_storm.py [--url ws://127.0.0.1:8080/ws]
           [--users 5000] [--concurrency 500] [--timeout 60]

Each handshake is timed from the TCP connect to the ``connection:established`` frame. The
connections stay open until all are done, then close. Loopback only; bounded in count and
time. The server needs its connection limits switched off (or high enough) for this.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python scripts/connect_storm.py`: the checkout's root, so that `scripts` imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import mint

MAX_USERS = 20_000


async def storm(url: str, secret: str, users: int, concurrency: int, timeout: float) -> dict[str, object]:
    from websockets.asyncio.client import connect

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures: dict[str, int] = {}
    opened = []
    tokens = [mint(secret, f"storm{i}", 3600) for i in range(users)]
    done_all = asyncio.Event()

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            try:
                ws = await connect(url, additional_headers={"Authorization": f"Bearer {tokens[i]}"},
                                   compression=None, ping_interval=None, open_timeout=timeout)
                hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
                if hello.get("event") != "connection:established":
                    raise RuntimeError(hello.get("event"))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                return
            latencies.append((time.perf_counter() - start) * 1000)
            opened.append(ws)
        await done_all.wait()

    began = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(users)]
    while len(latencies) + sum(failures.values()) < users and time.perf_counter() - began < timeout:  # noqa: ASYNC110 - polling by design (see the sleep)
        await asyncio.sleep(0.05)
    total = time.perf_counter() - began
    done_all.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"users": users, "established": len(latencies), "failures": failures,
            "seconds_to_all": round(total, 2), "concurrency": concurrency,
            "handshake_ms": {"p50": round(q[49], 1), "p95": round(q[94], 1), "p99": round(q[98], 1),
                             "max": round(max(latencies, default=0.0), 1)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--secret", default=os.environ.get("WINKR_JWT_SECRET", ""))
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    from scripts._deps import require

    require("connect_storm.py", ["websockets.asyncio.client", "jwt", "winkr.auth"])
    if not args.secret:
        parser.error("--secret or WINKR_JWT_SECRET is required")
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("loopback targets only")
    if not 0 < args.users <= MAX_USERS or args.timeout > 600:
        parser.error(f"users must be 1..{MAX_USERS} and timeout at most 600 s")
    result = asyncio.run(storm(args.url, args.secret, args.users, args.concurrency, args.timeout))
    print(json.dumps(result))
    return 0 if result["established"] == args.users else 1


if __name__ == "__main__":
    sys.exit(main())
