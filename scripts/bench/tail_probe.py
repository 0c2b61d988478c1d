#!/usr/bin/env python3
"""Where winkr's latency tail comes from in the realistic shape (issue 10).

Runs ``winkr serve`` (run.py's ``Winkr`` target: every limit off, a fresh database, pinned to
CPU 0) with instruments inside it, drives it with loadgen's realistic shape (500 pairs,
1,000 msgs/s open loop, load on CPU 1), and prints for a steady window of the run:

- loadgen's send→peer p50/p99 (the figure the target is judged on);
- Python's cyclic GC: collections and pause histogram per generation, and on which thread;
- the trio run loop's lag: a probe task sleeping 1 ms, how late it wakes (histogram);
- stalls: run-loop turns (wake-up from epoll to the next wait) longer than ``--stall-ms``,
  each with the trio thread's own CPU time in it (wall ≫ CPU: the thread was waiting for the
  GIL or for the core), the GC pauses, writer batches and checkpoints that overlap it, and the
  tasks that ran longest in it; then an attribution of every stall;
- epoll overshoot: waits that returned more than 1 ms after their timeout (the GIL or the core
  were elsewhere when the thread woke);
- the store writer's batches and the WAL checkpointer's passes (durations, on their threads);
- log records emitted;
- the kernel's view (``/proc/self/task/*/schedstat``): per thread, CPU time and time spent
  runnable but waiting for the core during the window.

    .venv/bin/python scripts/bench/tail_probe.py                      # 1 run, the code as it is
    .venv/bin/python scripts/bench/tail_probe.py --gc default         # the interpreter's GC settings
    .venv/bin/python scripts/bench/tail_probe.py --gc 50000 --duration 30
    .venv/bin/python scripts/bench/tail_probe.py --gc off --no-lag-probe --repeats 2

``--gc default`` undoes winkr's GC settings in the server (the young threshold ``winkr serve``
sets, the start-up heap frozen), to compare against them; ``--gc N`` sets the young threshold;
``--gc off`` disables the cyclic GC altogether (an upper bound on what GC tuning can win, not a
setting to run with). The probe's instruments cost a few µs per task step.

Bounded like run.py: each run is warm-up + duration + 120 s at most, 127.0.0.1 only, and the
server it starts is stopped by its PID.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

# --- the server side ------------------------------------------------------------------------
# Everything below up to `server_main` runs inside `winkr serve` (this file is the wrapper that
# run.py's Winkr target starts). Events are kept in lists with time.perf_counter() stamps
# (CLOCK_MONOTONIC on Linux, the clock loadgen and the driver use too) and written as JSON on
# SIGUSR1 to $WINKR_PROBE_DIR/probe-N.json.

OUT = Path(os.environ.get("WINKR_PROBE_DIR", "."))
STALL_S = float(os.environ.get("WINKR_PROBE_STALL_MS", "5")) / 1000
LONG_STEP_S = 0.0005  # task steps kept by name inside a turn

gc_events: list[tuple[float, float, int, str, int, float]] = []  # start, s, generation, thread, collected, CPU s
# The long series are flat arrays of floats: tuples kept by the million would be GC-tracked
# objects themselves and make the collections measured here longer.
lag_samples = array("d")  # wake time, lateness in seconds, ...
stalls: list[dict[str, Any]] = []
overshoots: list[tuple[float, float, float]] = []  # wake time, timeout, seconds past it
batches = array("d")  # start, seconds, requests, ...
checkpoints: list[tuple[float, float, list[Any]]] = []  # start, seconds, (busy, log, checkpointed)
log_counts: Counter[str] = Counter()
step_hist: Counter[int] = Counter()  # task step wall time, by power-of-two µs bucket
turn_count = [0]
_gc_started: dict[int, tuple[float, float]] = {}


def _on_gc(phase: str, info: dict[str, int]) -> None:
    ident = threading.get_ident()
    if phase == "start":
        _gc_started[ident] = time.perf_counter(), time.thread_time()
        return
    started = _gc_started.pop(ident, None)
    if started is not None:
        gc_events.append((started[0], time.perf_counter() - started[0], info["generation"],
                          threading.current_thread().name, info.get("collected", 0),
                          time.thread_time() - started[1]))


class TurnProbe:
    """A trio instrument: times run-loop turns and task steps (wall and the thread's CPU)."""

    def __init__(self) -> None:
        self.turn_start = 0.0
        self.turn_cpu = 0.0
        self.steps: list[tuple[str, float]] = []
        self.step_start = 0.0
        self.wait_start = 0.0
        self.wait_timeout = 0.0

    def before_io_wait(self, timeout: float) -> None:
        now = time.perf_counter()
        if self.turn_start:
            wall = now - self.turn_start
            turn_count[0] += 1
            if wall >= STALL_S:
                cpu = time.thread_time() - self.turn_cpu
                top = sorted(self.steps, key=lambda s: -s[1])[:6]
                stalls.append({"t": self.turn_start, "wall": wall, "cpu": cpu, "steps": len(self.steps),
                               "top": [(n, round(d * 1e3, 3)) for n, d in top]})
        self.steps = []
        self.wait_start, self.wait_timeout = now, timeout

    def after_io_wait(self, timeout: float) -> None:
        now = time.perf_counter()
        past = now - self.wait_start - timeout
        if past > 0.001:
            overshoots.append((now, timeout, past))
        self.turn_start = now
        self.turn_cpu = time.thread_time()

    def before_task_step(self, task: Any) -> None:
        self.step_start = time.perf_counter()

    def after_task_step(self, task: Any) -> None:
        took = time.perf_counter() - self.step_start
        step_hist[max(0, int(took * 1e6)).bit_length()] += 1
        if took >= LONG_STEP_S:
            self.steps.append((task.name.rpartition(".")[2] or task.name, took))


async def _lag_probe() -> None:
    import trio

    while True:
        asked = time.perf_counter()
        await trio.sleep(0.001)
        now = time.perf_counter()
        lag_samples.extend((now, now - asked - 0.001))


def _wrap_store() -> None:
    """Time the store writer's batches and the checkpointer's passes where they run."""
    import winkr.store.checkpointer as checkpointer
    import winkr.store.writer as writer

    run_batch = writer._run_batch

    def timed_batch(store: Any, batch: list[Any]) -> Any:
        started = time.perf_counter()
        try:
            return run_batch(store, batch)
        finally:
            batches.extend((started, time.perf_counter() - started, len(batch)))

    def timed_checkpoint(db: Any, mode: str) -> None:
        started = time.perf_counter()
        row = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        checkpoints.append((started, time.perf_counter() - started, list(row or ())))

    writer._run_batch = timed_batch  # type: ignore[assignment]
    checkpointer._checkpoint = timed_checkpoint  # type: ignore[assignment]


def _schedstat() -> dict[str, list[int]]:
    """{thread name: [ns on the CPU, ns runnable and waiting, timeslices]} of this process."""
    found = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            values = [int(v) for v in (task / "schedstat").read_text().split()]
        except (OSError, ValueError):
            continue
        found[f"{name}/{task.name}"] = values
    return found


_dumps = [0]


def _dump(signum: int, frame: FrameType | None) -> None:
    """Dumps 1 and 2 mark the window's ends (counters only: microseconds on the trio thread, so
    they do not disturb the run); dump 3, after the load, writes the events too."""
    n = _dumps[0] = _dumps[0] + 1
    state: dict[str, Any] = {"now": time.perf_counter(), "logs": log_counts, "steps": step_hist,
                             "turns": turn_count[0], "schedstat": _schedstat()}
    if n > 2:
        state.update({"gc": gc_events, "lag": lag_samples.tolist(), "stalls": stalls, "overshoots": overshoots,
                      "batches": batches.tolist(), "checkpoints": checkpoints, "gc_threshold": gc.get_threshold(),
                      "gc_frozen": gc.get_freeze_count(), "gc_enabled": gc.isenabled(),
                      "gc_objects": len(gc.get_objects()), "switchinterval": sys.getswitchinterval()})
    (OUT / f"probe-{n}.json").write_text(json.dumps(state))
    (OUT / f"done-{n}").write_text("")


class _CountLogs:
    """A logging handler that only counts records (by logger and level)."""

    level = 0

    def handle(self, record: Any) -> bool:
        log_counts[f"{record.name}:{record.levelname}"] += 1
        return True


def server_main(argv: list[str]) -> None:
    import logging

    import trio

    gc_mode = os.environ.get("WINKR_PROBE_GC", "winkr")
    import winkr.server as server_module

    if gc_mode in ("default", "off"):  # undo winkr's GC settings: CPython's threshold, no freeze
        server_module.settle_gc = lambda: None  # type: ignore[assignment]
    elif gc_mode != "winkr":  # N: winkr's settings with this young threshold
        server_module.GC_YOUNGEST_THRESHOLD = int(gc_mode)
    if gc_mode == "off":
        gc.disable()
    switch = os.environ.get("WINKR_PROBE_SWITCH_MS")
    if switch:
        sys.setswitchinterval(float(switch) / 1000)
    gc.callbacks.append(_on_gc)
    _wrap_store()
    logging.getLogger().addHandler(_CountLogs())  # type: ignore[arg-type]
    original = trio.run
    lag = os.environ.get("WINKR_PROBE_LAG", "1") == "1"

    def probed_run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def main_with_probe(*inner: Any) -> Any:
            if lag:
                trio.lowlevel.spawn_system_task(_lag_probe, name="lag-probe")
            return await fn(*inner)

        kwargs["instruments"] = [*kwargs.get("instruments", ()), TurnProbe()]
        return original(main_with_probe, *args, **kwargs)

    trio.run = probed_run  # the CLI calls trio.run once, for the server
    signal.signal(signal.SIGUSR1, _dump)
    from winkr.cli import main as winkr_main

    raise SystemExit(winkr_main(argv))


# --- the driver ---------------------------------------------------------------------------

BUCKETS_MS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, float("inf"))


