#!/usr/bin/env python3
"""Side-by-side benchmark (issue 10): winkr, the bare trio-websocket relay and python-socketio
on uvicorn, in the same run, on loopback, alternating, with the pinning of
../shared/bench/README.md (server on CPU 0, load generator on CPU 1).

Shapes (the shared load generator, ``loadgen.py``, drives every target):

- ``realistic``:  1,000 users in 500 two-person conversations, 1,000 msgs/s in all, open loop
  (``pairs --pairs 500 --rate 1000``): latency p50/p99 and the server's CPU;
- ``saturation``: 100 pairs, 32 messages in flight per sender (``pairs --pairs 100 --window
  32``): delivered messages per second;
- ``idle``:       2,000 connections, each authenticated and (winkr) joined to its
  conversation (``idle --conns 2000``): server RSS per connection.

Targets: ``relay`` (``relay_trio.py``), ``sio`` (``scripts/bench/sio_relay.py``, driven through
``scripts/bench/sio_adapter.py``) and ``winkr`` (``winkr serve`` with every limit off,
``scripts/bench/winkr_bench.toml``; conversations created first with ``winkr_adapter.py
prepare``; a fresh database per run). Every run starts its own server and stops it.

Each shape runs ``--repeats`` times (at least 2), the targets' order reversed every other
time; prints one JSON line per run (and appends it to ``--out``), then the medians and each
target's ratio to the relay of the same repeat (median over repeats).

    scripts/bench/setup                               # .venv-bench with the [bench] extra
    .venv-bench/bin/python scripts/bench/run.py       # every shape, every target, twice
    .venv-bench/bin/python scripts/bench/run.py --shapes realistic --targets relay,winkr --repeats 3
    .venv-bench/bin/python scripts/bench/run.py --profile realistic   # py-spy on winkr (not measured)
    .venv-bench/bin/python scripts/bench/profile_summary.py bench-profile/realistic.raw.txt

Bounded: each load-generator run is given warm-up + duration + 120 s, each server 30 s to
start; everything talks to 127.0.0.1 only; every process started is stopped by its PID.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if __package__ in (None, ""):  # `python scripts/bench/run.py`: the checkout's root, so that `scripts` imports
    sys.path.insert(0, str(ROOT))
from scripts._deps import require  # noqa: E402

SHAPES = ("realistic", "saturation", "idle")
TARGETS = ("relay", "sio", "winkr")
SERVER_CPU, LOAD_CPU = "0", "1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PREPARE_TIMEOUT = 180.0


def find_shared_bench(given: str | None) -> Path:
    candidates = [Path(given)] if given else [ROOT.parent / "shared" / "bench", ROOT.parent.parent / "shared" / "bench"]
    for candidate in candidates:
        if (candidate / "loadgen.py").is_file() and (candidate / "relay_trio.py").is_file():
            return candidate.resolve()
    raise SystemExit(f"run.py: no loadgen.py/relay_trio.py in {', '.join(map(str, candidates))}; give --shared")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server not listening on {port} within {timeout:g} s")


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


class Target:
    """How to start one server and point loadgen at it."""

    name = ""

    def __init__(self, bench: Path, workdir: Path) -> None:
        self.bench = bench
        self.workdir = workdir
        self.port = 0
        self.env = dict(os.environ)

    def server_argv(self) -> list[str]:
        raise NotImplementedError

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def adapter_args(self) -> list[str]:
        return []

    def prepare(self, shape: str, pairs: int, warm: int) -> None:
        """Anything the server needs before the load (winkr: its conversations)."""

    @contextmanager
    def running(self) -> Iterator[int]:
        self.port = free_port()
        proc = subprocess.Popen(pinned(SERVER_CPU, self.server_argv()), cwd=self.workdir, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"{self.name}.log", "ab"))
        try:
            wait_for_port(self.port, proc)
            yield proc.pid
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Relay(Target):
    name = "relay"

    def server_argv(self) -> list[str]:
        return [sys.executable, str(self.bench / "relay_trio.py"), str(self.port)]


class SocketIO(Target):
    name = "sio"

    def server_argv(self) -> list[str]:
        return [sys.executable, str(HERE / "sio_relay.py"), str(self.port)]

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket.io/?EIO=4&transport=websocket"

    def adapter_args(self) -> list[str]:
        return ["--adapter", f"{HERE / 'sio_adapter.py'}:SocketIOAdapter"]


class Winkr(Target):
    name = "winkr"

    def __init__(self, bench: Path, workdir: Path, metrics_port: int | None = None,
                 wrapper: Path | None = None) -> None:
        super().__init__(bench, workdir)
        self.env["WINKR_JWT_SECRET"] = secrets.token_urlsafe(48)  # a throwaway for this run
        self.map = workdir / "map.json"
        self.metrics_port = metrics_port
        self.wrapper = wrapper  # a script that runs the CLI instrumented (counted_server.py)

    def server_argv(self) -> list[str]:
        db = self.workdir / "bench.db"
        for path in self.workdir.glob("bench.db*"):
            path.unlink()  # a fresh database for every run
        command = [str(self.wrapper)] if self.wrapper else ["-m", "winkr"]
        argv = [sys.executable, *command, "serve", "--port", str(self.port), "--db", str(db),
                "--config", str(HERE / "winkr_bench.toml"), "--log-level", "WARNING"]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        return argv

    def adapter_args(self) -> list[str]:
        return ["--adapter", f"{self.bench / 'winkr_adapter.py'}:WinkrAdapter", "--adapter-arg", str(self.map)]

    def prepare(self, shape: str, pairs: int, warm: int) -> None:
        argv = [sys.executable, str(self.bench / "winkr_adapter.py"), "prepare", "--url", self.url(),
                "--pairs", str(pairs), "--out", str(self.map)]
        if warm:
            argv += ["--warm", str(warm)]
        subprocess.run(pinned(LOAD_CPU, argv), env=self.env, check=True, timeout=PREPARE_TIMEOUT,
                       stdout=subprocess.DEVNULL)


def make_target(name: str, bench: Path, workdir: Path, metrics_port: int | None = None) -> Target:
    if name == "winkr":
        return Winkr(bench, workdir, metrics_port)
    return {"relay": Relay, "sio": SocketIO}[name](bench, workdir)


def loadgen_argv(args: argparse.Namespace, shape: str) -> tuple[list[str], int, int, float]:
    """(loadgen arguments, pairs winkr must prepare, warm-up users to prepare, timeout)."""
    if shape == "realistic":
        return (["pairs", "--pairs", str(args.realistic_pairs), "--rate", str(args.realistic_rate),
                 "--warmup", str(args.warmup), "--duration", str(args.duration)],
                args.realistic_pairs, 0, args.warmup + args.duration + 120)
    if shape == "saturation":
        return (["pairs", "--pairs", "100", "--window", "32", "--warmup", str(args.warmup),
                 "--duration", str(args.duration)], 100, 0, args.warmup + args.duration + 120)
    warm = 50
    return (["idle", "--conns", str(args.idle_conns), "--hold", "3", "--warm-conns", str(warm)],
            (args.idle_conns + 1) // 2, warm, 240)


def run_one(args: argparse.Namespace, bench: Path, workdir: Path, shape: str, target_name: str,
            repeat: int) -> dict[str, Any]:
    target = make_target(target_name, bench, workdir)
    lg_args, pairs, warm, timeout = loadgen_argv(args, shape)
    with target.running() as pid:
        target.prepare(shape, pairs, warm)
        argv = [sys.executable, str(bench / "loadgen.py"), *lg_args, "--url", target.url(),
                "--server-pid", str(pid), "--label", f"{shape}/{target_name}/{repeat}", *target.adapter_args()]
        done = subprocess.run(pinned(LOAD_CPU, argv), env=target.env, capture_output=True, text=True,
                              timeout=timeout)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"shape": shape, "target": target_name, "repeat": repeat, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "loadavg": load_average(), "cpu_pressure_after": cpu_pressure(), "result": result}


def cpu_pressure() -> float | None:
    """The share of the last 10 s in which some runnable task waited for a CPU (PSI), in %."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(first.split()[1].split("=")[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_for_quiet(limit: float, patience: float) -> float | None:
    """Wait (up to ``patience`` seconds) until CPU pressure falls to ``limit`` %: other work on
    these 2 shared cores skews a run far beyond ±20 %. Returns the pressure at the start."""
    deadline = time.monotonic() + patience
    while (pressure := cpu_pressure()) is not None and pressure > limit and time.monotonic() < deadline:
        time.sleep(2)
    return pressure


