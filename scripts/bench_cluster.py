#!/usr/bin/env python3
"""bench_cluster.py - one winkr node on SQLite vs two nodes on PostgreSQL + Redis, same load.

For each round and each setup:

- ``relay``: the bare trio-websocket relay (../shared/bench/relay_trio.py, driven by its own
  loadgen.py ``pairs`` with users/2 pairs at the same rate and window): the ceiling of our
  stack on this machine, for the ratios (absolute numbers drift ±20 % between runs);
- ``one``: `winkr serve` on a fresh SQLite file (the embedded default);
- ``two``: two `winkr serve` processes on one fresh PostgreSQL schema and one Redis (a key
  prefix of their own), i.e. a cluster (docs/deploy.md §8); scripts/loadtest.py puts the two
  members of every conversation on different nodes, so every message crosses the broker.

winkr's load is users/2 two-person conversations (the relay's pairs), plain sends only, every
limit off (deploy/loadtest.toml). scripts/loadtest.py runs twice per setup: open loop
at --rate msgs/s (latency at a load both setups carry) and closed loop (--max: as fast as the
server acknowledges, an acknowledgement meaning committed). Rounds alternate the setups so that
drift on a shared machine hits both. With taskset, the winkr processes share CPU 0 (the two
nodes together get what the one node gets: this measures what the cluster costs, not how it
scales, on a 2-core machine) and the load runs on CPU 1; PostgreSQL and Redis run where the OS
puts them.

Prints one line per run on stderr and one JSON line on stdout: per setup the medians of
acknowledged msgs/s (closed loop; the relay's delivered msgs/s), send->ack and send->peer
p50/p99 (open loop; for two nodes the cross-node send->peer), lost messages, the two/one
ratios and each setup's ratios to the relay of the same rounds. Loopback only; every
process it starts is killed by PID, its schema dropped and its Redis keys deleted before it
exits.

    python scripts/bench_cluster.py --rounds 3 --users 200 --rate 400 --duration 15

Needs the [cluster] extra, and the [bench] extra (picows) for the relay's load generator
(--no-relay leaves the relay out).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws")
START_TIMEOUT_S = 60.0


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def start_node(env: dict[str, str], workdir: Path, name: str) -> tuple[subprocess.Popen[str], int]:
    """`winkr serve --port 0` on the load-test settings; (process, port) once it listens."""
    log = open(workdir / f"{name}.stderr", "w")
    proc = subprocess.Popen([*pinned(0), sys.executable, "-m", "winkr", "serve", "--port", "0",
                             "--config", str(REPO / "deploy" / "loadtest.toml")],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if match := LISTENING.search(line):
            return proc, int(match.group(1))
    proc.kill()
    proc.wait(timeout=10)
    raise RuntimeError(f"{name} did not start: {(workdir / f'{name}.stderr').read_text()[-800:]}")


@contextmanager
def setup(kind: str, args: argparse.Namespace, workdir: Path, secret: str) -> Iterator[list[str]]:
    """The running setup ``one`` or ``two``: yields its nodes' WebSocket URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env["WINKR_JWT_SECRET"] = secret
    procs: list[subprocess.Popen[str]] = []
    schema = prefix = None
    try:
        if kind == "one":
            env["WINKR_DB"] = str(workdir / f"bench-{secrets.token_hex(4)}.db")
            proc, port = start_node(env, workdir, "one")
            procs.append(proc)
            ports = [port]
        else:
            import psycopg

            schema, prefix = f"bench_{secrets.token_hex(4)}", f"bench-{secrets.token_hex(4)}:"
            with psycopg.connect(args.postgres_url, autocommit=True) as pg:
                pg.execute(f"CREATE SCHEMA {schema}")
            separator = "&" if "?" in args.postgres_url else "?"
            env["WINKR_DATABASE_URL"] = f"{args.postgres_url}{separator}options={quote(f'-c search_path={schema}')}"
            env["WINKR_BROKER_URL"] = args.redis_url
            env["WINKR_REDIS_KEY_PREFIX"] = prefix
            env["WINKR_DB"] = str(workdir / "cluster.db")  # only names where the run file goes
            ports = []
            for n in (1, 2):
                proc, port = start_node({**env, "WINKR_NODE_ID": f"bench-node-{n}"}, workdir, f"node{n}")
                procs.append(proc)
                ports.append(port)
        yield [f"ws://127.0.0.1:{port}/ws" for port in ports]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        if schema is not None:
            import psycopg

            with psycopg.connect(args.postgres_url, autocommit=True) as pg:
                pg.execute(f"DROP SCHEMA {schema} CASCADE")
        if prefix is not None:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def load(urls: list[str], secret: str, args: argparse.Namespace, closed_loop: bool) -> dict[str, Any]:
    mode = ["--max", "--window", str(args.window)] if closed_loop else ["--rate", str(args.rate)]
    url_args = [part for url in urls for part in ("--url", url)]
    run = subprocess.run([*pinned(1), sys.executable, str(REPO / "scripts" / "loadtest.py"), *url_args,
                          f"--secret={secret}", "--users", str(args.users), "--group-share", "0", *mode, "--no-mix",
                          "--duration", str(args.duration), "--json-only"],
                         capture_output=True, text=True, timeout=args.duration + 180)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no result from loadtest.py: {run.stderr[-800:]}")
    return dict(json.loads(lines[-1]), exit_status=run.returncode)


