#!/usr/bin/env python3
"""crashtest.py - kill -9 crash harness for winkr (issue 5).

Starts `python -m winkr serve --port 0` on a fresh SQLite file (temp directory) with every
rate limit switched off and a generated WINKR_JWT_SECRET, drives a load against it with
WebSocket clients (users in pairs, one conversation per pair; both members send text
messages with a unique client_message_id, now and then mark the peer's messages read), and
`kill -9`s the server after a random delay. It restarts the server on the same database
(new port), the clients reconnect, re-send what was not acknowledged (same
client_message_id) and carry on; this repeats for --cycles cycles, bounded by --max-seconds
and --max-messages.

With --database-url postgresql://... it runs the same on PostgreSQL instead, in a schema of
its own (crashtest_<random>, dropped afterwards unless --keep) of that database.

Afterwards it opens the SQLite file read-only (or the PostgreSQL schema) and checks:
  * every acknowledged message (message:new carrying the sender's ref) is stored exactly
    once, at the acknowledged (conversation_id, seq), with its client_message_id and content;
  * per conversation, seq is 1..max with no gaps and no repeats;
  * no two messages share (conversation, sender, client_message_id);
  * every participants.last_read_seq <= the conversation's max seq, and is >= every read
    position the server acknowledged (message:viewed with ref);
  * PRAGMA integrity_check is "ok" and PRAGMA foreign_key_check finds nothing (SQLite;
    PostgreSQL enforces foreign keys itself).

Prints one totals line on stderr and one JSON line on stdout. Exit status 1 on any loss,
duplicate, gap, read regression, integrity failure or when nothing was acknowledged at all;
0 otherwise; 2 for bad arguments. Loopback only; the server process it started is always
killed (by PID) before it exits.

Examples
    python scripts/crashtest.py                              # 20 cycles, 20 users
    python scripts/crashtest.py --cycles 3 --users 10 --max-seconds 60
    python scripts/crashtest.py --cycles 100 --max-seconds 1800 --keep
    python scripts/crashtest.py --cycles 5 --database-url postgresql://127.0.0.1:5432/test
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python scripts/crashtest.py`: the checkout's root, so that `scripts` imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import (
    SMALL_TALK,
    RunningServer,
    encode_letters,
    kill,
    limits_off_toml,
    mint,
    server_environment,
    start_server,
)

REQUEST_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------
class ServerProcess:
    """`winkr serve` on one database and config, started again after each kill -9."""

    def __init__(self, workdir: Path, db: Path, config: Path, secret: str, database_url: str | None = None) -> None:
        self.db, self.config = db, config
        # --db too with PostgreSQL: the run file (and a generated secret) go beside it, in workdir
        self.database = ["--db", str(db), *(["--database-url", database_url] if database_url else [])]
        self.log_path = workdir / "server.log"
        self.env = server_environment(secret)
        self.running: RunningServer | None = None

    def start(self) -> str:
        """Start it (a new port each time); its URL once it listens."""
        assert self.running is None or self.running.proc.poll() is not None
        with open(self.log_path, "a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n")
        self.running = start_server([*self.database, "--config", str(self.config)], env=self.env,
                                    log=self.log_path)
        return self.running.url

    def kill(self) -> None:
        """SIGKILL the process this object started last (by its PID) and reap it."""
        if self.running is not None:
            kill(self.running.proc)


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------
class Run:
    """State shared by all clients, across cycles."""

    def __init__(self, args: argparse.Namespace, secret: str) -> None:
        self.args = args
        self.run_id = secrets.token_hex(3)
        self.rng = random.Random(args.seed)
        self.users = [f"ct{i}" for i in range(args.users)]
        self.tokens = {u: mint(secret, u, int(args.max_seconds) + 3600) for u in self.users}
        self.pair_conv: dict[int, str] = {}  # pair index -> conversation id
        self.sent = 0
        self.resent = 0
        # acknowledgements: (conversation_id, seq, cmid, sender, content), as received
        self.acks: list[tuple[str, int, str, str, str]] = []
        self.bad_acks: list[str] = []  # acks whose id/cmid did not match
        self.read_acks: dict[tuple[str, str], int] = {}  # (conv, user) -> highest acked read seq
        self.errors: Counter[str] = Counter()
        self.conv_conflicts = 0

    def budget_left(self) -> bool:
        return self.sent < self.args.max_messages


class Client:
    def __init__(self, run: Run, index: int) -> None:
        self.run = run
        self.uid = run.users[index]
        self.pair = index // 2
        self.peer = run.users[index ^ 1]
        self.counter = 0
        self.pending: dict[str, dict[str, Any]] = {}  # cmid -> message:send data (unacked)
        self.inflight: set[str] = set()  # cmids sent on the current connection
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.reads: dict[str, int] = {}  # read ref -> seq
        self.nreq = 0
        self.ws: Any = None
        self.wake: asyncio.Event | None = None

    async def session(self, url: str, stop: asyncio.Event) -> None:
        """One connection: create/join the pair's conversation, re-send, send until it drops."""
        from websockets.asyncio.client import connect

        try:
            self.ws = await connect(
                url, additional_headers={"Authorization": f"Bearer {self.run.tokens[self.uid]}"},
                compression=None, ping_interval=None, open_timeout=REQUEST_TIMEOUT_S,
                close_timeout=1, max_size=2 ** 22, proxy=None)
        except Exception:  # noqa: BLE001 - the server may already be dead
            self.run.errors["connect_failed"] += 1
            return
        self.inflight.clear()
        self.wake = asyncio.Event()  # one per session: every cycle runs its own event loop
        reader = asyncio.create_task(self.read_loop())
        try:
            conv = await self.conversation()
            if conv is None:
                return
            await self.request("conversation:join", {"conversation_id": conv})
            for cmid, data in list(self.pending.items()):  # unacknowledged: same cmid again
                self.run.resent += 1
                await self.send(cmid, data)
            while not stop.is_set() and not reader.done():
                if len(self.inflight) >= self.run.args.window or not self.run.budget_left():
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), 0.5)
                    except TimeoutError:
                        pass
                    continue
                self.counter += 1
                cmid = f"{self.run.run_id}.{self.uid}.{self.counter}"
                content = (f"{encode_letters(self.counter)} {encode_letters(int(self.uid[2:]))} "
                           f"{self.run.rng.choice(SMALL_TALK)}")
                data = {"conversation_id": conv, "content": content, "type": "text",
                        "metadata": {}, "client_message_id": cmid}
                self.pending[cmid] = data
                self.run.sent += 1
                await self.send(cmid, data)
        except Exception:  # noqa: BLE001 - connection lost (the kill): the normal end
            pass
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            try:
                await asyncio.wait_for(self.ws.close(), 1)
            except Exception:  # noqa: BLE001
                pass
            for fut in self.waiters.values():
                if not fut.done():
                    fut.cancel()
            self.waiters.clear()

    async def send(self, cmid: str, data: dict[str, Any]) -> None:
        self.inflight.add(cmid)
        await self.ws.send(json.dumps({"event": "message:send", "ref": cmid, "data": data}))

    async def conversation(self) -> str | None:
        conv = self.run.pair_conv.get(self.pair)
        if conv is not None:
            return conv
        reply = await self.request("conversation:create", {"participant_ids": [self.peer]})
        conv = reply["data"]["conversation"]["id"]
        known = self.run.pair_conv.setdefault(self.pair, conv)
        if known != conv:
            self.run.conv_conflicts += 1
        return known

    async def request(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        self.nreq += 1
        ref = f"q{self.nreq}"
        fut = asyncio.get_running_loop().create_future()
        self.waiters[ref] = fut
        await self.ws.send(json.dumps({"event": event, "ref": ref, "data": data}))
        try:
            return await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
        finally:
            self.waiters.pop(ref, None)

    async def read_loop(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            event, ref, data = msg.get("event"), msg.get("ref"), msg.get("data") or {}
            if event == "message:new":
                await self.on_message(data.get("message") or {}, ref)
            elif event == "error":
                self.run.errors[str(data.get("code"))] += 1
                if ref in self.pending:  # refused: not stored, nothing to check
                    self.pending.pop(ref, None)
                    self.inflight.discard(ref)
                    self.wake.set()
                elif ref in self.waiters and not self.waiters[ref].done():
                    self.waiters[ref].set_exception(RuntimeError(str(data.get("code"))))
            elif event == "message:viewed" and ref in self.reads:
                seq = self.reads.pop(ref)
                key = (data.get("conversation_id") or self.run.pair_conv[self.pair], self.uid)
                if seq > self.run.read_acks.get(key, 0):
                    self.run.read_acks[key] = seq
            elif ref in self.waiters and not self.waiters[ref].done():
                self.waiters[ref].set_result(msg)

    async def on_message(self, m: dict[str, Any], ref: Any) -> None:
        if ref is not None:  # the acknowledgement of our message:send
            data = self.pending.pop(ref, None)
            self.inflight.discard(ref)
            self.wake.set()
            if data is None:
                self.run.bad_acks.append(f"{self.uid}: unexpected ack ref {ref!r}")
                return
            conv, seq, cmid = m.get("conversation_id"), m.get("seq"), m.get("client_message_id")
            if (cmid != ref or conv != data["conversation_id"] or type(seq) is not int
                    or m.get("id") != f"{conv}.{seq}"):
                self.run.bad_acks.append(f"{self.uid}: ack {ref!r} -> {m!r:.300}")
            self.run.acks.append((str(conv), seq if type(seq) is int else -1, str(ref),
                                  self.uid, data["content"]))
            return
        if m.get("sender_id") != self.uid and type(m.get("seq")) is int \
                and self.run.rng.random() < 0.2:
            self.nreq += 1
            rref = f"r{self.nreq}"
            self.reads[rref] = m["seq"]
            await self.ws.send(json.dumps({"event": "message:read", "ref": rref, "data": {
                "conversation_id": m.get("conversation_id"), "message_id": m.get("id")}}))


async def cycle(run: Run, clients: list[Client], url: str, server: ServerProcess,
                delay: float) -> None:
    """Clients connect and send; after `delay` seconds the server gets SIGKILL."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.session(url, stop)) for c in clients]
    await asyncio.sleep(delay)
    server.kill()  # kill -9, by PID
    stop.set()
    done, not_done = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5)
    for t in not_done:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def open_readonly(db: Path, scratch: Path) -> tuple[sqlite3.Connection, str]:
    """The database read-only; if SQLite cannot read it that way (a WAL left by a kill that
    needs recovery), a copy of the database and its WAL in `scratch`."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        con.execute("SELECT count(*) FROM messages").fetchone()
        return con, "read-only"
    except sqlite3.Error:
        for suffix in ("", "-wal"):
            src = Path(str(db) + suffix)
            if src.exists():
                shutil.copy2(src, scratch / (db.name + suffix))
        return sqlite3.connect(str(scratch / db.name)), "copy"


_ROWS_SQL = "SELECT conversation_id, seq, sender_id, client_message_id, content FROM messages"
_READS_SQL = ("SELECT p.conversation_id, p.user_id, p.last_read_seq, "
              "(SELECT MAX(seq) FROM messages m WHERE m.conversation_id = p.conversation_id) "
              "FROM participants p")


def read_back(db: Path, scratch: Path, database_url: str | None) -> tuple[str, list[str], list[Any], list[Any],
                                                                      list[Any]]:
    """(how it was opened, integrity lines, foreign-key violations, message rows, read positions)."""
    if database_url:
        import psycopg

        with psycopg.connect(database_url, autocommit=True) as pg:
            return ("postgresql", ["ok"], [], pg.execute(_ROWS_SQL).fetchall(), pg.execute(_READS_SQL).fetchall())
    con, opened = open_readonly(db, scratch)
    try:
        integrity = [r[0] for r in con.execute("PRAGMA integrity_check")]
        fk = con.execute("PRAGMA foreign_key_check").fetchall()
        return opened, integrity, fk, con.execute(_ROWS_SQL).fetchall(), con.execute(_READS_SQL).fetchall()
    finally:
        con.close()


def verify(run: Run, db: Path, scratch: Path, database_url: str | None = None) -> dict[str, Any]:
    opened, integrity, fk, rows, reads = read_back(db, scratch, database_url)

    by_key = {(c, s): (sender, cmid, content) for c, s, sender, cmid, content in rows}
    seqs: dict[str, list[int]] = defaultdict(list)
    for c, s, *_rest in rows:
        seqs[c].append(s)
    gaps = repeats = 0
    for ss in seqs.values():
        distinct = set(ss)
        repeats += len(ss) - len(distinct)
        gaps += max(ss) - len(distinct) + sum(1 for s in distinct if s < 1)

    cmid_counts = Counter((c, sender, cmid) for c, _, sender, cmid, _ in rows if cmid is not None)
    duplicated = sum(n - 1 for n in cmid_counts.values() if n > 1)

    lost, corrupted, samples = 0, 0, []
    acked_seqs: dict[tuple[str, str], set[int]] = defaultdict(set)
    for conv, seq, cmid, sender, content in run.acks:
        acked_seqs[(conv, cmid)].add(seq)
        stored = by_key.get((conv, seq))
        if stored is None or stored[0] != sender or stored[1] != cmid:
            lost += 1
            if len(samples) < 10:
                samples.append(f"lost: {conv}.{seq} cmid {cmid} (stored: {stored!r:.120})")
        elif stored[2] != content:
            corrupted += 1
            if len(samples) < 10:
                samples.append(f"content differs: {conv}.{seq} {stored[2]!r:.60} != {content!r:.60}")
    # one message acknowledged at two different seqs
    acked_twice = sum(len(s) - 1 for s in acked_seqs.values() if len(s) > 1)

    read_over = sum(1 for _, _, last, mx in reads if last > (mx or 0))
    stored_reads = {(c, u): last for c, u, last, _ in reads}
    read_lost = sum(1 for k, seq in run.read_acks.items() if stored_reads.get(k, 0) < seq)
    if read_over or read_lost:
        samples.append(f"read positions: {read_over} beyond max seq, {read_lost} acknowledged "
                       "reads rolled back")

    return {
        "db_opened": opened, "stored": len(rows), "conversations": len(seqs), "lost": lost, "duplicated": duplicated,
        "gaps": gaps, "seq_repeats": repeats, "acked_at_two_seqs": acked_twice, "corrupted": corrupted,
        "read_beyond_max": read_over, "reads_acknowledged": len(run.read_acks),
        "reads_rolled_back": read_lost,
        "unacknowledged_stored": max(0, len(rows) - len({(c, s) for c, s, *_ in run.acks})),
        "integrity": "ok" if integrity == ["ok"] and not fk else "; ".join(integrity[:5]) +
        (f"; {len(fk)} foreign key violations" if fk else ""),
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="crashtest.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20, help="kill -9 / restart cycles (default 20)")
    ap.add_argument("--users", type=int, default=20, help="users, in pairs (even, default 20)")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="bound on the whole run; fewer cycles if reached (default 300)")
    ap.add_argument("--max-messages", type=int, default=200_000,
                    help="stop sending new messages after this many (default 200000)")
    ap.add_argument("--min-delay", type=float, default=0.3,
                    help="seconds after the server listens before the earliest kill (default 0.3)")
    ap.add_argument("--max-delay", type=float, default=2.5,
                    help="seconds after the server listens before the latest kill (default 2.5)")
    ap.add_argument("--window", type=int, default=8,
                    help="unacknowledged messages in flight per user (default 8)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (kill moments, reads)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (database, server log) even on success")
    ap.add_argument("--database-url", metavar="URL", default=None,
                    help="run on PostgreSQL: postgresql://... of a database in which a schema of its own "
                         "is made (needs winkr[cluster]); default a SQLite file in a temporary directory")
    return ap


def make_schema(base_url: str) -> tuple[str, str]:
    """A fresh schema in the PostgreSQL database at ``base_url``: (its name, a URL using it)."""
    from urllib.parse import quote

    import psycopg

    schema = f"crashtest_{secrets.token_hex(4)}"
    with psycopg.connect(base_url, autocommit=True) as pg:
        pg.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in base_url else "?"
    return schema, f"{base_url}{separator}options={quote(f'-c search_path={schema}')}"


def drop_schema(base_url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as pg:
        pg.execute(f"DROP SCHEMA {schema} CASCADE")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    from scripts._deps import require

    require("crashtest.py", ["websockets.asyncio.client", "jwt", "winkr.auth"])
    if args.database_url and not args.database_url.startswith(("postgresql://", "postgres://")):
        ap.error("--database-url must be a postgresql:// URL (SQLite is the default)")
    if args.database_url:
        require("crashtest.py", ["psycopg"])
    if not 1 <= args.cycles <= 10_000:
        ap.error("--cycles must be between 1 and 10000")
    if args.users < 2 or args.users % 2 or args.users > 2000:
        ap.error("--users must be even, between 2 and 2000")
    if not 0 < args.max_seconds <= 24 * 3600:
        ap.error("--max-seconds must be > 0 and <= 86400")
    if not 0 < args.min_delay <= args.max_delay <= 600:
        ap.error("need 0 < --min-delay <= --max-delay <= 600")
    if not 1 <= args.window <= 1000 or args.max_messages < 1:
        ap.error("--window must be 1..1000 and --max-messages >= 1")
    if args.seed is None:
        args.seed = secrets.randbelow(2 ** 31)

    workdir = Path(tempfile.mkdtemp(prefix="winkr-crashtest-"))
    db, cfg = workdir / "winkr.db", workdir / "winkr.toml"
    cfg.write_text(limits_off_toml())
    secret = secrets.token_urlsafe(32)
    schema, database_url = make_schema(args.database_url) if args.database_url else (None, None)
    server = ServerProcess(workdir, db, cfg, secret, database_url)
    run = Run(args, secret)
    clients = [Client(run, i) for i in range(args.users)]
    t0 = time.monotonic()
    cycles = 0
    result: dict[str, Any] = {}
    failures: list[str] = []
    try:
        while cycles < args.cycles:
            remaining = args.max_seconds - (time.monotonic() - t0)
            if remaining < args.min_delay + 2:
                break
            url = server.start()
            delay = min(run.rng.uniform(args.min_delay, args.max_delay), max(remaining - 2, 0.1))
            asyncio.run(cycle(run, clients, url, server, delay))
            cycles += 1
            print(f"cycle {cycles}: killed after {delay:.2f} s; sent {run.sent}, "
                  f"acknowledged {len(run.acks)}", file=sys.stderr, flush=True)
        server.kill()
        result = verify(run, db, workdir, database_url)
    except KeyboardInterrupt:
        failures.append("interrupted")
    except Exception as e:  # noqa: BLE001 - reported, exit 1
        failures.append(f"harness error: {type(e).__name__}: {e}")
    finally:
        server.kill()

    summary = {
        "cycles": cycles, "users": args.users, "seed": args.seed,
        "elapsed_s": round(time.monotonic() - t0, 2), "sent": run.sent, "resent": run.resent,
        "acknowledged": len(run.acks), **result,
        "bad_acks": len(run.bad_acks), "conversation_conflicts": run.conv_conflicts,
        "errors": dict(run.errors), "workdir": str(workdir),
    }
    if result:
        for key in ("lost", "duplicated", "gaps", "seq_repeats", "acked_at_two_seqs", "corrupted",
                    "read_beyond_max",
                    "reads_rolled_back"):
            if result[key]:
                failures.append(f"{key} {result[key]}")
        if result["integrity"] != "ok":
            failures.append(f"integrity: {result['integrity']}")
    if run.bad_acks:
        failures.append(f"{len(run.bad_acks)} malformed acknowledgements")
        summary.setdefault("samples", []).extend(run.bad_acks[:5])
    if run.conv_conflicts:
        failures.append(f"{run.conv_conflicts} pair conversations created twice")
    if not run.acks and not failures:
        failures.append("nothing acknowledged")
    summary["failures"] = failures
    summary["ok"] = not failures
    if failures or args.keep:
        summary["server_log"] = str(server.log_path)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        summary["workdir"] = None
    if schema is not None:
        if failures or args.keep:
            summary["schema"] = schema
        else:
            drop_schema(args.database_url, schema)

    print(f"crashtest: cycles {cycles}, acknowledged {len(run.acks)}, "
          f"lost {result.get('lost', '?')}, duplicated {result.get('duplicated', '?')}, "
          f"gaps {result.get('gaps', '?')}, integrity {result.get('integrity', '?')} -> "
          f"{'PASS' if not failures else 'FAIL: ' + ', '.join(failures)}", flush=True)
    for s in summary.get("samples", []):
        print(f"  {s}", file=sys.stderr)
    if failures and server.log_path.exists():
        print(f"  server log: {server.log_path}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