def load_average() -> float | None:
    """The machine's 1-minute load average after the run: other work shares these 2 cores."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- summary -------------------------------------------------------------------------------

def figures(shape: str, result: dict[str, Any]) -> dict[str, float | None]:
    """The figures of one run that the table shows."""
    if shape == "idle":
        return {"bytes_per_conn": result.get("bytes_per_conn"), "connected": result.get("connected")}
    lat = result.get("lat_us") or {}
    out: dict[str, float | None] = {
        "delivered_per_s": result.get("delivered_per_s"),
        "p50_ms": lat["p50"] / 1000 if lat.get("p50") is not None else None,
        "p99_ms": lat["p99"] / 1000 if lat.get("p99") is not None else None,
        "server_cpu_pct": result.get("server_cpu_pct"),
    }
    cpu, delivered = result.get("server_cpu_pct"), result.get("delivered_per_s")
    out["cpu_us_per_msg"] = round(cpu / 100 * 1e6 / delivered, 1) if cpu and delivered else None
    return out


# the figure each shape's ratio is judged on, and whether lower is better
KEY = {"realistic": ("p99_ms", "server_cpu_pct"), "saturation": ("delivered_per_s",), "idle": ("bytes_per_conn",)}


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]]) -> str:
    lines = []
    for shape in SHAPES:
        rows = [r for r in records if r["shape"] == shape]
        if not rows:
            continue
        lines.append(f"\n## {shape} ({len({r['repeat'] for r in rows})} repeats)")
        names = sorted({name for r in rows for name in figures(shape, r["result"])})
        lines.append("| target | " + " | ".join(names) + " | " + " | ".join(f"{k} / relay" for k in KEY[shape])
                     + " |")
        lines.append("| --- " * (1 + len(names) + len(KEY[shape])) + "|")
        relay_of = {r["repeat"]: figures(shape, r["result"]) for r in rows if r["target"] == "relay"}
        for target in TARGETS:
            mine = [r for r in rows if r["target"] == target]
            if not mine:
                continue
            per_run = [figures(shape, r["result"]) for r in mine]
            cells = [_fmt(median([f.get(n) for f in per_run])) for n in names]
            ratios = []
            for key in KEY[shape]:
                pairs = [(figures(shape, r["result"]).get(key), relay_of.get(r["repeat"], {}).get(key)) for r in mine]
                ratio = median([a / b for a, b in pairs if a is not None and b])
                ratios.append(f"{ratio:.2f}×" if ratio is not None else "–")
            lines.append(f"| {target} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


# --- profiling -----------------------------------------------------------------------------

def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """The winkr metrics endpoint as {series: value} (counters and histogram sums/counts)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:  # noqa: S310
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


