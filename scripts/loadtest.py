#!/usr/bin/env python3
"""loadtest.py - load and correctness test for a running winkr server.

N simulated users (user ids lt1 .. ltN) chat in conversations of two (plus a share of small
groups of 3-5) through the WebSocket protocol only: each conversation is created by its first
member (conversation:create), every member joins it (conversation:join), then everybody
sends for --duration seconds, either at a fixed total rate (open loop, --rate) or as fast as
the server acknowledges (closed loop, --max, --window messages in flight per sender).
By default each step is a weighted mix of plain sends, typing:start/stop around a send,
message:read of the last received message, conversation:leave + re-join, and an occasional
reconnect that catches up with message:history {after_seq} and re-sends unacknowledged
messages with the same client_message_id (--no-mix: plain sends only).

It prints a progress bar on stderr, then a summary table on stderr and ONE JSON line on
stdout: throughput, send->ack and send->peer latency percentiles, errors by code, lost
messages (acknowledged but never received by a joined member, live or via history, after a
drain of up to --drain seconds), duplicates (a message delivered twice to one connection)
and seq errors (per-conversation seq not strictly increasing on a connection).

Several nodes of one cluster (docs/deploy.md §8): give --url once per node (or comma-separated).
The members of each conversation then connect to different nodes (member k of a conversation
to node (first member + k) mod N), every reconnect goes back to the member's node, and the
summary adds the cross-node send->peer latency (sender and receiver on different nodes).
Exit status 1 when the run found a problem: a lost or duplicated message, a re-sent message
stored twice (client_message_id not idempotent), a seq error, a message never acknowledged, a
member that stayed disconnected (so delivery to it could not be checked), or nothing
acknowledged at all; 0 otherwise; 2 for bad arguments.

The server must run with its rate limits off, or the limits show up as RATE_LIMITED /
HTTP 429 errors: a config file whose [limits] table sets them to 0, as the shipped one does

    ./scripts/serve --config deploy/loadtest.toml

Tokens are HS256 JWTs minted here with the server's secret (--secret, --secret-file or
$WINKR_JWT_SECRET). Only loopback targets are accepted unless --allow-remote is given.

Examples
    export WINKR_JWT_SECRET=...            # the secret the server uses
    python scripts/loadtest.py                                     # 100 users, 100 msgs/s, 30 s
    python scripts/loadtest.py --users 1000 --rate 2000 --duration 60
    python scripts/loadtest.py --users 200 --max --window 32 --no-mix --procs 2
    python scripts/loadtest.py --url ws://127.0.0.1:9000/ws --json-only | jq .ack_per_s
    python scripts/loadtest.py --mix send=60,typing=20,read=10,rejoin=5,reconnect=5
    python scripts/loadtest.py --url ws://127.0.0.1:8081/ws --url ws://127.0.0.1:8082/ws   # two nodes

Needs: winkr with its [load] extra (websockets >= 13, rich); orjson and uvloop are used when
installed.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import multiprocessing as mp
import os
import queue
import random
import secrets
import signal
import socket
import sys
import time
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python scripts/loadtest.py`: the checkout's root, so that `scripts` imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import decode_letters, encode_letters, mint

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads

mono_ns = time.monotonic_ns

# ---------------------------------------------------------------------------------------------
# Bounds and defaults
# ---------------------------------------------------------------------------------------------
MAX_USERS = 20_000
MAX_DURATION_S = 600.0
MAX_RATE = 1_000_000.0
MAX_WINDOW = 1024
MAX_GROUP = 10  # the server's default max_participants
MAX_PROCS = 64
MAX_DRAIN_S = 30.0
MAX_SETUP_S = 600.0
RESERVOIR_CAP = 200_000  # latency samples kept per process and kind
MAX_PENDING_PER_USER = 1024  # rate mode: unacknowledged messages per user before slots are skipped
MAX_SEQ_SPAN = 50_000_000  # seqs tracked per conversation (bytes per member)
MAX_HISTORY_PAGES = 1000
HISTORY_PAGE = 100
REQUEST_TIMEOUT_S = 10.0  # conversation:create/join/leave, message:history
CONNECT_TIMEOUT_S = 30.0
SETTLE_S = 10.0  # after sending stops: time for steps in progress (a re-join, a reconnect)
CLOSE_TIMEOUT_S = 5.0
LAG_LIMIT_NS = 1_000_000_000  # rate mode: slots later than this are skipped, not sent in a burst
RECONNECT_DELAYS_S = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)
PROGRESS_EVERY_S = 0.5
PLAIN_PROGRESS_EVERY_S = 5.0
MAX_ERROR_SAMPLES = 10  # per worker, one per error code
USER_AGENT = "winkr-loadtest/1"

DEFAULT_MIX: dict[str, float] = {
    "send": 78.0,  # message:send
    "typing": 15.0,  # typing:start, message:send, typing:stop
    "read": 5.0,  # message:read of the last received message, then message:send
    "rejoin": 1.5,  # conversation:leave, conversation:join, message:history catch-up, send
    "reconnect": 0.5,  # close, reconnect, join, catch-up, re-send unacknowledged, send
}

# Message content: '<send time> <user> <counter> <filler words>', the numbers written in letters
# (scripts/_common.py says why).
FILLERS = (
    "hey how is your day going",
    "sounds good see you later",
    "what are you up to tonight",
    "haha that is so funny",
    "want to grab a coffee this week",
    "ok talk soon",
)


def make_content(t_send_ns: int, user: int, counter: int, filler: str) -> str:
    """'<send time> <user> <counter> <filler words>', numbers letter-encoded."""
    return f"{encode_letters(t_send_ns)} {encode_letters(user)} {encode_letters(counter)} {filler}"


def parse_content(content: str) -> tuple[int, int, int]:
    """(send time ns, user, counter) from make_content's text; ValueError otherwise."""
    parts = content.split(" ", 3)
    if len(parts) < 3:
        raise ValueError("too few tokens")
    return decode_letters(parts[0]), decode_letters(parts[1]), decode_letters(parts[2])


# ---------------------------------------------------------------------------------------------
# Accounting helpers (pure; unit-tested in tests/test_loadtest_unit.py)
# ---------------------------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (0 < q <= 100) of an ascending sequence; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary_ms(samples_us: Iterable[int], max_us: int | None) -> dict[str, float | None]:
    """{p50, p95, p99, max} in milliseconds from microsecond samples; max is the exact one."""
    s = sorted(samples_us)
    if max_us is None and s:
        max_us = s[-1]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v / 1000.0, 3)

    return {"p50": ms(percentile(s, 50)), "p95": ms(percentile(s, 95)),
            "p99": ms(percentile(s, 99)), "max": ms(max_us)}


class Reservoir:
    """Uniform sample of at most `cap` integers (Algorithm R) plus the exact count and max."""

    def __init__(self, cap: int = RESERVOIR_CAP, rng: random.Random | None = None) -> None:
        self.cap = cap
        self.samples = array("q")
        self.seen = 0
        self.max: int | None = None
        self._rng = rng or random.Random()

    def add(self, value: int) -> None:
        self.seen += 1
        if self.max is None or value > self.max:
            self.max = value
        if len(self.samples) < self.cap:
            self.samples.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.cap:
                self.samples[j] = value


def merge_reservoirs(parts: Sequence[tuple[Sequence[int], int]],
                     rng: random.Random | None = None) -> list[int]:
    """Combine (samples, values seen) from several reservoirs into one equally weighted sample.

    A reservoir that saw more values than it kept stands for `seen/len` values per sample;
    every part is thinned to the largest such ratio so no process is over-represented.
    """
    rng = rng or random.Random(0)
    ratios = [seen / len(s) for s, seen in parts if len(s)]
    if not ratios:
        return []
    ratio = max(ratios)
    out: list[int] = []
    for s, seen in parts:
        if not len(s):
            continue
        keep = min(len(s), max(1, round(seen / ratio)))
        out.extend(s if keep == len(s) else rng.sample(list(s), keep))
    return out


