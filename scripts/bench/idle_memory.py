#!/usr/bin/env python3
"""What a joined idle connection holds in winkr (issue 10): tracemalloc and live objects by
type, per connection.

Starts ``winkr serve`` under tracemalloc (scripts/bench/traced_server.py), creates the
conversations, takes a snapshot, opens ``--conns`` idle connections with the shared load
generator (each authenticated and joined to its conversation, as in the idle shape of
scripts/bench/run.py), takes a second snapshot once all are open, and prints the difference
divided by the number of connections: by allocation site (the innermost frame in winkr,
trio-websocket, wsproto, trio or h11), by line, and the objects by type.

    .venv-bench/bin/python scripts/bench/idle_memory.py [--conns 2000] [--top 30]

Loopback only, bounded in time (each wait has a deadline); the server it starts is stopped by
its PID. tracemalloc makes the server several times slower: the figures are bytes, not time.
"""
from __future__ import annotations

import argparse
import json
import linecache
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import HERE as BENCH_HERE  # noqa: E402
from run import find_shared_bench, free_port, stop, wait_for_port  # noqa: E402

# The packages whose frames name an allocation site (innermost match wins); the rest is
# "elsewhere" (the standard library called from one of them is attributed to the caller).
OWNERS = ("winkr/", "trio_websocket/", "wsproto/", "h11/", "trio/", "outcome/", "attrs/", "jwt/")
STABLE_SECONDS = 10.0
CALLERS = tuple(o for o in OWNERS if o not in ("trio/", "outcome/", "attrs/"))
GRACE_SECONDS = 6.0  # presence forgets the users of `prepare` after its 5 s grace


def gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def snapshot(proc: subprocess.Popen[bytes], trace_dir: Path, n: int, timeout: float = 120.0) -> None:
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not (trace_dir / f"done-{n}").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"idle_memory: snapshot {n} not written")
        time.sleep(0.2)


def site(trace: tracemalloc.Traceback, owners: tuple[str, ...] = OWNERS) -> str:
    """The innermost frame of an allocation that belongs to one of ``owners``."""
    for frame in reversed(trace):  # a Traceback lists the oldest call first
        name = frame.filename
        for owner in owners:
            i = name.find("/" + owner)
            if i >= 0:
                short = name[i + 1:]
                line = linecache.getline(frame.filename, frame.lineno).strip()
                return f"{short}:{frame.lineno}  {line[:70]}"
    frame = trace[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"


def caller(trace: tracemalloc.Traceback) -> str:
    """The innermost frame outside trio itself: which of our or trio-websocket's lines made trio
    allocate (a task, a cancel scope, a channel)."""
    return site(trace, CALLERS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--shared", help="the folder with loadgen.py and winkr_adapter.py")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    bench = find_shared_bench(args.shared)
    with tempfile.TemporaryDirectory(prefix="winkr-idle-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "WINKR_JWT_SECRET": secrets.token_urlsafe(48), "WINKR_TRACE_DIR": tmp}
        port, metrics_port = free_port(), free_port()
        proc = subprocess.Popen([sys.executable, str(HERE / "traced_server.py"), "serve", "--port", str(port),
                                 "--db", str(work / "w.db"), "--config", str(BENCH_HERE / "winkr_bench.toml"),
                                 "--log-level", "WARNING", "--metrics-port", str(metrics_port)],
                                env=env, stdout=subprocess.DEVNULL)
        loadgen = None
        try:
            wait_for_port(port, proc, timeout=60)
            url = f"ws://127.0.0.1:{port}/ws"
            subprocess.run([sys.executable, str(bench / "winkr_adapter.py"), "prepare", "--url", url, "--pairs",
                            str((args.conns + 1) // 2), "--out", str(work / "map.json"), "--warm", "50"],
                           env=env, check=True, timeout=600, stdout=subprocess.DEVNULL)
            time.sleep(GRACE_SECONDS)
            snapshot(proc, work, 1)
            loadgen = subprocess.Popen(
                [sys.executable, str(bench / "loadgen.py"), "idle", "--url", url, "--conns", str(args.conns),
                 "--hold", "60", "--warm-conns", "50", "--connect-concurrency", "16", "--server-pid", str(proc.pid),
                 "--adapter", f"{bench / 'winkr_adapter.py'}:WinkrAdapter", "--adapter-arg", str(work / "map.json")],
                env=env, stdout=subprocess.DEVNULL)
            # Until every connection is open, or (a slow machine: some timed out) until their
            # number has stopped moving for STABLE_SECONDS; the figures are per open connection.
            want, seen, since = args.conns + 50, -1.0, time.monotonic()
            deadline = since + 300
            while (opened := gauge(metrics_port, "winkr_connections")) < want:
                if opened != seen:
                    seen, since = opened, time.monotonic()
                elif opened > 0 and time.monotonic() - since > STABLE_SECONDS:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"idle_memory: only {opened:.0f} of {want} connections opened")
                time.sleep(0.5)
            time.sleep(3)  # the last joins and unread summaries settle
            snapshot(proc, work, 2)
            want = int(gauge(metrics_port, "winkr_connections"))
            before = tracemalloc.Snapshot.load(str(work / "snap-1.tracemalloc"))
            after = tracemalloc.Snapshot.load(str(work / "snap-2.tracemalloc"))
            types_before = Counter(json.loads((work / "types-1.json").read_text()))
            types_after = Counter(json.loads((work / "types-2.json").read_text()))
        finally:
            if loadgen is not None and loadgen.poll() is None:
                loadgen.send_signal(signal.SIGINT)
                try:
                    loadgen.wait(30)
                except subprocess.TimeoutExpired:
                    loadgen.kill()
            stop(proc)
    report(before, after, types_before, types_after, want, args.top, args.json)


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, types_before: Counter[str],
           types_after: Counter[str], conns: int, top: int, json_path: str | None) -> None:
    by_site: Counter[str] = Counter()
    count_by_site: Counter[str] = Counter()
    by_caller: Counter[str] = Counter()
    count_by_caller: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        where, who = site(stat.traceback), caller(stat.traceback)
        by_site[where] += stat.size_diff
        count_by_site[where] += stat.count_diff
        by_caller[who] += stat.size_diff
        count_by_caller[who] += stat.count_diff
    total = sum(by_site.values())
    print(f"traced Python memory per connection: {total / conns:,.0f} bytes ({conns} connections)")
    for title, sizes, counts in (
            ("allocation site (innermost frame in winkr, trio-websocket, wsproto, h11, trio, ...)",
             by_site, count_by_site),
            ("who asked (innermost frame outside trio: winkr, trio-websocket, wsproto, h11, jwt)",
             by_caller, count_by_caller)):
        print(f"\n{'bytes/conn':>10} {'blocks/conn':>11}  {title}")
        for where, size in sizes.most_common(top):
            print(f"{size / conns:10,.0f} {counts[where] / conns:11.2f}  {where}")
    objects = Counter({k: types_after[k] - types_before.get(k, 0) for k in types_after})
    print(f"\n{'objects/conn':>12}  type (gc-tracked objects)")
    for name, n in objects.most_common(top):
        if n / conns >= 0.5:
            print(f"{n / conns:12.2f}  {name}")
    if json_path:
        Path(json_path).write_text(json.dumps({
            "connections": conns, "traced_bytes_per_conn": total / conns,
            "sites": {k: v / conns for k, v in by_site.most_common(top)},
            "callers": {k: v / conns for k, v in by_caller.most_common(top)},
            "objects": {k: v / conns for k, v in objects.most_common(top) if v / conns >= 0.5}}, indent=1))


if __name__ == "__main__":
    main()