def profile(args: argparse.Namespace, bench: Path, workdir: Path, shape: str) -> None:
    """Two winkr runs of ``shape``, written into ``--profile-dir``:

    1. under py-spy (raw collapsed stacks, per thread): ``SHAPE.raw.txt``, and loadgen's line,
       ``SHAPE.loadgen.json`` (the server's CPU per message);
    2. with a trio instrument counting task steps (``counted_server.py``) and the metrics
       endpoint on: per ``message:send`` received in a steady window, the task steps by task,
       the frames encoded by event, the socket writes, the store requests and commits:
       ``SHAPE.counts.json``.
    """
    out_dir = Path(args.profile_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lg_args, pairs, warm, timeout = loadgen_argv(args, shape)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    target = make_target("winkr", bench, workdir)
    if args.quiet:
        wait_for_quiet(args.quiet, args.patience)
    with target.running() as pid:
        target.prepare(shape, pairs, warm)
        loadgen = start_loadgen(bench, target, pid, lg_args, f"profile/{shape}")
        time.sleep(args.warmup + 1.5)  # connected and past the warm-up
        spy = subprocess.run(pinned(LOAD_CPU, [py_spy, "record", "--pid", str(pid), "--duration",
                                               str(max(1, int(args.duration - 2))), "--rate", str(args.rate),
                                               "--format", "raw", "--threads",
                                               *(["--nonblocking"] if args.nonblocking else []),
                                               "--output", str(out_dir / f"{shape}.raw.txt")]),
                             capture_output=True, text=True, timeout=args.duration + 60)
        stdout, _ = loadgen.communicate(timeout=timeout)
    if spy.returncode != 0:
        print(f"py-spy failed: {spy.stderr[-1000:]}", file=sys.stderr)
    result = json.loads(stdout.strip().splitlines()[-1])
    (out_dir / f"{shape}.loadgen.json").write_text(json.dumps(result))
    print(json.dumps({"profile": str(out_dir / f"{shape}.raw.txt"), "loadgen": figures(shape, result)}))

    metrics_port = free_port()
    counted = Winkr(bench, workdir, metrics_port, wrapper=HERE / "counted_server.py")
    counted.env["WINKR_COUNT_DIR"] = str(workdir)
    if args.quiet:
        wait_for_quiet(args.quiet, args.patience)
    with counted.running() as pid:
        counted.prepare(shape, pairs, warm)
        loadgen = start_loadgen(bench, counted, pid, lg_args, f"count/{shape}")
        sends = 'winkr_events_received_total{event="message:send"}'
        deadline = time.monotonic() + 120
        while scrape(metrics_port).get(sends, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(args.warmup)
        before, steps_before = scrape(metrics_port), dump_steps(pid, workdir, 1)
        time.sleep(max(1.0, args.duration - 2))
        after, steps_after = scrape(metrics_port), dump_steps(pid, workdir, 2)
        loadgen.communicate(timeout=timeout)
    messages = after.get(sends, 0) - before.get(sends, 0)
    per_message = {k: round((after[k] - before.get(k, 0.0)) / messages, 3) for k in sorted(after)
                   if k.startswith("winkr_") and "bucket" not in k and after[k] - before.get(k, 0.0)}
    steps = {k: round((v - steps_before.get(k, 0)) / messages, 3) for k, v in steps_after.items()
             if v - steps_before.get(k, 0)}
    counts = {"messages": messages, "per_message": per_message,
              "task_steps_per_message": dict(sorted(steps.items(), key=lambda kv: -kv[1])),
              "task_steps_per_message_total": round(sum(steps.values()), 2)}
    (out_dir / f"{shape}.counts.json").write_text(json.dumps(counts, indent=1))
    print(json.dumps({"counts": str(out_dir / f"{shape}.counts.json"),
                      "task_steps_per_message": counts["task_steps_per_message_total"]}))


def start_loadgen(bench: Path, target: Target, pid: int, lg_args: list[str], label: str) -> subprocess.Popen[str]:
    argv = [sys.executable, str(bench / "loadgen.py"), *lg_args, "--url", target.url(), "--server-pid", str(pid),
            "--label", label, *target.adapter_args()]
    return subprocess.Popen(pinned(LOAD_CPU, argv), env=target.env, stdout=subprocess.PIPE, text=True)


def dump_steps(pid: int, workdir: Path, n: int, timeout: float = 30.0) -> dict[str, int]:
    """Ask counted_server.py for its task-step counts so far (SIGUSR1) and read them."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not (workdir / f"done-{n}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("counted_server.py did not write its counts")
        time.sleep(0.05)
    steps: dict[str, int] = json.loads((workdir / f"steps-{n}.json").read_text())
    return steps


# --- main ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--repeats", type=int, default=2, help="runs of each shape and target (alternating), ≥ 2")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--realistic-pairs", type=int, default=500)
    ap.add_argument("--realistic-rate", type=int, default=1000)
    ap.add_argument("--idle-conns", type=int, default=2000)
    ap.add_argument("--shared", help="the folder with loadgen.py, relay_trio.py, winkr_adapter.py "
                                     "(default: ../shared/bench beside the checkout)")
    ap.add_argument("--quiet", type=float, default=10.0,
                    help="before each run, wait until CPU pressure (/proc/pressure/cpu avg10) is at most this "
                         "%% (0: do not wait)")
    ap.add_argument("--patience", type=float, default=120.0, help="longest wait for --quiet, seconds")
    ap.add_argument("--out", default="", help="append every run's JSON line to this file")
    ap.add_argument("--summarize", metavar="JSONL", help="only print the tables of a previous --out file")
    ap.add_argument("--profile", choices=SHAPES, help="instead of measuring: one winkr run under py-spy")
    ap.add_argument("--profile-dir", default="bench-profile")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--nonblocking", action="store_true",
                    help="py-spy does not pause the server per sample (less intrusive; idle threads are "
                         "then told apart less reliably)")
    args = ap.parse_args()
    if args.summarize:
        print(summarize([json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line]))
        return
    require("run.py", ["picows", "uvloop", "orjson", "socketio", "uvicorn", "websockets", "jwt", "winkr"],
            extra="bench")
    shapes = [s for s in args.shapes.split(",") if s]
    targets = [t for t in args.targets.split(",") if t]
    if not set(shapes) <= set(SHAPES) or not set(targets) <= set(TARGETS):
        ap.error(f"shapes are {', '.join(SHAPES)}; targets are {', '.join(TARGETS)}")
    if args.repeats < 1 or args.duration + args.warmup > 120:
        ap.error("--repeats ≥ 1 and warm-up + duration ≤ 120 s")
    bench = find_shared_bench(args.shared)
    with tempfile.TemporaryDirectory(prefix="winkr-bench-") as tmp:
        workdir = Path(tmp)
        if args.profile:
            profile(args, bench, workdir, args.profile)
            return
        records: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            order = targets if repeat % 2 == 0 else targets[::-1]
            for shape in shapes:
                for target in order:
                    pressure = wait_for_quiet(args.quiet, args.patience) if args.quiet else None
                    try:
                        record = run_one(args, bench, workdir, shape, target, repeat)
                        record["cpu_pressure_before"] = pressure
                    except (RuntimeError, subprocess.SubprocessError) as exc:
                        print(f"run.py: {shape}/{target}/{repeat} failed: {exc}", file=sys.stderr)
                        continue
                    records.append(record)
                    line = json.dumps(record)
                    print(json.dumps({"shape": shape, "target": target, "repeat": repeat,
                                      **figures(shape, record["result"]), "loadavg": record["loadavg"],
                                      "cpu_pressure": [pressure, record["cpu_pressure_after"]]}),
                          flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(line + "\n")
        print(summarize(records))


if __name__ == "__main__":
    main()