def pick(result: dict[str, Any], key: str) -> Any:
    value: Any = result
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def relay_load(bench: Path, port: int, args: argparse.Namespace, closed_loop: bool) -> dict[str, Any]:
    mode = ["--window", str(args.window)] if closed_loop else ["--rate", str(args.rate)]
    run = subprocess.run([*pinned(1), sys.executable, str(bench / "loadgen.py"), "pairs", "--url",
                          f"ws://127.0.0.1:{port}/ws", "--pairs", str(args.users // 2), *mode, "--warmup", "2",
                          "--duration", str(args.duration)], capture_output=True, text=True,
                         timeout=args.duration + 120)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no result from loadgen.py: {run.stderr[-800:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_relay(bench: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([*pinned(0), sys.executable, str(bench / "relay_trio.py"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "relay.stderr", "w"))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the relay did not start") from None
                time.sleep(0.1)
        steady = relay_load(bench, port, args, closed_loop=False)
        flat_out = relay_load(bench, port, args, closed_loop=True)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    return {"msgs_per_s": flat_out["delivered_per_s"], "max_ack_p99_ms": None,
            "ack_p50_ms": None, "ack_p99_ms": None,  # the relay acknowledges nothing
            "peer_p50_ms": steady["lat_us"]["p50"] / 1000, "peer_p99_ms": steady["lat_us"]["p99"] / 1000,
            "delivered_per_s": steady["delivered_per_s"], "lost": 0, "errors": {},
            "exit_status": 0 if not steady["bad_payloads"] and not flat_out["bad_payloads"] else 1}


def run_once(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if kind == "relay":
        return run_relay(args.relay_dir, workdir, args)
    secret = secrets.token_urlsafe(32)
    with setup(kind, args, workdir, secret) as urls:
        steady = load(urls, secret, args, closed_loop=False)
        flat_out = load(urls, secret, args, closed_loop=True)
    peer = "cross_node_peer_latency_ms" if kind == "two" else "peer_latency_ms"
    return {
        "msgs_per_s": pick(flat_out, "ack_per_s"),
        "max_ack_p99_ms": pick(flat_out, "ack_latency_ms.p99"),
        "ack_p50_ms": pick(steady, "ack_latency_ms.p50"), "ack_p99_ms": pick(steady, "ack_latency_ms.p99"),
        "peer_p50_ms": pick(steady, f"{peer}.p50"), "peer_p99_ms": pick(steady, f"{peer}.p99"),
        "delivered_per_s": pick(steady, "delivered_per_s"),
        "lost": (pick(steady, "lost") or 0) + (pick(flat_out, "lost") or 0),
        "errors": {**pick(steady, "errors"), **pick(flat_out, "errors")},
        "exit_status": max(steady["exit_status"], flat_out["exit_status"]),
    }


KEYS = ("msgs_per_s", "max_ack_p99_ms", "ack_p50_ms", "ack_p99_ms", "peer_p50_ms", "peer_p99_ms", "delivered_per_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--rate", type=float, default=400.0, help="open loop: total msgs/s")
    ap.add_argument("--window", type=int, default=16, help="closed loop: messages in flight per sender")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--postgres-url", default=os.environ.get("WINKR_TEST_POSTGRES_URL")
                    or "postgresql://127.0.0.1:5432/test")
    ap.add_argument("--redis-url", default=os.environ.get("WINKR_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--relay-dir", type=Path, default=None,
                    help="the folder with relay_trio.py and loadgen.py (default: ../shared/bench)")
    ap.add_argument("--no-relay", action="store_true", help="leave the relay out (no ratios to it)")
    args = ap.parse_args()
    if not args.no_relay:
        candidates = [args.relay_dir] if args.relay_dir else [REPO.parent / "shared" / "bench",
                                                              REPO.parent.parent / "shared" / "bench"]
        found = [c for c in candidates if (c / "relay_trio.py").is_file() and (c / "loadgen.py").is_file()]
        if not found:
            ap.error(f"no relay_trio.py/loadgen.py in {', '.join(map(str, candidates))}: "
                     "give --relay-dir or --no-relay")
        args.relay_dir = found[0]
    if not (1 <= args.rounds <= 20 and 2 <= args.users <= 2000 and 1 <= args.duration <= 600 and args.rate > 0):
        ap.error("--rounds 1..20, --users 2..2000, --duration 1..600, --rate > 0")
    for url in (args.postgres_url, args.redis_url):
        host = re.sub(r"^[a-z]+://([^@/]*@)?", "", url).split("/")[0].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            ap.error(f"loopback engines only: {url}")
    workdir = Path(tempfile.mkdtemp(prefix="winkr-bench-cluster-"))
    kinds = ["one", "two"] if args.no_relay else ["relay", "one", "two"]
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    try:
        for round_ in range(args.rounds):
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                row = run_once(kind, args, workdir)
                runs[kind].append(row)
                print(f"round {round_ + 1} {kind}: {row}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {"users": args.users, "rate": args.rate, "window": args.window,
                               "duration_s": args.duration, "cpus": os.cpu_count()}
    for kind, rows in runs.items():
        summary[kind] = {key: statistics.median(r[key] for r in rows if r[key] is not None)
                         for key in KEYS if any(r[key] is not None for r in rows)}
        summary[kind]["lost"] = sum(r["lost"] for r in rows)
        summary[kind]["runs"] = rows
    def ratios(over: str, under: str) -> dict[str, float]:
        return {key: round(summary[over][key] / summary[under][key], 3) for key in KEYS
                if key != "delivered_per_s" and summary[under].get(key) and summary[over].get(key) is not None}

    summary["two_over_one"] = ratios("two", "one")
    if "relay" in runs:
        summary["one_over_relay"] = ratios("one", "relay")
        summary["two_over_relay"] = ratios("two", "relay")
    print(json.dumps(summary))
    return 0 if all(r["exit_status"] == 0 for rows in runs.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
