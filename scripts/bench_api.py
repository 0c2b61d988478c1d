#!/usr/bin/env python3
"""Server-API latency on loopback: p50/p99 of simple GETs and of posting system messages.

usage: python scripts/bench_api.py [--requests 2000] [--json]

Starts its own ``winkr serve --port 0 --api-port 0`` on a database in a temporary folder
(real process, real sockets, stopped at the end), creates one conversation, then sends the
requests one after another on one keep-alive HTTP/1.1 connection (the standard library's
``http.client``: the client's own cost stays small), timing each from send to the last byte
of the answer:

- ``GET /healthz``: the HTTP stack alone (hypercorn, Starlette, our middleware);
- ``GET /v1/users/{id}/presence``: one round trip to the presence actor and one store read;
- ``GET /v1/conversations/{id}``: one store-writer round trip (a transaction);
- ``POST /v1/conversations/{id}/messages``: a system message through the room, committed
  (durable) and fanned out, exactly as a sent message.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _deps import require

LISTENING = re.compile(r"server API on (http://\S+)")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per endpoint (default 2000)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = parser.parse_args()
    require("bench_api.py", ["winkr"])
    key = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
        env.update(WINKR_JWT_SECRET=secrets.token_urlsafe(48), WINKR_API_KEYS=key, WINKR_LOG_LEVEL="WARNING")
        proc = subprocess.Popen([sys.executable, "-m", "winkr", "serve", "--port", "0", "--api-port", "0", "--db",
                                 str(Path(folder) / "bench.db")], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = LISTENING.search(line)
            if match is None:
                sys.stderr.write(f"bench_api.py: the server did not start: {line!r}\n")
                return 1
            results = run(match.group(1), key, args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'request':44} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for name, row in results.items():
            print(f"{name:44} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['mean_ms']:8.2f}")
    return 0


def run(base: str, key: str, count: int) -> dict[str, dict[str, float]]:
    address = urlsplit(base)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=30)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()

    status, answer = call("POST", "/v1/conversations", {"participant_ids": ["bench-a", "bench-b"]})
    conversation_id = json.loads(answer)["conversation"]["id"]
    cases: dict[str, Callable[[int], tuple[int, bytes]]] = {
        "GET /healthz": lambda n: call("GET", "/healthz"),
        "GET /v1/users/{id}/presence": lambda n: call("GET", "/v1/users/bench-a/presence"),
        "GET /v1/conversations/{id}": lambda n: call("GET", f"/v1/conversations/{conversation_id}"),
        "POST /v1/conversations/{id}/messages": lambda n: call(
            "POST", f"/v1/conversations/{conversation_id}/messages", {"content": f"system note {n}"}),
    }
    results = {}
    for name, case in cases.items():
        for n in range(min(100, count)):  # warm up: caches, the room
            case(-n)
        timings = []
        for n in range(count):
            started = time.perf_counter()
            status, answer = case(n)
            timings.append((time.perf_counter() - started) * 1000)
            if status >= 300:
                raise SystemExit(f"{name}: {status} {answer!r}")
        results[name] = {"p50_ms": round(percentile(timings, 0.50), 3), "p99_ms": round(percentile(timings, 0.99), 3),
                         "mean_ms": round(statistics.fmean(timings), 3), "requests": count}
    connection.close()
    return results


if __name__ == "__main__":
    raise SystemExit(main())
