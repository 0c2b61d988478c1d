#!/usr/bin/env python3
"""Where the server's CPU goes, from a py-spy raw profile (``run.py --profile SHAPE``): the
share of active samples by area, in µs per delivered message, and the inclusive share of the
send path's functions.

    python scripts/bench/profile_summary.py bench-profile/realistic.raw.txt \\
        [--loadgen bench-profile/realistic.loadgen.json] [--top 25]

Each sample is one thread's stack (py-spy ``--format raw --threads``); it is put in the area of
its innermost frame that belongs to a known package or module (a frame of the standard library
counts for its caller, so ``json/decoder.py`` under ``jwt`` is authentication). Threads: the
trio thread, the store writer's worker thread (SQLite) and the checkpointer's. µs per message
= share × the server's CPU time in the window / messages delivered (from loadgen's JSON line).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")

# (area, path prefixes): the first match of a frame's file wins.
AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("wsproto framing", ("wsproto/",)),
    ("trio-websocket", ("trio_websocket/",)),
    ("handshake (h11, JWT)", ("h11/", "jwt/", "cryptography/", "winkr/auth.py", "winkr/plain_http.py")),
    ("thread hop (trio side)", ("trio/_threads.py", "trio/_core/_thread_cache.py")),
    ("channels (actor inboxes)", ("trio/_channel.py",)),
    ("trio events, locks", ("trio/_sync.py", "trio/_core/_parking_lot.py")),
    ("socket I/O", ("trio/_socket.py", "trio/_highlevel_socket.py", "socket.py", "selectors.py")),
    ("epoll", ("trio/_core/_io_epoll.py", "trio/_core/_generated_io_epoll.py")),
    ("trio run loop, task switches, cancel scopes", ("trio/", "outcome/", "<attrs generated methods trio.",
                                                     "<attrs generated methods outcome.", "sniffio/")),
    ("logging, metrics", ("prometheus_client/", "logging/", "winkr/metrics.py", "winkr/logs.py")),
    ("policy (content, PII)", ("winkr/policy/", "phonenumbers/", "confusable_homoglyphs/", "winkr/ratelimit.py")),
    ("JSON (codec: envelope parse, frame encode)", ("winkr/protocol/codec.py",)),
    ("request validation (cattrs)", ("winkr/protocol/requests.py", "<cattrs generated", "cattrs/")),
    ("frame building (wire objects, timestamps)", ("winkr/protocol/wire.py", "winkr/clock.py")),
    ("presence, receipts", ("winkr/presence.py", "winkr/handlers/catchup.py")),
    ("room, send handler", ("winkr/room.py", "winkr/handlers/", "winkr/hub.py")),
    ("connection reader, writer, outbox", ("winkr/connection.py", "winkr/outbox.py", "winkr/peer.py",
                                           "winkr/transport.py", "winkr/server.py")),
    ("store writer (trio side)", ("winkr/store/writer.py",)),
    ("actor plumbing (replies, frames, drain)", ("winkr/actor.py", "<attrs generated methods winkr.")),
    ("store: SQL (execute)", ("winkr/store/store.py", "winkr/records.py", "winkr/ids.py")),
]
WORKER_ONLY = {"store: SQL (execute)"}
INCLUSIVE = [
    ("connection reader: handle_frame (decode → budget → validate → prepare → room inbox)",
     "winkr/connection.py", "Connection.handle_frame"),
    ("  prepare_send (limits, content policy)", "winkr/handlers/messages.py", "prepare_send"),
    ("  hand-off to the room (_to_room)", "winkr/connection.py", "Connection._to_room"),
    ("trio-websocket reader task (socket read, wsproto parse)", "trio_websocket/_impl.py",
     "WebSocketConnection._reader_task"),
    ("outbox writer (_write_outbox)", "winkr/connection.py", "Connection._write_outbox"),
    ("  send_frames (wsproto encode + send_all)", "winkr/transport.py", "send_frames"),
    ("room task (run_room)", "winkr/room.py", "run_room"),
    ("  send_run (authorize, store call, fan-out)", "winkr/handlers/messages.py", "send_run"),
    ("    _fan_out (frames: ack + peer)", "winkr/handlers/messages.py", "_fan_out"),
    ("presence task (run_presence)", "winkr/presence.py", "run_presence"),
    ("  _published (receipts, unread)", "winkr/presence.py", "_Presence._published"),
    ("store writer task, trio side (run_store_writer)", "winkr/store/writer.py", "run_store_writer"),
    ("store writer thread: _run_batch", "winkr/store/writer.py", "_run_batch"),
    ("  insert_messages", "winkr/store/store.py", "Store.insert_messages"),
    ("    record_delivered_to (delivery rows)", "winkr/store/store.py", "Store.record_delivered_to"),
    ("  _take_seq (conversation counter)", "winkr/store/store.py", "Store._take_seq"),
    ("checkpointer", "winkr/store/checkpointer.py", ""),
]


def parse(path: Path) -> list[tuple[str, list[tuple[str, str, int]], int]]:
    """[(thread label, [(func, file, line)] root first, count)]."""
    samples = []
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = parts[0]
        frames = []
        for part in parts[1:]:
            m = FRAME.match(part)
            if m:
                frames.append((m["func"], _short(m["file"]), int(m["line"])))
            else:
                frames.append((part, "", 0))
        samples.append((thread, frames, int(count)))
    return samples


def _short(file: str) -> str:
    for marker in ("site-packages/", "/winkr/", "/trio/"):
        i = file.find(marker)
        if i >= 0:
            return file[i + len("site-packages/"):] if marker == "site-packages/" else file[i + 1:]
    return file


def idle(frames: list[tuple[str, str, int]]) -> bool:
    """A blocked thread that py-spy reported as active: a trio worker thread waiting for a job
    (a lock's ``acquire`` with a timeout), an HTTP server thread (the metrics endpoint) in
    ``select``, the trio thread in ``epoll.poll``."""
    if not frames:
        return True
    func, file, line = frames[-1]
    text = _line_of(file, line)
    if file == "trio/_core/_thread_cache.py" and ".acquire(" in text:
        return True
    if file == "selectors.py" and any(f == "socketserver.py" for _, f, _ in frames):
        return True
    return file == "trio/_core/_io_epoll.py" and func.endswith("get_events")


def _line_of(file: str, line: int) -> str:
    """A line of an installed module's source (for the idle checks)."""
    import linecache
    import sysconfig

    for base in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]):
        text = linecache.getline(f"{base}/{file}", line)
        if text:
            return text
    return ""