# _WANTED[slot] maps "acked[i]" (sender slot + 1, 0 = not acknowledged) to 1 when member
# `slot` should receive message i, i.e. it was acknowledged and someone else sent it.
_WANTED = [bytes(0 if v in (0, slot + 1) else 1 for v in range(256)) for slot in range(MAX_GROUP)]

_ANY_SENDER = bytes([0] + [1] * 255)  # acked[i] -> 1 when acknowledged at all

# Ledger verdicts
OK, DUPLICATE, OUT_OF_ORDER = "ok", "duplicate", "out_of_order"
BAD_SEQ, SEQ_CONFLICT = "bad_seq", "seq_conflict"


def _grow(buf: bytearray, i: int) -> None:
    if i >= len(buf):
        buf.extend(bytes(max(i + 1 - len(buf), len(buf), 64)))


def _mark(buf: bytearray, i: int) -> bool:
    """Set buf[i] = 1 (growing buf); returns whether it was already set."""
    _grow(buf, i)
    if buf[i]:
        return True
    buf[i] = 1
    return False


# What live[slot][i] remembers about message i on the member's current connection.
_SEEN = 1  # delivered (or acknowledged) once; anything more is a duplicate
_OWN_ECHO = 2  # own message without ref, i.e. sent by this user's previous connection
_RESENT_ACK = 3  # acknowledgement of a message re-sent after a reconnect


class ConversationLedger:
    """Delivery bookkeeping of one conversation, indexed by seq relative to `base_seq` (the
    conversation's newest seq before the run; index i is seq base_seq + 1 + i).

    acked[i]       sender slot + 1 of the acknowledged message i (0: not acknowledged yet)
    got[slot][i]   1 once member `slot` received message i (live message:new or history)
    live[slot][i]  1 once message i came as message:new on the member's current connection
    """

    def __init__(self, members: int, base_seq: int = 0) -> None:
        if not 1 <= members <= MAX_GROUP:
            raise ValueError("members out of range")
        self.base = base_seq
        self.acked = bytearray()
        self.got = [bytearray() for _ in range(members)]
        self.live = [bytearray() for _ in range(members)]
        self.last_live_seq = [base_seq] * members  # on the current connection
        self.max_peer_seq = [base_seq] * members  # the catch-up cursor

    def index(self, seq: Any) -> int:
        """Index of `seq`, or -1 for a seq from before the run, out of range or not an int."""
        if type(seq) is not int:
            return -1
        i = seq - self.base - 1
        return i if 0 <= i < MAX_SEQ_SPAN else -1

    def new_connection(self, slot: int) -> None:
        self.live[slot] = bytearray()
        self.last_live_seq[slot] = self.base

    def on_ack(self, slot: int, seq: Any, resent: bool = False) -> str:
        """The sender's own message:new (with ref) for a message it sent. A message re-sent
        after a reconnect may also have reached this connection once as an own echo: its
        first copy, committed from the previous connection after this one joined."""
        i = self.index(seq)
        if i < 0:
            return BAD_SEQ
        live = self.live[slot]
        _grow(live, i)
        if live[i] == _OWN_ECHO and resent:
            live[i] = _SEEN
        elif live[i]:
            return DUPLICATE
        else:
            live[i] = _RESENT_ACK if resent else _SEEN
        _grow(self.acked, i)
        if self.acked[i]:
            return SEQ_CONFLICT  # another acknowledged message already has this seq
        self.acked[i] = slot + 1
        return OK

    def on_own_echo(self, slot: int, seq: Any) -> str:
        """One's own message arriving without ref (legitimate only as the pair of a re-sent
        message's acknowledgement, see on_ack)."""
        i = self.index(seq)
        if i < 0:
            return BAD_SEQ
        live = self.live[slot]
        _grow(live, i)
        if live[i] == _RESENT_ACK:
            live[i] = _SEEN
        elif live[i]:
            return DUPLICATE
        else:
            live[i] = _OWN_ECHO
        return OK

    def on_peer(self, slot: int, seq: Any) -> str:
        """Someone else's message arriving live (message:new without ref)."""
        i = self.index(seq)
        if i < 0:
            return BAD_SEQ
        if _mark(self.live[slot], i):
            return DUPLICATE
        _mark(self.got[slot], i)
        if seq > self.max_peer_seq[slot]:
            self.max_peer_seq[slot] = seq
        if seq <= self.last_live_seq[slot]:
            return OUT_OF_ORDER
        self.last_live_seq[slot] = seq
        return OK

    def on_history(self, slot: int, seq: Any) -> bool:
        """Someone else's message seen in message:history; True if it was not received yet."""
        i = self.index(seq)
        if i < 0:
            return False
        if seq > self.max_peer_seq[slot]:
            self.max_peer_seq[slot] = seq
        return not _mark(self.got[slot], i)

    def unacknowledged_received(self) -> int:
        """Messages some member received that no sender saw acknowledged: each is either
        still unacknowledged (pending) or a second copy stored for a re-sent message."""
        n = max(map(len, self.got))
        if n == 0:
            return 0
        received = 0
        for got in self.got:
            received |= int.from_bytes(got, "little")
        acked = int.from_bytes(bytes(self.acked[:n]).translate(_ANY_SENDER), "little")
        return (received & ~acked).bit_count()

    def missing(self, accountable: Iterable[int]) -> tuple[int, int]:
        """(lost messages, missing deliveries) over the members in `accountable`: an
        acknowledged message is lost when at least one of them (other than its sender)
        has not received it."""
        n = len(self.acked)
        if n == 0:
            return 0, 0
        lost_mask = 0
        deliveries = 0
        for slot in accountable:
            wanted = int.from_bytes(self.acked.translate(_WANTED[slot]), "little")
            got = int.from_bytes(self.got[slot][:n], "little")
            m = wanted & ~got
            deliveries += m.bit_count()
            lost_mask |= m
        return lost_mask.bit_count(), deliveries


def plan_conversations(users: int, group_size: int = 2, group_share: float = 0.2,
                       seed: int = 1) -> list[list[int]]:
    """Partition user numbers 1..users into conversations: about `group_share` of the users in
    groups of 3-5, the rest in conversations of `group_size` (a lone leftover joins the last
    conversation). Every user is in exactly one conversation; deterministic for a seed."""
    if users < 2 or not 2 <= group_size <= MAX_GROUP or not 0.0 <= group_share <= 1.0:
        raise ValueError("bad conversation plan parameters")
    rng = random.Random(seed)
    ids = list(range(1, users + 1))
    n_grouped = round(users * group_share)
    convs: list[list[int]] = []
    pos = 0
    while n_grouped - pos >= 3:
        size = min(rng.randint(3, 5), n_grouped - pos)
        convs.append(ids[pos:pos + size])
        pos += size
    rest = ids[pos:]
    for k in range(0, len(rest), group_size):
        chunk = rest[k:k + group_size]
        if len(chunk) >= 2:
            convs.append(chunk)
        elif convs and len(convs[-1]) < MAX_GROUP:
            convs[-1].extend(chunk)
        elif convs:
            convs.append([convs[-1].pop(), *chunk])
        else:  # pragma: no cover - impossible for users >= 2
            raise ValueError("cannot place a single user")
    return convs


def split_among_workers(convs: Sequence[list[int]], procs: int) -> list[list[list[int]]]:
    """Give each worker whole conversations, balancing the number of users (greedy)."""
    buckets: list[list[list[int]]] = [[] for _ in range(max(1, procs))]
    loads = [0] * len(buckets)
    for conv in sorted(convs, key=len, reverse=True):
        k = loads.index(min(loads))
        buckets[k].append(conv)
        loads[k] += len(conv)
    return [b for b in buckets if b]


