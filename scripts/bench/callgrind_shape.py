#!/usr/bin/env python3
"""Instructions per message in the realistic or the saturation shape, counted by callgrind
(issue 10): a figure for one change's saving that the shared machine's noise does not move
(CPU time per message swings ±10 % with what else runs; instruction counts move a few %).

winkr runs under ``valgrind --tool=callgrind`` with instrumentation off; the shared load
generator drives either quiet pairs (the default, realistic: each message alone in its room,
at a rate the slowed-down server keeps up with, well below its capacity) or, with
``--window W``, a closed loop of ``W`` messages in flight per sender (saturation: every room's
run batches up to ``W`` sends, as in the ``saturation`` shape; the slowed-down server is
saturated too, so the batching matches the real shape's); once messages flow,
instrumentation (and so counting) is switched on for `--seconds` (``callgrind_control -i on``),
then off, and the counts dumped. Messages in the window come from the metrics endpoint
(``message:send`` events received). Every thread of the server is counted (the store
writer's too). Loopback only; bounded in time; the server is stopped by
its PID.

    .venv/bin/python scripts/bench/callgrind_shape.py [--pairs 50] [--rate 4] [--seconds 20]
    .venv/bin/python scripts/bench/callgrind_shape.py --pairs 100 --window 32 [--seconds 20]
    ... --keep DIR      # keep the dump for callgrind_annotate (DIR/callgrind.out.N)

Prints one JSON line: instructions (Ir) in the counted seconds, messages, Ir per message.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench_run  # noqa: E402  # the side-by-side runner's targets and helpers

SENDS = 'winkr_events_received_total{event="message:send"}'
BATCHING = {"commits": "winkr_store_commit_seconds_count", "writes": "winkr_outbox_frames_per_write_count",
            "fanned_out": "winkr_message_fanout_seconds_count"}
SCRAPE_TIMEOUT = 60.0  # a server under callgrind on a busy machine can take its time to answer


class CallgrindWinkr(bench_run.Winkr):
    def __init__(self, bench: Path, workdir: Path, metrics_port: int, threads: bool = False) -> None:
        super().__init__(bench, workdir, metrics_port)
        self.out = workdir / "callgrind.out"
        self.threads = threads

    def server_argv(self) -> list[str]:
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.out}",
                *(["--separate-threads=yes"] if self.threads else []), *super().server_argv()]


def total_ir(path: Path) -> int:
    """The dump's ``totals:`` line (its ``summary:`` line counts since the last zeroing, which
    with instrumentation toggled reads 0)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--rate", type=float, default=4.0, help="messages per second in all (realistic)")
    ap.add_argument("--window", type=int, default=0,
                    help="closed loop: messages in flight per sender (saturation: --pairs 100 --window 32)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds counted")
    ap.add_argument("--threads", action="store_true",
                    help="one dump per thread; prints each thread's Ir per message too (main: the trio thread)")
    ap.add_argument("--keep", default=None, help="copy the dump into this folder (for callgrind_annotate)")
    ap.add_argument("--shared", default=None)
    args = ap.parse_args()
    bench = bench_run.find_shared_bench(args.shared)
    with tempfile.TemporaryDirectory(prefix="winkr-callgrind-") as tmp:
        workdir = Path(tmp)
        port = bench_run.free_port()
        target = CallgrindWinkr(bench, workdir, port, args.threads)
        bench_run.START_TIMEOUT = 120.0
        with target.running() as pid:
            target.prepare("saturation" if args.window else "realistic", args.pairs, 0)
            load = ["--window", str(args.window)] if args.window else ["--rate", str(args.rate)]
            lg_args = ["pairs", "--pairs", str(args.pairs), *load, "--warmup", "2",
                       "--duration", str(args.seconds + 30)]
            loadgen = bench_run.start_loadgen(bench, target, pid, lg_args, "callgrind")
            deadline = time.monotonic() + 300
            while bench_run.scrape(port, SCRAPE_TIMEOUT).get(SENDS, 0) == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("no messages within 300 s")
                time.sleep(0.5)
            time.sleep(3.0)  # past the first messages' one-off costs (caches, room start-up)
            scraped_before = bench_run.scrape(port, SCRAPE_TIMEOUT)
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
            time.sleep(args.seconds)
            subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
            scraped_after = bench_run.scrape(port, SCRAPE_TIMEOUT)
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
            loadgen.kill()
            loadgen.wait()
        # The dump asked for is callgrind.out.1 (callgrind.out.1-NN per thread with --threads).
        dumps = sorted(p for p in workdir.glob("callgrind.out.1*") if re.search(r"\.1(-\d+)?$", p.name))
        per_dump = {p.name: total_ir(p) for p in dumps}
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for p in dumps:
                shutil.copy(p, Path(args.keep) / p.name)
    messages = scraped_after.get(SENDS, 0) - scraped_before.get(SENDS, 0)
    # How much the window batched (a closed loop batches more when the load generator keeps up):
    # Ir per message moves with these, so a comparison needs them alike. ``fanned_out`` is the
    # messages the rooms finished in the window per message read in it: in a closed loop up to
    # pairs x window messages are in flight, so the two can differ by what queued meanwhile.
    batching = {name: round((scraped_after.get(series, 0) - scraped_before.get(series, 0)) / messages, 3)
                for name, series in BATCHING.items()}
    instructions = sum(per_dump.values())
    load_shape = {"window": args.window} if args.window else {"rate": args.rate}
    threads = {"threads": {name.rpartition("-")[2]: round(ir / messages) for name, ir in per_dump.items()
                           if ir}} if args.threads else {}
    print(json.dumps({"pairs": args.pairs, **load_shape, "seconds": args.seconds, "messages": messages,
                      "instructions": instructions, "ir_per_message": round(instructions / messages), **threads,
                      "per_message": batching}))


if __name__ == "__main__":
    main()