def thread_kind(thread: str, frames: list[tuple[str, str, int]]) -> str:
    if thread.endswith("MainThread"):  # trio runs on the main thread (the stack may be cut short)
        return "trio thread"
    files = {f for _, f, _ in frames}
    funcs = {fn for fn, _, _ in frames}
    if "winkr/store/checkpointer.py" in files:
        return "checkpointer thread"
    if "_run_batch" in funcs:
        return "store writer thread"
    if any(f.startswith("trio/_core/_run.py") for f in files) or "run" in funcs and "winkr/cli.py" in files:
        return "trio thread"
    if "trio/_core/_thread_cache.py" in files:
        return "worker threads (idle or hop)"
    return "other threads"


def area(frames: list[tuple[str, str, int]], kind: str) -> str:
    if kind == "store writer thread":
        return _sqlite_area(frames)
    if kind == "checkpointer thread":
        return "SQLite: WAL checkpoint (checkpointer thread)"
    if kind == "worker threads (idle or hop)":
        return "thread hop (worker side)"
    for func, file, _line in reversed(frames):
        for name, prefixes in AREAS:
            if name in WORKER_ONLY:
                continue
            if file.startswith(prefixes) or func.startswith(prefixes):
                return name
    return "other (stdlib at the root)"


def _sqlite_area(frames: list[tuple[str, str, int]]) -> str:
    """The store writer's thread: BEGIN/savepoints/COMMIT of ``_run_batch`` by its source line,
    the work of the requests by store function."""
    for i in range(len(frames) - 1, -1, -1):
        func, file, line = frames[i]
        if file == "winkr/store/writer.py" and func == "_run_batch":
            text = _line(file, line)
            for word, label in (("COMMIT", "SQLite: COMMIT"), ("BEGIN", "SQLite: BEGIN"),
                                ("SAVEPOINT", "SQLite: savepoints"), ("RELEASE", "SQLite: savepoints"),
                                ("ROLLBACK", "SQLite: savepoints")):
                if word in text:
                    return label
            inner = [fn for fn, f, _ in frames[i + 1:] if f == "winkr/store/store.py"]
            return f"SQLite: {inner[0] if inner else 'request work'}"
    return "thread hop (worker side)"


def _line(file: str, line: int) -> str:
    try:
        return (ROOT / file).read_text().splitlines()[line - 1]
    except (OSError, IndexError):
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw")
    ap.add_argument("--loadgen", help="loadgen's JSON line of the profiled run (default: beside the profile)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    raw = Path(args.raw)
    samples = parse(raw)
    loadgen_path = Path(args.loadgen) if args.loadgen else raw.with_name(raw.name.replace(".raw.txt", ".loadgen.json"))
    us_per_msg = None
    if loadgen_path.is_file():
        lg = json.loads(loadgen_path.read_text())
        if lg.get("server_cpu_pct") and lg.get("delivered_per_s"):
            us_per_msg = lg["server_cpu_pct"] / 100 * 1e6 / lg["delivered_per_s"]
            print(f"server CPU {lg['server_cpu_pct']} % at {lg['delivered_per_s']} msgs/s delivered: "
                  f"{us_per_msg:.0f} µs of CPU per message (p50 {lg['lat_us']['p50'] / 1000:.2f} ms, "
                  f"p99 {lg['lat_us']['p99'] / 1000:.2f} ms)")
    kinds: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    idle_samples = 0
    for thread, frames, count in samples:
        if idle(frames):
            idle_samples += count
            continue
        kind = thread_kind(thread, frames)
        kinds[kind] += count
        areas[area(frames, kind)] += count
        seen = set()
        for label, file, func in INCLUSIVE:
            if any(f == file and (not func or fn == func) for fn, f, _ in frames) and label not in seen:
                inclusive[label] += count
                seen.add(label)
    total = sum(kinds.values())
    print(f"{total} active samples ({idle_samples} more of blocked threads left out)")

    def row(n: int) -> str:
        share = 100 * n / total
        us = f"{share / 100 * us_per_msg:7.0f} µs" if us_per_msg else ""
        return f"{share:6.1f} % {us}"

    print("\nby thread:")
    for name, n in kinds.most_common():
        print(f"  {row(n)}  {name}")
    print("\nby area (exclusive: each sample once):")
    for name, n in areas.most_common(args.top):
        print(f"  {row(n)}  {name}")
    print("\ninclusive (a function and everything it calls):")
    for label, _, _ in INCLUSIVE:
        print(f"  {row(inclusive[label])}  {label}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "samples": total, "us_per_msg": us_per_msg,
            "threads": {k: v / total for k, v in kinds.items()},
            "areas": {k: v / total for k, v in areas.items()},
            "inclusive": {k: inclusive[k] / total for k, _, _ in INCLUSIVE}}, indent=1))


if __name__ == "__main__":
    main()