def histogram(values_ms: list[float]) -> str:
    counts = [0] * len(BUCKETS_MS)
    for v in values_ms:
        counts[next(i for i, b in enumerate(BUCKETS_MS) if v < b)] += 1
    labels = [f"<{b:g}" if b != float("inf") else f"≥{BUCKETS_MS[-2]:g}" for b in BUCKETS_MS]
    return "  ".join(f"{label}:{c}" for label, c in zip(labels, counts) if c) or "none"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def _overlap(start: float, end: float, events: list[Any]) -> float:
    """Seconds of [start, end) covered by events given as (start, seconds, ...)."""
    return sum(max(0.0, min(end, s + d) - max(start, s)) for s, d, *_ in events)


def report(first: dict[str, Any], last: dict[str, Any], events: dict[str, Any], loadgen: dict[str, Any],
           stall_ms: float) -> dict[str, Any]:
    """Print the window [first, last) (two marks) from the events of the final dump."""
    t0, t1 = first["now"], last["now"]
    window = t1 - t0

    def inside(events: list[Any]) -> list[Any]:
        return [e for e in events if t0 <= e[0] < t1]

    def rows(flat: list[float], width: int) -> list[list[float]]:
        return [flat[i:i + width] for i in range(0, len(flat), width)]

    gcs = inside(events["gc"])
    lags = [lateness * 1e3 for _, lateness in inside(rows(events["lag"], 2))]
    stall_list = [s for s in events["stalls"] if t0 <= s["t"] < t1]
    batches, checkpoints = inside(rows(events["batches"], 3)), inside(events["checkpoints"])
    lat = loadgen.get("lat_us") or {}
    cpu, delivered = loadgen.get("server_cpu_pct"), loadgen.get("delivered_per_s")
    print(f"\nwindow {window:.1f} s; loadgen: p50 {lat.get('p50', 0) / 1e3:.2f} ms, "
          f"p99 {lat.get('p99', 0) / 1e3:.2f} ms, max {lat.get('max', 0) / 1e3:.1f} ms; "
          f"server CPU {cpu} % ({delivered} delivered/s)")
    print(f"server: gc threshold {events['gc_threshold']}, frozen {events['gc_frozen']:,}, tracked objects "
          f"{events['gc_objects']:,}, gc enabled {events['gc_enabled']}, switch interval "
          f"{events['switchinterval'] * 1e3:g} ms; run-loop turns {last['turns'] - first['turns']:,}")

    print("\nGC pauses in the window (ms):")
    for gen in (0, 1, 2):
        mine = [d * 1e3 for _, d, g, *_ in gcs if g == gen]
        if mine:
            threads = Counter(t for _, _, g, t, *_ in gcs if g == gen)
            found = sum(n for _, _, g, _, n, _ in gcs if g == gen)
            cpu_ms = sum(c for _, _, g, _, _, c in gcs if g == gen) * 1e3
            print(f"  gen{gen}: {len(mine):5d} collections ({found:,} objects freed, {cpu_ms:.1f} ms of thread CPU), "
                  f"{sum(mine):7.1f} ms in all "
                  f"({sum(mine) / window / 10:.2f} % of the time), max {max(mine):6.2f}, "
                  f"p99 {pct(mine, 99):5.2f} | {histogram(mine)} | threads {dict(threads)}")
            slow = [(round(d * 1e3, 1), round(c * 1e3, 1), n) for _, d, g, _, n, c in gcs if g == gen and d >= 0.002]
            if slow:
                print(f"        ≥ 2 ms (wall ms, thread CPU ms, collected): {slow[:12]}")

    if lags:
        print(f"\nlag probe (trio.sleep(0.001) woke late by, ms): n {len(lags)}, p50 {pct(lags, 50):.2f}, "
              f"p99 {pct(lags, 99):.2f}, p99.9 {pct(lags, 99.9):.2f}, max {max(lags):.1f} | {histogram(lags)}")

    steps = Counter({int(k): v for k, v in last["steps"].items()})
    steps.subtract(Counter({int(k): v for k, v in first["steps"].items()}))
    step_line = "  ".join(f"<{2 ** k / 1000:g}ms:{v}" for k, v in sorted(steps.items()) if v and 2 ** k >= 512)
    print(f"task steps ≥ 0.26 ms: {step_line or 'none'}")

    over = inside(events["overshoots"])
    if over:
        past = [p * 1e3 for _, _, p in over]
        print(f"epoll waits that woke > 1 ms after their timeout: {len(over)}, p50 {pct(past, 50):.1f} ms,"
              f" max {max(past):.1f} ms")

    durations = [d * 1e3 for _, d, _ in batches]
    if durations:
        sizes = [n for *_, n in batches]
        print(f"\nstore writer: {len(batches)} batches ({sum(sizes) / len(batches):.2f} requests each), "
              f"p50 {pct(durations, 50):.2f} ms, p99 {pct(durations, 99):.2f} ms, max {max(durations):.1f} | "
              f"{histogram(durations)}")
    for start, took, row in checkpoints:
        print(f"checkpoint at +{start - t0:5.2f} s: {took * 1e3:.1f} ms (busy, wal pages, moved: {row})")
    if checkpoints and durations:
        # Does a checkpoint hold up the writer? Its batches during one against the others.
        during = [d * 1e3 for s, d, _ in batches if any(c <= s < c + t for c, t, _ in checkpoints)]
        others = [d * 1e3 for s, d, _ in batches if not any(c <= s < c + t for c, t, _ in checkpoints)]
        if during:
            print(f"writer batches during checkpoints: {len(during)}, p50 {pct(during, 50):.2f} ms, "
                  f"max {max(during):.1f}; outside: p50 {pct(others, 50):.2f} ms, p99 {pct(others, 99):.2f} ms")
    logs = Counter(last["logs"])
    logs.subtract(Counter(first["logs"]))
    print(f"log records in the window: {dict(+logs) or 'none'}")

    print("\nthreads (kernel schedstat, the window): CPU ms, waiting-for-core ms, timeslices")
    for name, (run_ns, wait_ns, slices) in sorted(last["schedstat"].items()):
        before = first["schedstat"].get(name, [0, 0, 0])
        print(f"  {name:28s} {(run_ns - before[0]) / 1e6:8.1f} {(wait_ns - before[1]) / 1e6:8.1f} "
              f"{slices - before[2]:7d}")

    causes: Counter[str] = Counter()
    print(f"\nstalls (run-loop turns ≥ {stall_ms:g} ms): {len(stall_list)}")
    for s in stall_list:
        start, end = s["t"], s["t"] + s["wall"]
        in_gc = _overlap(start, end, gcs)
        gen = max((g for st, d, g, *_ in gcs if st < end and st + d > start), default=None)
        in_ckpt = _overlap(start, end, checkpoints)
        in_batch = _overlap(start, end, batches)
        if in_gc >= 0.5 * s["wall"]:
            cause = f"gc gen{gen}"
        elif s["cpu"] < 0.5 * s["wall"]:  # the trio thread waited: for the GIL or for the core
            waited = s["wall"] - s["cpu"]
            if in_batch >= 0.5 * waited:
                cause = "waited while the writer thread ran (GIL or the shared core)"
            elif in_ckpt >= 0.5 * waited:
                cause = "waited while a checkpoint ran"
            else:
                cause = "waited, no thread of ours running (off the core: other processes)"
        else:
            cause = "busy turn (CPU in tasks)"
        causes[cause] += 1
        print(f"  +{start - t0:6.3f} s  wall {s['wall'] * 1e3:6.2f} ms  cpu {s['cpu'] * 1e3:6.2f}  "
              f"gc {in_gc * 1e3:5.2f}{f' (gen{gen})' if gen is not None else ''}  writer {in_batch * 1e3:5.2f}  "
              f"ckpt {in_ckpt * 1e3:5.2f}  steps {s['steps']:4d}  → {cause}; top {s['top'][:3]}")
    print(f"stall causes: {dict(causes)}")
    return {"p50_ms": lat.get("p50", 0) / 1e3, "p99_ms": lat.get("p99", 0) / 1e3,
            "server_cpu_pct": cpu, "stalls": len(stall_list), "causes": dict(causes),
            "gc_ms": {g: round(sum(d for _, d, gg, *_ in gcs if gg == g) * 1e3, 1) for g in (0, 1, 2)},
            "gc_count": {g: sum(1 for _, _, gg, *_ in gcs if gg == g) for g in (0, 1, 2)},
            "gc_max_ms": round(max((d for _, d, *_ in gcs), default=0) * 1e3, 2),
            "gc2_max_ms": round(max((d for _, d, g, *_ in gcs if g == 2), default=0) * 1e3, 2),
            "lag_p99_ms": round(pct(lags, 99), 2) if lags else None}


