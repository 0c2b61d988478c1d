#!/usr/bin/env python3
"""Webhook costs on loopback, against real ``winkr serve`` processes (contract §14).

For each scenario a fresh server is started; alice sends ``--messages`` messages one after
the other to bob, who never connects, so every message makes a ``message.created`` event.
Measured: send→ack latency as alice sees it, and (scenario ``up``) delivery latency from the
acknowledgement (just after the commit) to the receiver reading the POST.

Server CPU per message is user + system time of the server process (startup included)
divided by the messages sent. Scenarios: ``off`` (no webhook_url), ``up`` (a receiver answering 204), ``down`` (nothing
listens: connection refused), ``hang`` (a listener that never answers: every attempt waits
for its timeout). Prints one JSON object. Talks only to 127.0.0.1; stops by itself.

    python scripts/bench_webhooks.py --messages 1000 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

JWT_SECRET = "bench-webhooks-secret-0123456789abcdef012345"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
START_TIMEOUT = 20.0


PRINTING = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    """Answers 204 and prints ``<message id> <arrival time>`` for each POST."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        arrived = time.time()
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()
        line = f"{json.loads(body)['data']['message']['id']} {arrived}\n"
        with PRINTING:  # one whole line at a time: requests are served on several threads
            sys.stdout.write(line)
            sys.stdout.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def serve_receiver() -> int:
    """``--receiver``: the webhook receiver, in a process of its own (not competing with the
    client for a GIL); prints its port first."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()
    return 0


class Receiver:
    """The receiver process, and the arrival times it reports, by message id."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.proc = subprocess.Popen([sys.executable, __file__, "--receiver"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}/hook"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message_id, arrived = line.split()
            self.arrivals[message_id] = float(arrived)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"n": len(ordered), "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] * 1000, 3), "mean_ms": round(statistics.fmean(ordered) * 1000, 3)}


def run_scenario(name: str, url: str, messages: int, warmup: int, workdir: Path,
                 receiver: Receiver | None = None) -> dict[str, Any]:
    db = workdir / f"{name}.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env.update(WINKR_JWT_SECRET=JWT_SECRET, WINKR_DB=str(db), WINKR_MESSAGES_PER_MINUTE="0",
               WINKR_MESSAGES_PER_HOUR="0", WINKR_MESSAGES_PER_DAY="0", WINKR_LOG_LEVEL="WARNING",
               WINKR_WEBHOOK_TIMEOUT_SECONDS="2")
    if url:
        env.update(WINKR_WEBHOOK_URL=url, WINKR_WEBHOOK_SECRET=WEBHOOK_SECRET)

    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "winkr", *args], env=env, capture_output=True,
                              text=True, timeout=30, check=True).stdout

    conv = json.loads(cli("conversation", "create", "alice", "bob"))["id"]
    token = cli("token", "alice").strip()
    stderr = open(workdir / f"{name}.stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "winkr", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        port = _wait_for_port(proc)
        acks: dict[str, float] = {}
        latencies: list[float] = []

        async def client() -> None:
            async with connect(f"ws://127.0.0.1:{port}/ws",
                               additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                await ws.recv()  # connection:established
                for n in range(warmup + messages):
                    ref = f"m{n}"
                    started = time.perf_counter()
                    await ws.send(json.dumps({"event": "message:send", "ref": ref, "data": {
                        "conversation_id": conv, "type": "text", "content": f"message {n}", "metadata": {}}}))
                    while True:
                        event = json.loads(await ws.recv())
                        if event.get("ref") == ref:
                            break
                    elapsed = time.perf_counter() - started
                    if n >= warmup:
                        latencies.append(elapsed)
                        acks[event["data"]["message"]["id"]] = time.time()

        asyncio.run(asyncio.wait_for(client(), timeout=300))
        if receiver is not None:  # the server must live until the last event is delivered
            deadline = time.monotonic() + 30
            while len(receiver.arrivals) < warmup + messages and time.monotonic() < deadline:
                time.sleep(0.05)
        return {"latencies": latencies, "acks": acks,
                "server_cpu_ms": _cpu_seconds(proc.pid) * 1000 / (warmup + messages)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        stderr.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for_port(proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on ws://127.0.0.1:" in line:
            return int(line.rsplit(":", 1)[1].split("/")[0])
        if not line and proc.poll() is not None:
            break
    raise SystemExit("winkr serve did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--scenarios", default="off,down,hang,up")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the scenarios, interleaved; pooled")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        return serve_receiver()

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(1)  # never accepts: requests wait for webhook_timeout_seconds
    receiver = Receiver()
    urls = {"off": "", "down": f"http://127.0.0.1:{closed.getsockname()[1]}/hook",
            "hang": f"http://127.0.0.1:{hanging.getsockname()[1]}/hook", "up": receiver.url}
    results: dict[str, Any] = {"messages": args.messages, "rounds": args.rounds}
    names = args.scenarios.split(",")
    pooled: dict[str, dict[str, list[float]]] = {name: {"send": [], "deliver": [], "cpu": []} for name in names}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # Rounds interleave the scenarios, so a change in the machine's load touches all.
            for round_ in range(args.rounds):
                for name in names:
                    receiver.arrivals.clear()
                    outcome = run_scenario(f"{name}-{round_}", urls[name], args.messages, args.warmup, Path(tmp),
                                           receiver if name == "up" else None)
                    pooled[name]["send"] += outcome["latencies"]
                    pooled[name]["cpu"].append(outcome["server_cpu_ms"])
                    if name == "up":
                        pooled[name]["deliver"] += [receiver.arrivals[mid] - at for mid, at in outcome["acks"].items()
                                                    if mid in receiver.arrivals]
    finally:
        receiver.close()
        closed.close()
        hanging.close()
    for name in names:
        results[name] = {"send_to_ack": percentiles(pooled[name]["send"]),
                         "server_cpu_ms_per_message": round(statistics.median(pooled[name]["cpu"]), 3)}
        if name == "up":
            results[name]["ack_to_receiver"] = percentiles(pooled[name]["deliver"])
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
