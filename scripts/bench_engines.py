#!/usr/bin/env python3
"""bench_engines.py - durable msgs/s of winkr on SQLite vs PostgreSQL, same load, same run.

For each round and each engine: start `winkr serve --port 0` with every limit off
(deploy/loadtest.toml) on a fresh database (a temporary SQLite file, or a schema of its own in
the PostgreSQL database at --postgres-url, dropped afterwards), run scripts/loadtest.py
against it in closed loop (--max: as fast as the server acknowledges, and an acknowledgement
means committed), stop the server. Rounds alternate the engines so drift on a shared machine
hits both. With taskset available the server runs on CPU 0 and the load on CPU 1.

Prints one line per run on stderr and one JSON line on stdout: per engine the median
acknowledged msgs/s, send->ack p50/p99 (ms), and the PostgreSQL/SQLite ratio. PostgreSQL
commits with synchronous_commit=on (an fsync per commit); SQLite with the configured
synchronous (NORMAL: no fsync per commit in WAL mode; --sqlite-synchronous FULL: one). Loopback only;
every process it starts is killed by PID before it exits.

    python scripts/bench_engines.py --rounds 3 --users 200 --window 16 --duration 15
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
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws")


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def run_once(engine: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env["WINKR_JWT_SECRET"] = secret
    schema = None
    if engine == "postgresql":
        import psycopg

        schema = f"bench_{secrets.token_hex(4)}"
        with psycopg.connect(args.postgres_url, autocommit=True) as pg:
            pg.execute(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in args.postgres_url else "?"
        env["WINKR_DATABASE_URL"] = f"{args.postgres_url}{separator}options={quote(f'-c search_path={schema}')}"
    else:
        env["WINKR_DB"] = str(workdir / f"bench-{secrets.token_hex(4)}.db")
        env["WINKR_SQLITE_SYNCHRONOUS"] = args.sqlite_synchronous
    server = subprocess.Popen([*pinned(0), sys.executable, "-m", "winkr", "serve", "--port", "0",
                               "--config", str(REPO / "deploy" / "loadtest.toml")],
                              cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                raise RuntimeError(f"{engine}: the server exited before listening")
            if match := LISTENING.search(line):
                port = int(match.group(1))
        load = subprocess.run([*pinned(1), sys.executable, str(REPO / "scripts" / "loadtest.py"),
                               "--url", f"ws://127.0.0.1:{port}/ws", f"--secret={secret}", "--users", str(args.users),
                               "--max", "--window", str(args.window), "--no-mix", "--duration", str(args.duration),
                               "--json-only"], capture_output=True, text=True, timeout=args.duration + 120, env=env)
        lines = [line for line in load.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"{engine}: no result from loadtest.py: {load.stderr[-500:]}")
        return dict(json.loads(lines[-1]), exit_status=load.returncode)
    finally:
        server.kill()
        server.wait(timeout=10)
        if schema is not None:
            import psycopg

            with psycopg.connect(args.postgres_url, autocommit=True) as pg:
                pg.execute(f"DROP SCHEMA {schema} CASCADE")


def pick(result: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value: Any = result
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--window", type=int, default=16, help="messages in flight per sender")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--postgres-url", default="postgresql://127.0.0.1:5432/test")
    ap.add_argument("--sqlite-synchronous", choices=("NORMAL", "FULL"), default="NORMAL",
                    help="FULL: SQLite fsyncs every commit, as PostgreSQL's synchronous_commit=on does")
    args = ap.parse_args()
    if not (1 <= args.rounds <= 20 and 2 <= args.users <= 2000 and 1 <= args.duration <= 600):
        ap.error("--rounds 1..20, --users 2..2000, --duration 1..600")
    workdir = Path(tempfile.mkdtemp(prefix="winkr-bench-engines-"))
    runs: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgresql": []}
    try:
        for round_ in range(args.rounds):
            for engine in ("sqlite", "postgresql") if round_ % 2 == 0 else ("postgresql", "sqlite"):
                result = run_once(engine, args, workdir)
                row = {"msgs_per_s": pick(result, "ack_per_s"),
                       "ack_p50_ms": pick(result, "ack_latency_ms.p50"),
                       "ack_p99_ms": pick(result, "ack_latency_ms.p99"),
                       "lost": pick(result, "lost"), "exit_status": result["exit_status"]}
                runs[engine].append(row)
                print(f"round {round_ + 1} {engine:10} {row}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {"users": args.users, "window": args.window, "duration_s": args.duration,
                               "sqlite_synchronous": args.sqlite_synchronous}
    for engine, rows in runs.items():
        summary[engine] = {key: statistics.median(r[key] for r in rows if r[key] is not None)
                           for key in ("msgs_per_s", "ack_p50_ms", "ack_p99_ms")
                           if any(r[key] is not None for r in rows)}
        summary[engine]["runs"] = rows
    if summary["sqlite"].get("msgs_per_s") and summary["postgresql"].get("msgs_per_s"):
        ratio = summary["postgresql"]["msgs_per_s"] / summary["sqlite"]["msgs_per_s"]
        summary["postgresql_over_sqlite"] = round(ratio, 3)
    print(json.dumps(summary))
    return 0 if all(r["exit_status"] == 0 for rows in runs.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