def drive(args: argparse.Namespace) -> dict[str, Any]:
    from scripts.bench.run import Winkr, find_shared_bench, free_port, scrape, start_loadgen, wait_for_quiet

    bench = find_shared_bench(args.shared)
    if args.quiet:
        wait_for_quiet(args.quiet, args.patience)
    with tempfile.TemporaryDirectory(prefix="winkr-tail-") as tmp:
        workdir = Path(tmp)
        target = Winkr(bench, workdir, free_port(), wrapper=Path(__file__).resolve())
        target.env.update({"WINKR_PROBE_DIR": str(workdir), "WINKR_PROBE_GC": args.gc,
                           "WINKR_PROBE_STALL_MS": str(args.stall_ms),
                           "WINKR_PROBE_LAG": "0" if args.no_lag_probe else "1"})
        if args.switch_ms:
            target.env["WINKR_PROBE_SWITCH_MS"] = str(args.switch_ms)
        lg_args = ["pairs", "--pairs", str(args.pairs), "--rate", str(args.rate), "--warmup", str(args.warmup),
                   "--duration", str(args.duration)]
        with target.running() as pid:
            target.prepare("realistic", args.pairs, 0)
            loadgen = start_loadgen(bench, target, pid, lg_args, "tail-probe")
            sends = 'winkr_events_received_total{event="message:send"}'
            deadline = time.monotonic() + 120
            assert target.metrics_port is not None
            while scrape(target.metrics_port).get(sends, 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(args.warmup)
            first = _ask_dump(pid, workdir, 1)
            time.sleep(max(1.0, args.duration - 2))
            last = _ask_dump(pid, workdir, 2)
            stdout, _ = loadgen.communicate(timeout=args.warmup + args.duration + 120)
            events = _ask_dump(pid, workdir, 3)
    result = json.loads(stdout.strip().splitlines()[-1])
    return report(first, last, events, result, args.stall_ms)


def _ask_dump(pid: int, workdir: Path, n: int, timeout: float = 30.0) -> dict[str, Any]:
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not (workdir / f"done-{n}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the probed server did not write its state")
        time.sleep(0.05)
    state: dict[str, Any] = json.loads((workdir / f"probe-{n}.json").read_text())
    return state


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":  # started by the driver as the server
        server_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gc", default="winkr",
                    help="winkr: the server's own GC settings (young threshold, start-up heap frozen); "
                         "default: CPython's; off: no cyclic GC; N: winkr's with young threshold N")
    ap.add_argument("--switch-ms", type=float, default=0.0, help="sys.setswitchinterval in the server (ms)")
    ap.add_argument("--stall-ms", type=float, default=5.0, help="run-loop turns at least this long are stalls")
    ap.add_argument("--no-lag-probe", action="store_true", help="without the 1 ms sleeper task")
    ap.add_argument("--shared", help="the folder with loadgen.py (default: ../shared/bench beside the checkout)")
    ap.add_argument("--quiet", type=float, default=10.0, help="wait until CPU pressure ≤ this %% (0: do not)")
    ap.add_argument("--patience", type=float, default=120.0)
    ap.add_argument("--out", default="", help="append each run's summary (JSON) to this file")
    args = ap.parse_args()
    if args.duration + args.warmup > 120:
        ap.error("warm-up + duration ≤ 120 s")
    for repeat in range(args.repeats):
        summary = {"gc": args.gc, "switch_ms": args.switch_ms, "repeat": repeat, **drive(args)}
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
