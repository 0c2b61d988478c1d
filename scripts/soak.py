#!/usr/bin/env python3
"""soak.py - steady mixed load against a winkr server, watching for leaks (issue 5).

Starts `python -m winkr serve --port 0` on a fresh SQLite file (temp directory) with every
rate limit switched off and a generated WINKR_JWT_SECRET, then holds a steady mixed load for
--duration seconds: --users users in pairs (one conversation per pair), each doing about
--rate steps per second, a step being a message:send (70 %), typing:start + typing:stop
(15 %), a message:read of the last message received (10 %) or a message:history page (5 %);
now and then (--reconnect-share of the steps) a user closes its connection and opens a new
one, so connection setup and teardown are part of the load.

Every --interval seconds it samples the server process: RSS (VmRSS of /proc/PID/status),
open file descriptors (entries of /proc/PID/fd) and OS threads. At the end it prints a table
of the samples on stderr and one JSON line on stdout.

Bound (what fails the run, exit 1): samples taken during the warm-up (--warmup, default a
fifth of the duration, at most 60 s) are ignored; the rest are split in thirds and the
median of the last third is compared with the median of the first third.
  * RSS fails when it grew by more than 20 % AND by more than 10 MiB;
  * open fds fail when they grew by more than 20 % AND by more than 10;
  * trio tasks (from the server's metrics endpoint) fail when they grew by more than 20 % AND
    by more than 50.
The run also fails when the server dies, when nothing was acknowledged, or when fewer than
3 samples were taken after the warm-up. Exit 0 otherwise; 2 for bad arguments.
Loopback only; the server it started is stopped (SIGTERM, then SIGKILL by PID) at the end.

Examples
    python scripts/soak.py                        # 10 minutes, 20 users, sample every 5 s
    python scripts/soak.py --duration 10 --interval 1
    python scripts/soak.py --users 100 --rate 1 --duration 1800
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python scripts/soak.py`: the checkout's root, so that `scripts` imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import (
    SMALL_TALK,
    RunningServer,
    encode_letters,
    kill,
    limits_off_toml,
    mint,
    process_usage,
    server_environment,
    start_server,
    stop,
)

REQUEST_TIMEOUT_S = 10.0
RSS_GROWTH_SHARE, RSS_GROWTH_BYTES = 0.20, 10 * 1024 * 1024
FD_GROWTH_SHARE, FD_GROWTH_COUNT = 0.20, 10
TASK_GROWTH_SHARE, TASK_GROWTH_COUNT = 0.20, 50
TASKS_RE = re.compile(r"^winkr_trio_tasks ([0-9.e+]+)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(workdir: Path, secret: str) -> tuple[RunningServer, int]:
    """The server on a fresh database in ``workdir`` with every limit off; (server, metrics port)."""
    metrics_port = free_port()
    cfg = workdir / "winkr.toml"
    cfg.write_text(limits_off_toml())
    server = start_server(["--db", str(workdir / "winkr.db"), "--config", str(cfg),
                           "--metrics-port", str(metrics_port)], env=server_environment(secret),
                          log=workdir / "server.log")
    return server, metrics_port


def sample(pid: int, metrics_port: int) -> dict[str, Any] | None:
    try:
        usage = process_usage(pid)
    except OSError:
        return None
    return {**usage, "tasks": trio_tasks(metrics_port)}


def trio_tasks(metrics_port: int) -> int:
    """Living trio tasks in the server, from its metrics endpoint (-1 if unavailable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            m = TASKS_RE.search(r.read().decode())
    except OSError:
        return -1
    return int(float(m.group(1))) if m else -1


# ---------------------------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.sent = self.acked = self.steps = self.reconnects = 0
        self.errors: Counter[str] = Counter()


class User:
    def __init__(self, index: int, token: str, peer: str, shared: dict[int, str],
                 stats: Stats, rng: random.Random) -> None:
        self.uid, self.token, self.peer = f"sk{index}", token, peer
        self.pair = index // 2
        self.shared, self.stats, self.rng = shared, stats, rng
        self.ws: Any = None
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.nreq = 0
        self.counter = 0
        self.last_peer: dict[str, Any] | None = None

    async def connect(self, url: str) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(url, additional_headers={"Authorization": f"Bearer {self.token}"},
                                compression=None, ping_interval=None, close_timeout=2,
                                open_timeout=REQUEST_TIMEOUT_S, proxy=None)
        self.reader = asyncio.create_task(self.read_loop(self.ws))
        conv = self.shared.get(self.pair)
        if conv is None:
            reply = await self.request("conversation:create", {"participant_ids": [self.peer]})
            conv = self.shared.setdefault(self.pair, reply["data"]["conversation"]["id"])
        self.conv = conv
        await self.request("conversation:join", {"conversation_id": conv})

    async def disconnect(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 3)
            except Exception:  # noqa: BLE001
                pass
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)

    async def read_loop(self, ws: Any) -> None:
        try:
            async for raw in ws:
                msg = json.loads(raw)
                event, ref, data = msg.get("event"), msg.get("ref"), msg.get("data") or {}
                if event == "error":
                    self.stats.errors[str(data.get("code"))] += 1
                if event == "message:new":
                    m = data.get("message") or {}
                    if ref is not None and str(ref).startswith("m"):
                        self.stats.acked += 1
                    elif m.get("sender_id") != self.uid:
                        self.last_peer = m
                fut = self.waiters.pop(ref, None) if ref is not None else None
                if fut is not None and not fut.done():
                    if event == "error":
                        fut.set_exception(RuntimeError(str(data.get("code"))))
                    else:
                        fut.set_result(msg)
        except Exception:  # noqa: BLE001 - the connection went away
            pass
        finally:
            if self.ws is ws and not self.stopping:
                self.stats.errors["connection_lost"] += 1

    stopping = False

    async def fire(self, event: str, data: dict[str, Any], ref: str | None = None) -> None:
        frame: dict[str, Any] = {"event": event, "data": data}
        if ref is not None:
            frame["ref"] = ref
        await self.ws.send(json.dumps(frame))

    async def request(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        self.nreq += 1
        ref = f"q{self.nreq}"
        fut = asyncio.get_running_loop().create_future()
        self.waiters[ref] = fut
        await self.fire(event, data, ref)
        try:
            return await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
        finally:
            self.waiters.pop(ref, None)

    async def step(self) -> None:
        r = self.rng.random()
        cid = self.conv
        if r < 0.70:
            self.counter += 1
            cmid = f"m{self.uid}.{self.counter}"
            self.stats.sent += 1
            await self.fire("message:send", {
                "conversation_id": cid, "type": "text", "metadata": {}, "client_message_id": cmid,
                "content": f"{encode_letters(self.counter)} {self.rng.choice(SMALL_TALK)}"}, cmid)
        elif r < 0.85:
            await self.fire("typing:start", {"conversation_id": cid})
            await asyncio.sleep(0.05)
            await self.fire("typing:stop", {"conversation_id": cid})
        elif r < 0.95:
            if self.last_peer is not None:
                await self.fire("message:read", {"conversation_id": cid,
                                                 "message_id": self.last_peer.get("id")}, "r")
        else:
            await self.request("message:history", {"conversation_id": cid, "limit": 20})

    async def run(self, url: str, until: float, rate: float, reconnect_share: float) -> None:
        while time.monotonic() < until:
            try:
                if self.ws is None:
                    await self.connect(url)
                await asyncio.sleep(self.rng.expovariate(rate))
                if self.rng.random() < reconnect_share:
                    self.stats.reconnects += 1
                    self.stopping = True
                    await self.disconnect()
                    self.stopping = False
                    continue
                await self.step()
                self.stats.steps += 1
            except Exception as e:  # noqa: BLE001 - counted; reconnect after a pause
                self.stats.errors[f"client_{type(e).__name__}"] += 1
                await self.disconnect()
                await asyncio.sleep(1)
        self.stopping = True
        await self.disconnect()


async def drive(args: argparse.Namespace, url: str, secret: str, pid: int, metrics_port: int,
                samples: list[dict[str, Any]], stats: Stats) -> None:
    rng = random.Random(args.seed)
    shared: dict[int, str] = {}
    users = [User(i, mint(secret, f"sk{i}", int(args.duration) + 3600), f"sk{i ^ 1}", shared,
                  stats, random.Random(rng.random())) for i in range(args.users)]
    t0 = time.monotonic()
    until = t0 + args.duration
    tasks = [asyncio.create_task(u.run(url, until, args.rate, args.reconnect_share))
             for u in users]
    next_at = t0
    while True:
        now = time.monotonic()
        if now >= next_at:
            s = sample(pid, metrics_port)
            if s is None:
                stats.errors["server_gone"] += 1
                break
            s["t"] = round(now - t0, 1)
            s["acked"] = stats.acked
            samples.append(s)
            next_at += args.interval
        if now >= until:
            break
        await asyncio.sleep(max(0.0, min(next_at, until) - time.monotonic()))
    done, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def judge(samples: list[dict[str, Any]], warmup: float) -> tuple[dict[str, Any], list[str]]:
    steady = [s for s in samples if s["t"] >= warmup]
    if len(steady) < 3:
        return {"steady_samples": len(steady)}, [f"only {len(steady)} samples after warm-up"]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    out: dict[str, Any] = {"steady_samples": len(steady)}
    failures = []
    for key, share, absolute, unit in (("rss_kb", RSS_GROWTH_SHARE, RSS_GROWTH_BYTES / 1024, "kB"),
                                       ("fds", FD_GROWTH_SHARE, FD_GROWTH_COUNT, ""),
                                       ("tasks", TASK_GROWTH_SHARE, TASK_GROWTH_COUNT, "")):
        a = statistics.median(s[key] for s in first)
        b = statistics.median(s[key] for s in last)
        out[f"{key}_first_median"], out[f"{key}_last_median"] = a, b
        if b - a > share * a and b - a > absolute:
            failures.append(f"{key} grew from {a:g}{unit} to {b:g}{unit} "
                            f"(bound: {share:.0%} and {absolute:g}{unit})")
    return out, failures


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="soak.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0,
                    help="seconds of load (default 600, at most 86400)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--users", type=int, default=20, help="users, in pairs (even, default 20)")
    ap.add_argument("--rate", type=float, default=2.0, help="steps per second per user (default 2)")
    ap.add_argument("--reconnect-share", type=float, default=0.01,
                    help="share of steps that are a reconnect instead (default 0.01)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of samples ignored (default: duration/5, at most 60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from scripts._deps import require

    require("soak.py", ["websockets.asyncio.client", "jwt", "winkr.auth"])
    if not 0 < args.duration <= 86400 or not 0.1 <= args.interval <= 3600:
        ap.error("need 0 < --duration <= 86400 and 0.1 <= --interval <= 3600")
    if args.users < 2 or args.users % 2 or args.users > 2000:
        ap.error("--users must be even, between 2 and 2000")
    if not 0 < args.rate <= 100 or not 0 <= args.reconnect_share <= 1:
        ap.error("need 0 < --rate <= 100 and 0 <= --reconnect-share <= 1")
    warmup = min(60.0, args.duration / 5) if args.warmup is None else args.warmup

    workdir = Path(tempfile.mkdtemp(prefix="winkr-soak-"))
    secret = secrets.token_urlsafe(32)
    samples: list[dict[str, Any]] = []
    stats = Stats()
    failures: list[str] = []
    verdict: dict[str, Any] = {}
    proc = None
    exit_status = None
    try:
        server, metrics_port = start(workdir, secret)
        proc = server.proc
        asyncio.run(drive(args, server.url, secret, proc.pid, metrics_port, samples, stats))
        if proc.poll() is not None:
            failures.append(f"server exited with {proc.returncode} during the run")
        exit_status = stop(proc)
        verdict, bound_failures = judge(samples, warmup)
        failures += bound_failures
    except KeyboardInterrupt:
        failures.append("interrupted")
    except Exception as e:  # noqa: BLE001 - reported, exit 1
        failures.append(f"harness error: {type(e).__name__}: {e}")
    finally:
        if proc is not None:
            kill(proc)
    if not stats.acked:
        failures.append("nothing acknowledged")

    summary = {"duration_s": args.duration, "users": args.users, "warmup_s": warmup,
               "steps": stats.steps, "sent": stats.sent, "acknowledged": stats.acked,
               "reconnects": stats.reconnects, "errors": dict(stats.errors),
               "server_exit_status": exit_status, **verdict, "samples": samples,
               "failures": failures, "ok": not failures}
    print(f"{'t (s)':>8} {'RSS (MiB)':>10} {'fds':>6} {'threads':>8} {'tasks':>6} {'acked':>9}",
          file=sys.stderr)
    for s in samples:
        print(f"{s['t']:>8.1f} {s['rss_kb'] / 1024:>10.1f} {s['fds']:>6} {s['threads']:>8} {s['tasks']:>6} "
              f"{s['acked']:>9}", file=sys.stderr)
    print(f"soak: {len(samples)} samples, acknowledged {stats.acked}, "
          f"RSS median {verdict.get('rss_kb_first_median', '?')} -> "
          f"{verdict.get('rss_kb_last_median', '?')} kB, fds "
          f"{verdict.get('fds_first_median', '?')} -> {verdict.get('fds_last_median', '?')} -> "
          f"{'PASS' if not failures else 'FAIL: ' + '; '.join(failures)}", flush=True)
    if failures or args.keep:
        summary["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