def parse_mix(spec: str | None) -> dict[str, float]:
    """'send=70,typing=20' -> DEFAULT_MIX with those weights replaced."""
    mix = dict(DEFAULT_MIX)
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in mix:
            raise ValueError(f"bad --mix item {item!r}; keys: {', '.join(DEFAULT_MIX)}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"bad weight in --mix item {item!r}") from None
        if not 0.0 <= weight < math.inf:
            raise ValueError(f"weight must be >= 0: {item!r}")
        mix[key] = weight
    if mix["send"] + mix["typing"] + mix["read"] + mix["rejoin"] + mix["reconnect"] <= 0:
        raise ValueError("--mix weights sum to zero")
    return mix


DEFAULT_URL = "ws://127.0.0.1:8080/ws"


def node_urls(given: Sequence[str] | None) -> list[str]:
    """The nodes' URLs from the --url options (each may be comma-separated); the default alone."""
    return [u.strip() for option in (given or [DEFAULT_URL]) for u in option.split(",") if u.strip()]


def node_of_member(first_member: int, slot: int, nodes: int) -> int:
    """The node (an index into the URLs) of member ``slot`` of the conversation whose first
    member is ``first_member``: consecutive members on consecutive nodes, so with two or more
    nodes both sides of every two-person conversation are on different nodes."""
    return (first_member + slot) % nodes


def failures(summary: dict[str, Any]) -> list[str]:
    """Why the run failed (empty when it passed)."""
    out = [f"{key} {summary.get(key, 0)}" for key in (
        "lost", "duplicated", "resend_duplicates", "seq_errors", "unacknowledged",
        "users_unavailable") if summary.get(key, 0)]
    if not summary["acknowledged"]:
        out.append("nothing acknowledged")
    return out


def exit_code(summary: dict[str, Any]) -> int:
    """1 on any loss, duplicate (also a re-sent message stored twice), seq error, message
    never acknowledged, or member that could not be checked at the end (disconnected for
    good), or when nothing was acknowledged; else 0."""
    return 1 if failures(summary) else 0


def check_target(url: str, allow_remote: bool) -> None:
    """ws:// or wss:// URL; without allow_remote every address of the host must be loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    if allow_remote:
        return
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(parts.hostname, parts.port or 80)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {parts.hostname}: {e}") from None
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ValueError(f"refusing non-loopback target {parts.hostname} "
                         f"({', '.join(sorted(addrs))}); pass --allow-remote to load-test a "
                         "remote deployment you own")


# ---------------------------------------------------------------------------------------------
# Worker process: one event loop, whole conversations
# ---------------------------------------------------------------------------------------------
class RequestFailed(Exception):
    """A request got an error event, timed out, or the connection went away."""


class Stats:
    """Counters of one worker process."""

    def __init__(self, seed: int) -> None:
        self.sent = self.acked = self.delivered = 0
        self.acked_in_window = self.delivered_in_window = 0
        self.duplicated = self.seq_errors = 0
        self.reconnects = self.resent = self.history_recovered = 0
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.ack_lat = Reservoir(rng=random.Random(seed))
        self.peer_lat = Reservoir(rng=random.Random(seed + 1))
        self.cross_lat = Reservoir(rng=random.Random(seed + 2))  # sender and receiver on different nodes
        self.delivered_cross = 0
        self.t_start = self.t_end = 0

    def error(self, code: str, sample: str | None = None, count: int = 1) -> None:
        """Count an error; the first occurrence of each code keeps a sample for humans."""
        first = code not in self.errors
        self.errors[code] += count
        if sample and first and len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{code}: {sample}"[:300])

    def in_window(self, t_ns: int) -> bool:
        return self.t_start <= t_ns < self.t_end

    def seq_verdict(self, verdict: str) -> bool:
        """Count a ledger verdict; True when the message is new on this connection."""
        if verdict == OK:
            return True
        if verdict == DUPLICATE:
            self.duplicated += 1
        elif verdict == BAD_SEQ:
            self.error("BAD_SEQ")
        else:  # OUT_OF_ORDER (still a new message) or SEQ_CONFLICT
            self.seq_errors += 1
            return verdict == OUT_OF_ORDER
        return False


class Conversation:
    def __init__(self, member_numbers: list[int]) -> None:
        self.member_numbers = member_numbers
        self.users: list[User] = []
        self.id: Any = None
        self.ledger: ConversationLedger | None = None


def handshake_error_code(exc: BaseException) -> str:
    """HTTP_<status>[_<body code>] for a refused handshake, else a short client-side code."""
    from websockets.exceptions import InvalidStatus

    if isinstance(exc, InvalidStatus):
        code = ""
        try:
            code = str(loads(exc.response.body or b"{}").get("data", {}).get("code") or "")
        except Exception:  # noqa: BLE001 - the body is informational only
            pass
        return f"HTTP_{exc.response.status_code}" + (f"_{code}" if code else "")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "CONNECT_TIMEOUT"
    if isinstance(exc, ConnectionRefusedError):
        return "CONNECT_REFUSED"
    return "CONNECT_FAILED"


class User:
    """One simulated user: one connection, one conversation."""

    def __init__(self, worker: Worker, number: int, conv: Conversation, slot: int) -> None:
        self.w = worker
        self.stats = worker.stats
        self.number = number
        self.uid = f"lt{number}"
        self.conv = conv
        self.slot = slot
        # The members of a conversation on different nodes (when there are several).
        self.node = node_of_member(conv.member_numbers[0], slot, len(worker.urls))
        self.url = worker.urls[self.node]
        self.rng = random.Random(worker.seed * 1_000_003 + number)
        self.headers = {"Authorization": "Bearer " + worker.token(number)}
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.connected = self.joined = self.dead = False
        self.closing = self.closed_by_server = False
        self.pending: dict[str, tuple[int, bytes, bool]] = {}  # cmid -> (t_send, frame, resent)
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.wake = asyncio.Event()  # acks, errors, connection loss and stop wake the sender
        self.counter = 0
        self.requests = 0
        self.last_peer_message_id: Any = None
        self.idle = False  # sleeping until its next slot: safe to cancel on an early stop

    # -- connection ---------------------------------------------------------------------------
    async def connect(self) -> bool:
        from websockets.asyncio.client import connect

        try:
            async with self.w.handshakes:
                ws = await connect(
                    self.url, additional_headers=self.headers, compression=None,
                    ping_interval=None, max_size=2 ** 22, open_timeout=CONNECT_TIMEOUT_S,
                    close_timeout=2, proxy=None, user_agent_header=USER_AGENT)
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            self.stats.error(handshake_error_code(e), f"{self.uid}: {type(e).__name__}: {e}")
            return False
        self.ws = ws
        self.connected, self.joined = True, False
        self.closing = self.closed_by_server = False
        if self.conv.ledger is not None:
            self.conv.ledger.new_connection(self.slot)
        self.reader = asyncio.create_task(self.read_loop(ws))
        return True

    async def close(self) -> None:
        ws, reader = self.ws, self.reader
        if ws is None:
            return
        self.closing = True
        try:
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self.ws = self.reader = None
        self.connected = self.joined = False

    async def read_loop(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                raw = await ws.recv(decode=False)
                try:
                    self.on_frame(raw)
                except Exception as e:  # noqa: BLE001 - a bad frame must not stop the reader
                    self.stats.error("BAD_FRAME", f"{self.uid}: {e!r} in {bytes(raw)[:200]!r}")
        except ConnectionClosed:
            pass
        finally:
            if self.ws is ws:
                if not self.closing and not self.closed_by_server:
                    self.stats.error("CONNECTION_LOST", f"{self.uid}: closed {ws.close_code}")
                self.connected = self.joined = False
                for fut in self.waiters.values():
                    if not fut.done():
                        fut.set_exception(RequestFailed("connection closed"))
                self.waiters.clear()
                self.wake.set()

    # -- incoming -----------------------------------------------------------------------------
    def on_frame(self, raw: bytes) -> None:
        now = mono_ns()
        msg = loads(raw)
        event = msg.get("event")
        ref = msg.get("ref")
        if event == "message:new":
            self.on_message(msg["data"]["message"], ref, now)
        elif event == "error":
            self.on_error(msg.get("data") or {}, ref)
        elif event == "connection:closed":
            self.closed_by_server = True
            if not self.closing:
                reason = (msg.get("data") or {}).get("reason", "unknown")
                self.stats.error(f"CLOSED_{reason}", f"{self.uid}: {msg.get('data')}")
        elif ref is not None:
            fut = self.waiters.pop(ref, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def on_message(self, m: dict[str, Any], ref: Any, now: int) -> None:
        st, ledger = self.stats, self.conv.ledger
        if ref is not None:  # the acknowledgement of our own message:send
            p = self.pending.get(ref)
            if p is None:
                st.error("UNEXPECTED_ACK", f"{self.uid}: ref {ref!r}")
            elif m.get("client_message_id") != ref:  # stays pending: unacknowledged
                st.error("ACK_MISMATCH", f"{self.uid}: ref {ref!r} acknowledged with "
                         f"client_message_id {m.get('client_message_id')!r}")
            else:
                del self.pending[ref]
                st.acked += 1
                if st.in_window(now):
                    st.acked_in_window += 1
                if not p[2]:  # a re-sent message's latency would measure the reconnect
                    st.ack_lat.add((now - p[0]) // 1000)
                self.wake.set()
            if ledger is not None:
                st.seq_verdict(ledger.on_ack(self.slot, m.get("seq"), p is not None and p[2]))
            return
        cmid = m.get("client_message_id")
        if ledger is None or not isinstance(cmid, str) or not cmid.startswith(self.w.cmid_prefix):
            return  # not a message of this run
        if m.get("sender_id") == self.uid:
            st.seq_verdict(ledger.on_own_echo(self.slot, m.get("seq")))
            return
        if not st.seq_verdict(ledger.on_peer(self.slot, m.get("seq"))):
            return
        st.delivered += 1
        if st.in_window(now):
            st.delivered_in_window += 1
        self.last_peer_message_id = m.get("id")
        sent = self.check_content(m.get("content"), cmid)
        if sent is not None:
            t_send, sender = sent
            st.peer_lat.add((now - t_send) // 1000)
            if self.w.node_of.get(sender, self.node) != self.node:
                st.delivered_cross += 1
                st.cross_lat.add((now - t_send) // 1000)

    def check_content(self, content: Any, cmid: str) -> tuple[int, int] | None:
        """The send time and sender number encoded in `content`, if it is intact and matches `cmid`."""
        try:
            t_send, user, counter = parse_content(content)
            if cmid[len(self.w.cmid_prefix):] != f"{user}.{counter}":
                raise ValueError("content does not match client_message_id")
        except (ValueError, TypeError, AttributeError) as e:
            self.stats.error("BAD_CONTENT", f"{self.uid}: {e}: {str(content)[:100]!r}")
            return None
        return t_send, user

    def on_error(self, data: dict[str, Any], ref: Any) -> None:
        code = str(data.get("code") or "UNKNOWN")
        self.stats.error(code, f"{self.uid} {data.get('request_event')}: {data.get('message')}")
        if ref is None:
            return
        if self.pending.pop(ref, None) is not None:
            self.wake.set()
            return
        fut = self.waiters.pop(ref, None)
        if fut is not None and not fut.done():
            fut.set_exception(RequestFailed(code))

    # -- outgoing -----------------------------------------------------------------------------
    async def fire(self, event: str, data: dict[str, Any], ref: str | None = None) -> None:
        frame: dict[str, Any] = {"event": event, "data": data}
        if ref is not None:
            frame["ref"] = ref
        await self.ws.send(dumps(frame), text=True)

    async def request(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Send a request with a fresh ref and return the reply envelope."""
        from websockets.exceptions import ConnectionClosed

        if self.ws is None or not self.connected:
            raise RequestFailed("not connected")
        self.requests += 1
        ref = f"q{self.requests}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[ref] = fut
        try:
            await self.fire(event, data, ref)
            return await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
        except TimeoutError:
            self.stats.error(f"TIMEOUT_{event}", self.uid)
            raise RequestFailed("timeout") from None
        except ConnectionClosed:
            raise RequestFailed("connection closed") from None
        finally:
            self.waiters.pop(ref, None)

    async def send_message(self) -> None:
        self.counter += 1
        cmid = f"{self.w.cmid_prefix}{self.number}.{self.counter}"
        t = mono_ns()
        content = make_content(t, self.number, self.counter, self.rng.choice(FILLERS))
        frame = dumps({"event": "message:send", "ref": cmid, "data": {
            "conversation_id": self.conv.id, "content": content, "type": "text",
            "metadata": {}, "client_message_id": cmid}})
        self.pending[cmid] = (t, frame, False)
        self.stats.sent += 1
        await self.ws.send(frame, text=True)  # if this fails the message is re-sent on reconnect

    async def resend_pending(self) -> None:
        for cmid, (t, frame, _) in list(self.pending.items()):
            self.pending[cmid] = (t, frame, True)
            self.stats.resent += 1
            await self.ws.send(frame, text=True)

    async def join(self) -> bool:
        try:
            await self.request("conversation:join", {"conversation_id": self.conv.id})
        except RequestFailed:
            return False
        self.joined = True
        return True

    async def join_and_catch_up(self, deadline_ns: int) -> bool:
        """conversation:join, then message:history after the newest peer message seen before
        the join. The cursor is taken BEFORE joining: live messages that arrive right after
        the join would otherwise move it past the ones committed while not joined."""
        ledger = self.conv.ledger
        assert ledger is not None
        cursor = ledger.max_peer_seq[self.slot]
        if not await self.join():
            return False
        await self.catch_up(cursor, deadline_ns)
        return True

    async def catch_up(self, cursor: int, deadline_ns: int) -> None:
        """Fetch every message after seq `cursor` (message:history after_seq, paged)."""
        ledger = self.conv.ledger
        assert ledger is not None
        for _ in range(MAX_HISTORY_PAGES):
            if mono_ns() > deadline_ns:
                self.stats.error("CATCH_UP_INCOMPLETE", self.uid)
                return
            reply = await self.request("message:history", {
                "conversation_id": self.conv.id, "after_seq": cursor, "limit": HISTORY_PAGE})
            data = reply.get("data") or {}
            messages = data.get("messages") or []
            for m in messages:
                seq = m.get("seq")
                if type(seq) is int and seq > cursor:
                    cursor = seq
                cmid = m.get("client_message_id")
                if (m.get("sender_id") != self.uid and isinstance(cmid, str)
                        and cmid.startswith(self.w.cmid_prefix)
                        and ledger.on_history(self.slot, seq)):
                    self.stats.history_recovered += 1
            if not data.get("has_more") or not messages:
                return

    async def rejoin(self) -> None:
        """conversation:leave, conversation:join, then catch up on what came meanwhile."""
        try:
            await self.request("conversation:leave", {"conversation_id": self.conv.id})
            self.joined = False
            await self.join_and_catch_up(mono_ns() + int(REQUEST_TIMEOUT_S * 1e9))
        except RequestFailed:
            self.joined = False  # the sender loop recovers with a fresh connection

    async def recover(self, deadline_ns: int) -> bool:
        """(Re)connect, join, catch up and re-send unacknowledged messages; False if that is
        not done by the deadline."""
        await self.close()
        for delay in RECONNECT_DELAYS_S:
            if mono_ns() + delay * 1e9 > deadline_ns:
                break
            await asyncio.sleep(delay)
            if not await self.connect():
                continue
            try:
                if await self.join_and_catch_up(deadline_ns):
                    await self.resend_pending()
                    self.stats.reconnects += 1
                    return True
            except Exception as e:  # noqa: BLE001 - RequestFailed, ConnectionClosed, ...
                self.stats.error("RECOVER_FAILED", f"{self.uid}: {e!r}")
            await self.close()
        return False

    # -- the sender loop ----------------------------------------------------------------------
    async def step(self, action: str) -> None:
        cid = {"conversation_id": self.conv.id}
        if action == "typing":
            await self.fire("typing:start", cid)
            await self.send_message()
            await self.fire("typing:stop", cid)
            return
        if action == "read" and self.last_peer_message_id is not None:
            self.requests += 1
            await self.fire("message:read", {**cid, "message_id": self.last_peer_message_id},
                            ref=f"r{self.requests}")
        elif action == "rejoin":
            await self.rejoin()
        elif action == "reconnect":
            if not await self.recover(mono_ns() + int(SETTLE_S * 1e9)):
                return
        if self.connected and self.joined:
            await self.send_message()

    async def run(self) -> None:
        """Send until the worker stops sending (fixed rate or closed window)."""
        from websockets.exceptions import ConnectionClosed

        w = self.w
        period = w.user_period_ns
        next_slot = w.stats.t_start + int(self.rng.random() * period) if period else 0
        while w.sending():
            if not (self.connected and self.joined):
                if not await self.recover(w.stats.t_end + int(SETTLE_S * 1e9)):
                    self.dead = True
                    self.stats.error("RECONNECT_FAILED", self.uid)
                    return
                continue
            if period:  # open loop: a slot every `period`, whatever the server does
                now = mono_ns()
                if now < next_slot:
                    self.idle = True
                    try:
                        await asyncio.sleep((min(next_slot, w.stats.t_end) - now) / 1e9)
                    finally:
                        self.idle = False
                    continue
                next_slot += period
                skipped = (now - next_slot) // period if now - next_slot > LAG_LIMIT_NS else 0
                if skipped:  # far behind (busy reconnecting, or an overloaded generator)
                    next_slot += skipped * period
                    self.stats.error("LOADGEN_BEHIND", count=skipped)
                if len(self.pending) >= MAX_PENDING_PER_USER:
                    self.stats.error("LOADGEN_BACKLOG")
                    continue
            elif len(self.pending) >= w.window:  # closed loop: wait for an ack
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                await self.step(w.choose_action(self.rng))
            except (ConnectionClosed, RequestFailed, OSError):
                pass  # the reader marks the connection lost; the next round recovers
            if not period:
                await asyncio.sleep(0)  # let replies in between sends


class Worker:
    """Runs the users of some conversations in one process and reports to the parent."""

    def __init__(self, cfg: dict[str, Any], wid: int, plan: list[list[int]], ctrl: Any,
                 out_q: Any) -> None:
        self.cfg, self.wid, self.ctrl, self.out_q = cfg, wid, ctrl, out_q
        self.urls: list[str] = cfg["urls"]
        self.seed = cfg["seed"] * 1000 + wid
        self.stats = Stats(self.seed)
        self.cmid_prefix = f"{cfg['run_id']}."
        self.window = cfg["window"]
        self.user_period_ns = 0
        if cfg["rate"]:
            self.user_period_ns = max(1, int(cfg["users"] / cfg["rate"] * 1e9))
        names, weights = zip(*cfg["mix"].items()) if cfg["mix"] else (("send",), (1.0,))
        self.actions, self.cum_weights = list(names), list(_cumulate(weights))
        self.handshakes = asyncio.Semaphore(cfg["connect_concurrency"])
        self.convs = [Conversation(m) for m in plan]
        self.users = [User(self, n, c, slot) for c in self.convs
                      for slot, n in enumerate(c.member_numbers)]
        for u in self.users:
            u.conv.users.append(u)
        self.node_of = {u.number: u.node for u in self.users}
        self.phase = "setup"
        self.start: asyncio.Future[int] | None = None
        self.stop_requested = False

    def token(self, number: int) -> str:
        c = self.cfg
        return mint(c["secret"], f"lt{number}", c["token_ttl"], issuer=c["issuer"], audience=c["audience"])

    def choose_action(self, rng: random.Random) -> str:
        if len(self.actions) == 1:
            return self.actions[0]
        return rng.choices(self.actions, cum_weights=self.cum_weights)[0]

    def sending(self) -> bool:
        return not self.stop_requested and mono_ns() < self.stats.t_end

    def ready_users(self) -> list[User]:
        return [u for u in self.users if u.connected and u.joined and not u.dead]

    # -- parent communication -----------------------------------------------------------------
    def put(self, item: tuple[Any, ...], block: bool = True) -> None:
        try:
            self.out_q.put(item, block=block, timeout=10 if block else None)
        except queue.Full:
            pass

    async def watch_control(self) -> None:
        while True:
            while self.ctrl.poll():
                cmd = self.ctrl.recv()
                if cmd[0] == "start" and self.start is not None and not self.start.done():
                    self.start.set_result(cmd[1])
                elif cmd[0] == "stop":
                    self.stop_requested = True
                    if self.start is not None and not self.start.done():
                        self.start.set_result(0)
                    for u in self.users:
                        u.wake.set()
            await asyncio.sleep(0.02)

    async def report_progress(self) -> None:
        while True:
            st = self.stats
            self.put(("progress", self.wid, {
                "phase": self.phase, "ready": len(self.ready_users()), "sent": st.sent,
                "acked": st.acked, "delivered": st.delivered,
                "errors": sum(st.errors.values())}), block=False)
            await asyncio.sleep(PROGRESS_EVERY_S)

    # -- phases -------------------------------------------------------------------------------
    async def setup(self) -> None:
        limit = asyncio.Semaphore(max(1, self.cfg["connect_concurrency"] // 2))

        async def one(conv: Conversation) -> None:
            async with limit:
                await self.setup_conversation(conv)

        tasks = [asyncio.create_task(one(c)) for c in self.convs]
        _, pending = await asyncio.wait(tasks, timeout=self.cfg["setup_timeout"])
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            self.stats.error("SETUP_TIMEOUT", f"{len(pending)} conversations not set up in time",
                             count=len(pending))
        for u in self.users:
            if not (u.connected and u.joined and u.conv.ledger is not None):
                u.dead = True
                await u.close()

    async def setup_conversation(self, conv: Conversation) -> None:
        """Connect the members; the first one creates the conversation; all join it."""
        ok = await asyncio.gather(*(u.connect() for u in conv.users))
        members = [u for u, connected in zip(conv.users, ok) if connected]
        if len(members) < 2:
            self.stats.error("SETUP_FAILED", f"conversation of {conv.member_numbers}: "
                             f"{len(members)} members connected")
            return
        creator = members[0]
        others = [f"lt{n}" for n in conv.member_numbers if n != creator.number]
        try:
            reply = await creator.request("conversation:create", {"participant_ids": others})
            data = reply.get("data") or {}
            conv.id = (data.get("conversation") or data)["id"]
            await asyncio.gather(*(u.join() for u in members))
            newest = await creator.request("message:history",
                                           {"conversation_id": conv.id, "limit": 1})
            messages = (newest.get("data") or {}).get("messages") or []
            base = messages[-1]["seq"] if messages else 0
        except (RequestFailed, KeyError, TypeError, IndexError) as e:
            self.stats.error("SETUP_FAILED", f"conversation of {conv.member_numbers}: {e!r}")
            return
        if type(base) is not int:
            self.stats.error("SETUP_FAILED", f"history seq is not an integer: {base!r}")
            return
        conv.ledger = ConversationLedger(len(conv.users), base)

    async def send_phase(self) -> None:
        st = self.stats
        await asyncio.sleep(max(0.0, (st.t_start - mono_ns()) / 1e9))
        self.phase = "run"

        async def wake_at_end() -> None:
            while self.sending():  # noqa: ASYNC110 - polling by design (see the sleep)
                await asyncio.sleep(min(0.1, max(0.0, (st.t_end - mono_ns()) / 1e9)))
            for u in self.users:
                u.wake.set()

        waker = asyncio.create_task(wake_at_end())
        senders = [u for u in self.users if not u.dead]
        tasks = [asyncio.create_task(u.run()) for u in senders]
        while self.sending():  # noqa: ASYNC110 - polling by design (see the sleep)
            await asyncio.sleep(0.05)
        st.t_end = min(st.t_end, mono_ns())  # an early stop shortens the measured window
        for u, t in zip(senders, tasks):
            if u.idle:  # waiting for a slot after an early stop
                t.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=SETTLE_S)
            for t in late:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        waker.cancel()

    def outstanding(self) -> tuple[int, int]:
        """(unacknowledged messages, missing deliveries) of the ready users."""
        pending = sum(len(u.pending) for u in self.ready_users())
        missing = 0
        for conv in self.convs:
            if conv.ledger is not None:
                ready = [u.slot for u in conv.users if u.connected and u.joined and not u.dead]
                missing += conv.ledger.missing(ready)[1]
        return pending, missing

    async def drain(self) -> None:
        """Wait (up to --drain s) for acks and deliveries; reconnect users that dropped."""
        self.phase = "drain"
        deadline = mono_ns() + int(self.cfg["drain"] * 1e9)
        recovering: dict[User, asyncio.Task[bool]] = {}
        while True:
            for u in self.users:
                if not u.dead and not (u.connected and u.joined):
                    t = recovering.get(u)
                    if t is None or t.done():
                        recovering[u] = asyncio.create_task(u.recover(deadline))
            busy = any(not t.done() for t in recovering.values())
            if not busy and self.outstanding() == (0, 0):
                break
            if mono_ns() >= deadline:
                break
            await asyncio.sleep(0.2)
        for t in recovering.values():
            t.cancel()
        await asyncio.gather(*recovering.values(), return_exceptions=True)

    def result(self) -> dict[str, Any]:
        st = self.stats
        lost = resend_duplicates = 0
        for conv in self.convs:
            if conv.ledger is not None:
                ready = [u.slot for u in conv.users if u.connected and u.joined and not u.dead]
                lost += conv.ledger.missing(ready)[0]
                still_pending = sum(len(u.pending) for u in conv.users)
                resend_duplicates += max(
                    0, conv.ledger.unacknowledged_received() - still_pending)
        unacked = sum(len(u.pending) for u in self.users)
        unavailable = sum(1 for c in self.convs if c.ledger is not None for u in c.users
                          if not (u.connected and u.joined and not u.dead))
        return {
            "conversations": sum(1 for c in self.convs if c.ledger is not None),
            "users_ready": len(self.ready_users()),
            "sent": st.sent, "acknowledged": st.acked, "delivered": st.delivered,
            "acked_in_window": st.acked_in_window, "delivered_in_window": st.delivered_in_window,
            "window_ns": max(0, st.t_end - st.t_start) if st.t_start else 0,
            "lost": lost, "duplicated": st.duplicated, "seq_errors": st.seq_errors,
            "resend_duplicates": resend_duplicates, "unacknowledged": unacked,
            "users_unavailable": unavailable,
            "reconnects": st.reconnects, "resent": st.resent,
            "history_recovered": st.history_recovered,
            "errors": dict(st.errors), "error_samples": st.error_samples,
            "ack_lat": (st.ack_lat.samples.tobytes(), st.ack_lat.seen, st.ack_lat.max),
            "peer_lat": (st.peer_lat.samples.tobytes(), st.peer_lat.seen, st.peer_lat.max),
            "cross_lat": (st.cross_lat.samples.tobytes(), st.cross_lat.seen, st.cross_lat.max),
            "delivered_cross_node": st.delivered_cross,
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.start = loop.create_future()
        control = asyncio.create_task(self.watch_control())
        progress = asyncio.create_task(self.report_progress())
        try:
            if not self.stop_requested:
                await self.setup()
            self.put(("ready", self.wid, {"ready": len(self.ready_users())}))
            t_start = await self.start
            if t_start and not self.stop_requested:
                self.stats.t_start = t_start
                self.stats.t_end = t_start + int(self.cfg["duration"] * 1e9)
                await self.send_phase()
                await self.drain()
            self.phase = "done"
            result = self.result()
        finally:
            progress.cancel()
            try:
                await asyncio.wait_for(asyncio.gather(*(u.close() for u in self.users)),
                                       CLOSE_TIMEOUT_S * 2)
            except TimeoutError:
                pass
            control.cancel()
        self.put(("result", self.wid, result))


def _cumulate(weights: Iterable[float]) -> Iterable[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


def raise_fd_limit(need: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `need`; returns the resulting soft limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return need
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def worker_main(cfg: dict[str, Any], wid: int, plan: list[list[int]], ctrl: Any,
                out_q: Any) -> None:
    """Process entry point: the parent handles Ctrl-C and tells the workers to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit(sum(len(c) for c in plan) + 256)

    async def main() -> None:
        await Worker(cfg, wid, plan, ctrl, out_q).run()

    try:
        try:
            import uvloop  # type: ignore[import-not-found]
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    except BaseException:  # noqa: BLE001 - report anything to the parent, then exit
        out_q.put(("fatal", wid, traceback.format_exc()[-2000:]), timeout=10)
        raise SystemExit(1) from None


# ---------------------------------------------------------------------------------------------
# Parent: plan, spawn workers, show progress, merge results
# ---------------------------------------------------------------------------------------------
class ProgressView:
    """A rich progress bar (TTY), a plain line every few seconds, or nothing."""

    def __init__(self, style: str, duration_s: float, users: int) -> None:
        self.style, self.duration_s, self.users = style, duration_s, users
        self.history: deque[tuple[float, int]] = deque(maxlen=64)
        self.last_plain = 0.0
        self.progress: Any = None
        if style == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description:<5}"), BarColumn(bar_width=16),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True), refresh_per_second=4, transient=False)
            self.task = self.progress.add_task("setup", total=duration_s, info="")
            self.progress.start()

    def rate(self, now: float, acked: int) -> float:
        """Acknowledged messages per second over the last ~2 s."""
        self.history.append((now, acked))
        while len(self.history) > 2 and now - self.history[0][0] > 2.0:
            self.history.popleft()
        t0, a0 = self.history[0]
        return (acked - a0) / (now - t0) if now > t0 else 0.0

    def update(self, phase: str, elapsed_s: float, totals: dict[str, int]) -> None:
        if self.style == "off":
            return
        now = time.monotonic()
        per_s = self.rate(now, totals.get("acked", 0))
        if phase == "setup":
            info = f"ready {totals.get('ready', 0)}/{self.users} users"
        else:
            info = (f"sent {totals.get('sent', 0):,} | acked {totals.get('acked', 0):,} | "
                    f"delivered {totals.get('delivered', 0):,} | {per_s:,.0f} msgs/s | "
                    f"errors {totals.get('errors', 0):,}")
        if self.progress is not None:
            done = min(self.duration_s, max(0.0, elapsed_s)) if phase != "setup" else 0
            self.progress.update(self.task, description=phase, completed=done, info=info)
        elif now - self.last_plain >= PLAIN_PROGRESS_EVERY_S:
            self.last_plain = now
            print(f"[{elapsed_s:7.1f}s] {phase:<6} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class Coordinator:
    """Starts the workers, relays start/stop, collects their reports."""

    def __init__(self, cfg: dict[str, Any], buckets: list[list[list[int]]],
                 view: ProgressView) -> None:
        methods = mp.get_all_start_methods()
        self.ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self.out_q = self.ctx.Queue(maxsize=1000)
        self.view = view
        self.ctrls: list[Any] = []
        self.procs: list[Any] = []
        for wid, plan in enumerate(buckets):
            parent_end, child_end = self.ctx.Pipe()
            p = self.ctx.Process(target=worker_main, args=(cfg, wid, plan, child_end, self.out_q),
                                 daemon=True, name=f"loadtest-worker-{wid}")
            p.start()
            self.ctrls.append(parent_end)
            self.procs.append(p)
        self.progress: dict[int, dict[str, int]] = {}
        self.ready: dict[int, dict[str, Any]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}
        self.exited_at: dict[int, float] = {}  # a dead worker's result may still be queued
        self.interrupted = False
        self.phase = "setup"
        self.t_start_ns = 0

    def broadcast(self, cmd: tuple[Any, ...]) -> None:
        for c in self.ctrls:
            try:
                c.send(cmd)
            except (BrokenPipeError, OSError):
                pass

    def pump(self, timeout: float) -> None:
        """Handle one report (or none within `timeout`); a first Ctrl-C stops the run early,
        a second one aborts."""
        try:
            try:
                kind, wid, payload = self.out_q.get(timeout=timeout)
            except queue.Empty:
                kind = None
            if kind == "progress":
                self.progress[wid] = payload
            elif kind == "ready":
                self.ready[wid] = payload
            elif kind == "result":
                self.results[wid] = payload
            elif kind == "fatal":
                self.failed[wid] = payload
            self.check_exited()
            elapsed = (mono_ns() - self.t_start_ns) / 1e9 if self.t_start_ns else 0.0
            self.view.update(self.phase, elapsed, self.totals())
        except KeyboardInterrupt:
            if self.interrupted:
                raise
            self.interrupted = True
            self.broadcast(("stop",))

    def check_exited(self) -> None:
        """A worker that exited without a result fails once its queue had time to empty."""
        now = time.monotonic()
        for wid, p in enumerate(self.procs):
            if wid in self.results or wid in self.failed or p.is_alive():
                continue
            since = self.exited_at.setdefault(wid, now)
            if now - since > 3.0:
                self.failed[wid] = f"worker exited with code {p.exitcode} and no result"

    def totals(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for p in self.progress.values():
            out.update({k: v for k, v in p.items() if isinstance(v, int)})
        return dict(out)

    def run(self, setup_timeout: float, duration: float, drain: float) -> list[dict[str, Any]]:
        n = len(self.procs)
        try:
            deadline = time.monotonic() + setup_timeout + 15
            while (len(self.ready) + len(self.failed) < n and time.monotonic() < deadline
                   and not self.interrupted):
                self.pump(0.2)
            if not self.interrupted and sum(r["ready"] for r in self.ready.values()) == 0:
                self.interrupted = True  # nobody to send: report the setup errors at once
                self.broadcast(("stop",))
            self.t_start_ns = mono_ns() + 500_000_000
            self.broadcast(("start", self.t_start_ns))
            self.phase = "run"
            hard_end = (time.monotonic() + 0.5 + duration + SETTLE_S + drain
                        + 2 * CLOSE_TIMEOUT_S + 30)
            while len(self.results) + len(self.failed) < n and time.monotonic() < hard_end:
                if self.phase == "run" and mono_ns() > self.t_start_ns + duration * 1e9:
                    self.phase = "drain"
                self.pump(0.2)
            if len(self.results) + len(self.failed) < n:
                for wid in range(n):
                    if wid not in self.results:
                        self.failed.setdefault(wid, "no result before the hard deadline")
        except KeyboardInterrupt:
            for wid in range(n):
                if wid not in self.results:
                    self.failed.setdefault(wid, "aborted by a second Ctrl-C")
        finally:
            self.shutdown()
        return list(self.results.values())

    def shutdown(self) -> None:
        self.broadcast(("stop",))
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def merge_results(results: list[dict[str, Any]], failed: dict[int, str],
                  args: argparse.Namespace, mix: bool) -> tuple[dict[str, Any], list[str]]:
    """The JSON summary from the workers' results (and the error samples for humans)."""
    def total(key: str) -> int:
        return sum(r[key] for r in results)

    errors: Counter[str] = Counter()
    samples: list[str] = []
    for r in results:
        errors.update(r["errors"])
        samples.extend(r["error_samples"])
    if failed:
        errors["WORKER_FAILED"] += len(failed)
        samples.extend(f"WORKER_FAILED: {v.strip().splitlines()[-1] if v.strip() else v}"
                       for v in failed.values())
    window_s = max((r["window_ns"] for r in results), default=0) / 1e9

    def latency(key: str) -> dict[str, float | None]:
        parts = []
        maxima = []
        for r in results:
            raw, seen, mx = r[key]
            vals = array("q")
            vals.frombytes(raw)
            parts.append((vals, seen))
            if mx is not None:
                maxima.append(mx)
        return latency_summary_ms(merge_reservoirs(parts), max(maxima) if maxima else None)

    def per_s(key: str) -> float:
        return round(total(key) / window_s, 1) if window_s > 0 else 0.0

    summary: dict[str, Any] = {
        "users": args.users,
        "conversations": total("conversations"),
        "duration_s": round(window_s, 3),
        "mode": "max" if args.max else "rate",
        "sent": total("sent"),
        "acknowledged": total("acknowledged"),
        "delivered": total("delivered"),
        "ack_per_s": per_s("acked_in_window"),
        "delivered_per_s": per_s("delivered_in_window"),
        "ack_latency_ms": latency("ack_lat"),
        "peer_latency_ms": latency("peer_lat"),
        # several --url: sender and receiver on different nodes (None values with one node)
        "nodes": len(args.url),
        "delivered_cross_node": total("delivered_cross_node"),
        "cross_node_peer_latency_ms": latency("cross_lat"),
        "errors": dict(sorted(errors.items())),
        "lost": total("lost"),
        "duplicated": total("duplicated"),
        "reconnects": total("reconnects"),
        # beyond the required keys
        "seq_errors": total("seq_errors"),
        "resend_duplicates": total("resend_duplicates"),
        "unacknowledged": total("unacknowledged"),
        "users_unavailable": total("users_unavailable"),
        "users_ready": total("users_ready"),
        "resent": total("resent"),
        "history_recovered": total("history_recovered"),
        "rate": None if args.max else args.rate,
        "window": args.window if args.max else None,
        "mix": mix,
        "procs": args.procs,
    }
    return summary, samples[:10]


def print_summary(summary: dict[str, Any], samples: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    def lat(d: dict[str, Any]) -> str:
        return " / ".join("-" if d[k] is None else f"{d[k]:.2f}"
                          for k in ("p50", "p95", "p99", "max"))

    t = Table(title="winkr load test", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    mode = (f"max, window {summary['window']}" if summary["mode"] == "max"
            else f"rate {summary['rate']:g} msgs/s")
    rows = [
        ("users (ready)", f"{summary['users']:,} ({summary['users_ready']:,})"),
        ("conversations", f"{summary['conversations']:,}"),
        ("mode", f"{mode}, {'mixed steps' if summary['mix'] else 'sends only'}, "
                 f"{summary['procs']} proc(s)"),
        ("measured window", f"{summary['duration_s']:.1f} s"),
        ("sent / acknowledged / delivered",
         f"{summary['sent']:,} / {summary['acknowledged']:,} / {summary['delivered']:,}"),
        ("acknowledged per s", f"{summary['ack_per_s']:,.1f}"),
        ("delivered per s", f"{summary['delivered_per_s']:,.1f}"),
        ("send->ack ms p50/p95/p99/max", lat(summary["ack_latency_ms"])),
        ("send->peer ms p50/p95/p99/max", lat(summary["peer_latency_ms"])),
        *([(f"cross-node send->peer ms ({summary['nodes']} nodes)", lat(summary["cross_node_peer_latency_ms"])),
           ("delivered across nodes", f"{summary['delivered_cross_node']:,}")] if summary["nodes"] > 1 else []),
        ("reconnects / re-sent / caught up",
         f"{summary['reconnects']:,} / {summary['resent']:,} / {summary['history_recovered']:,}"),
        ("errors", ", ".join(f"{k} {v:,}" for k, v in summary["errors"].items()) or "none"),
        ("lost", f"{summary['lost']:,}"),
        ("duplicated (re-sent stored twice)",
         f"{summary['duplicated']:,} ({summary['resend_duplicates']:,})"),
        ("seq errors", f"{summary['seq_errors']:,}"),
        ("never acknowledged", f"{summary['unacknowledged']:,}"),
        ("members unavailable at the end", f"{summary['users_unavailable']:,}"),
        ("result", "[red]FAIL: " + ", ".join(failures(summary)) + "[/]" if failures(summary)
         else "[green]PASS[/]"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console = Console(stderr=True)
    console.print(t)
    for s in samples:
        console.print(f"  {s}", markup=False, highlight=False, style="dim")
    for hint in hints(summary["errors"]):
        console.print(f"  hint: {hint}", markup=False, highlight=False, style="yellow")


def hints(errors: dict[str, int]) -> list[str]:
    """Likely causes of common errors."""
    out = []
    if any(k.startswith("HTTP_401") for k in errors):
        out.append("handshakes refused with 401: is --secret / $WINKR_JWT_SECRET the secret the "
                   "server uses (and --issuer/--audience, if it checks them)?")
    if "CONNECT_REFUSED" in errors or "CONNECT_FAILED" in errors:
        out.append("cannot connect: is the server running at --url?")
    if "RATE_LIMITED" in errors or any(k.startswith("HTTP_429") for k in errors):
        out.append("the server's rate limits are on: set every key of its [limits] table to 0 "
                   "for a load test (see --help)")
    if any(k.startswith("CLOSED_slow_consumer") for k in errors):
        out.append("the server dropped slow consumers: use more --procs or a lower --rate/--window")
    if "LOADGEN_BEHIND" in errors or "LOADGEN_BACKLOG" in errors:
        out.append("the load generator could not keep the schedule: use more --procs or a lower "
                   "--rate (the numbers understate what was asked)")
    return out


def bounded(kind: Callable[[str], float], lo: float, hi: float, *, above: bool = False) -> Any:
    """An argparse type: ``kind(text)`` from ``lo`` (excluded when ``above``) to ``hi``; never NaN."""
    def parse(s: str) -> float:
        v = kind(s)
        if not (lo < v if above else lo <= v) or not v <= hi:  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be > {lo:g} and <= {hi:g}" if above
                                             else f"must be between {lo:g} and {hi:g}")
        return v
    parse.__name__ = "integer" if kind is int else "number"
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="loadtest.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", default=None,
                    help=f"server WebSocket URL (default {DEFAULT_URL}); once per node of a "
                         "cluster, or comma-separated: the members of a conversation go to different nodes")
    ap.add_argument("--allow-remote", action="store_true",
                    help="allow a non-loopback target (you must own it)")
    ap.add_argument("--secret", default=None,
                    help="HS256 JWT secret (default: --secret-file, then $WINKR_JWT_SECRET)")
    ap.add_argument("--secret-file", default=None, help="file holding the JWT secret")
    ap.add_argument("--issuer", default=None, help="'iss' claim, if the server checks it")
    ap.add_argument("--audience", default=None, help="'aud' claim, if the server checks it")
    ap.add_argument("--users", type=bounded(int, 2, MAX_USERS), default=100,
                    help=f"simulated users (2..{MAX_USERS}, default 100)")
    ap.add_argument("--group-size", type=bounded(int, 2, MAX_GROUP), default=2,
                    help="members of an ordinary conversation (default 2)")
    ap.add_argument("--group-share", type=bounded(float, 0.0, 1.0), default=0.2,
                    help="share of users in small groups of 3-5 (default 0.2)")
    ap.add_argument("--duration", type=bounded(float, 0, MAX_DURATION_S, above=True), default=30.0,
                    help=f"seconds of sending (max {MAX_DURATION_S:g}, default 30)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=bounded(float, 0, MAX_RATE, above=True), default=None,
                      help="open loop: total messages/s over all senders (default: 1 per user)")
    mode.add_argument("--max", action="store_true",
                      help="closed loop: as fast as acknowledged, --window in flight per sender")
    ap.add_argument("--window", type=bounded(int, 1, MAX_WINDOW), default=32,
                    help="--max: messages in flight per sender (default 32)")
    ap.add_argument("--mix", default="",
                    help="step weights, e.g. send=78,typing=15,read=5,rejoin=1.5,reconnect=0.5 "
                         "(these are the defaults)")
    ap.add_argument("--no-mix", action="store_true", help="plain message:send steps only")
    ap.add_argument("--procs", type=bounded(int, 1, MAX_PROCS), default=1,
                    help="worker processes (default 1)")
    ap.add_argument("--drain", type=bounded(float, 0.0, MAX_DRAIN_S), default=5.0,
                    help="seconds to wait for acks and deliveries after sending (default 5)")
    ap.add_argument("--setup-timeout", type=bounded(float, 0, MAX_SETUP_S, above=True), default=120.0,
                    help="seconds allowed for connecting and creating conversations (default 120)")
    ap.add_argument("--connect-concurrency", type=bounded(int, 1, 1000), default=64,
                    help="handshakes in progress per worker (default 64)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (conversation plan, steps)")
    ap.add_argument("--json-only", action="store_true",
                    help="print only the JSON line (no progress, no table)")
    return ap


def resolve_secret(args: argparse.Namespace) -> str:
    if args.secret:
        return args.secret
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("WINKR_JWT_SECRET", "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.url = node_urls(args.url)
    from scripts._deps import require

    require("loadtest.py", ["websockets.asyncio.client", "jwt", "rich", "winkr.auth"])
    try:
        if not args.url:
            raise ValueError("--url is empty")
        for url in args.url:
            check_target(url, args.allow_remote)
        mix = None if args.no_mix else parse_mix(args.mix)
        secret = resolve_secret(args)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    if not secret:
        ap.error("no JWT secret: pass --secret/--secret-file or set WINKR_JWT_SECRET "
                 "(winkr serve keeps a generated one in a file next to its database)")
    if args.rate is None and not args.max:
        args.rate = float(args.users)

    convs = plan_conversations(args.users, args.group_size, args.group_share, args.seed)
    buckets = split_among_workers(convs, args.procs)
    args.procs = len(buckets)
    largest = max(sum(len(c) for c in b) for b in buckets)
    if raise_fd_limit(largest + 256) < largest + 64:
        ap.error(f"open-file limit too low for {largest} connections per process; "
                 "raise `ulimit -n` or use more --procs")

    cfg = {
        "urls": args.url, "secret": secret, "issuer": args.issuer, "audience": args.audience,
        "users": args.users, "duration": args.duration, "rate": None if args.max else args.rate,
        "window": args.window, "mix": mix, "drain": args.drain, "seed": args.seed,
        "setup_timeout": args.setup_timeout, "connect_concurrency": args.connect_concurrency,
        "token_ttl": int(args.setup_timeout + args.duration + 3600),
        "run_id": secrets.token_hex(4),  # makes client_message_ids unique across runs
    }
    style = "off" if args.json_only else ("rich" if sys.stderr.isatty() else "plain")
    view = ProgressView(style, args.duration, args.users)
    coord = Coordinator(cfg, buckets, view)
    try:
        results = coord.run(args.setup_timeout, args.duration, args.drain)
    finally:
        view.close()
    summary, samples = merge_results(results, coord.failed, args, mix is not None)
    code = exit_code(summary)
    if not args.json_only:
        print_summary(summary, samples)
    sys.stdout.write(dumps(summary).decode() + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
