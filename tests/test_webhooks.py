"""Webhooks (contract §14): settings, Standard Webhooks signing (verified with the
``standardwebhooks`` library), the transactional outbox, the delivery actor's retries and
max age, ``message.created`` for recipients with no open connection, and delivery at least
once — across a graceful restart, a real loopback receiver answering 500 then 200, and a
``kill -9`` of a real ``winkr serve`` process.

Tests driven by MockClock talk to an in-process endpoint behind ``httpx.MockTransport`` (no
socket, so autojump cannot leap past real I/O); the loopback tests run on the real clock,
every wait bounded."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from conftest import SECRET, Harness, make_settings, query, until
from processes import Servers, reply_to, winkr
from receiver import Receiver
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from winkr.auth import mint_token
from winkr.clock import WallClock
from winkr.config import ConfigError, Settings, load_settings
from winkr.errors import VALIDATION_ERROR, ProtocolError
from winkr.metrics import Metrics
from winkr.server import Server
from winkr.store import webhook_outbox as outbox
from winkr.store.schema import open_database
from winkr.store.store import Store
from winkr.store.writer import StoreHandle, run_inline, run_store_writer
from winkr.webhooks import (
    DEFAULT_BACKOFF,
    Backoff,
    SenderConfig,
    WebhookHandle,
    open_webhook_channel,
    run_webhook_sender,
    sign,
)

WEBHOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
ENDPOINT_URL = "https://push.example.com/hooks/winkr"
ALL_EVENTS = ("message.created", "message.reported", "user.blocked", "conversation.closed")


def near_real_clock() -> WallClock:
    """A wall clock that moves with trio's (mock) clock but starts at the real time, so
    ``standardwebhooks`` (which checks timestamps against the real clock) accepts them."""
    start = time.time() - trio.current_time()
    return lambda: start + trio.current_time()


def webhook_settings(tmp_path: Path, **overrides: Any) -> Settings:
    # No heartbeat: these tests wait minutes of mock time, and a ping that meets a client's
    # close makes trio-websocket's client raise (not what these tests are about).
    return make_settings(tmp_path, **{"webhook_url": ENDPOINT_URL, "webhook_secret": WEBHOOK_SECRET,
                                      "ping_interval": 86400.0, "pong_timeout": 86400.0, **overrides})


async def eventually(predicate: Callable[[], bool], timeout: float, step: float = 1.0) -> None:
    """``until`` for waits of mock hours: checks every ``step`` mock seconds."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling by design
            await trio.sleep(step)


def sample(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(label_text) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@attrs.define
class Attempt:
    at: float  # trio (mock) time
    headers: dict[str, str]
    body: bytes

    def verified(self) -> dict[str, Any]:
        payload: dict[str, Any] = Webhook(WEBHOOK_SECRET).verify(self.body, self.headers)
        return payload


class Endpoint:
    """An in-process receiver behind ``httpx.MockTransport``: records each attempt with the
    mock time and answers the scripted statuses (then 200); or hangs, or refuses."""

    def __init__(self, statuses: tuple[int, ...] = (), mode: str = "answer") -> None:
        self.statuses = list(statuses)
        self.mode = mode
        self.attempts: list[Attempt] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.attempts.append(Attempt(trio.current_time(), dict(request.headers), await request.aread()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.mode == "hang":
                await trio.sleep_forever()
            if self.mode == "refuse":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(self.statuses.pop(0) if self.statuses else 200)
        finally:
            self.in_flight -= 1

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


class TokensOnTheRealClock(Harness):
    """pyjwt checks ``iat`` against the real clock, which the mock-driven wall clock outruns."""

    def token(self, user_id: str, *, ttl: float = 3600, service: bool = False, **claims: Any) -> str:
        return mint_token(self.settings, SECRET, user_id, ttl=ttl, now=time.time(),
                          username=claims.get("username", f"name-{user_id}"),
                          avatar_url=claims.get("avatar_url"), service=service)


@asynccontextmanager
async def webhook_server(settings: Settings, endpoint: Endpoint | None, watchdog: dict[str, Any],
                         backoff: Backoff = DEFAULT_BACKOFF) -> AsyncIterator[Harness]:
    """Like conftest's ``running``, with a near-real wall clock and the webhook transport
    (``None``: the network)."""
    watchdog["token"] = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as clients:
        async with trio.open_nursery() as servers:
            server = Server(settings, SECRET, clock=near_real_clock(), run_sync=run_inline,
                            webhook_transport=endpoint and endpoint.transport(), webhook_backoff=backoff)
            await servers.start(server.serve, [])
            try:
                yield TokensOnTheRealClock(server, clients, settings)
            finally:
                server.request_shutdown()
        clients.cancel_scope.cancel()


@attrs.frozen
class Rig:
    store: StoreHandle
    handle: WebhookHandle
    metrics: Metrics
    clock: WallClock

    async def enqueue(self, data: dict[str, Any], age: float = 0.0) -> str:
        event_id = await self.store.call(partial(outbox.enqueue, type_="message.created", data=data,
                                                 happened_at=self.clock() - age, enabled=self.handle.events))
        assert event_id is not None
        self.handle.nudge()
        return event_id

    async def drained(self) -> None:
        """Until the outbox is empty (outcomes are recorded a moment after the attempts)."""
        await until(lambda: sample(self.metrics.text(), "winkr_webhook_events_waiting") == 0)
        assert (await self.store.call(partial(outbox.stats, now=self.clock())))[0] == 0

    def count(self, outcome: str) -> float:
        return sample(self.metrics.text(), "winkr_webhook_deliveries_total", outcome=outcome)


@asynccontextmanager
async def sender_rig(tmp_path: Path, endpoint: Endpoint, *, rng: random.Random | None = None,
                     **overrides: Any) -> AsyncIterator[Rig]:
    """The delivery actor alone, over a real store writer on a real SQLite file."""
    settings = webhook_settings(tmp_path, **overrides)
    db = open_database(settings.db)
    metrics, clock = Metrics(), near_real_clock()
    try:
        async with trio.open_nursery() as nursery:
            store = await nursery.start(run_store_writer, Store(db), run_inline)
            handle, inbox = open_webhook_channel(settings)
            assert inbox is not None
            config = SenderConfig.from_settings(settings, Backoff(rng=rng or random.Random(7)))
            await nursery.start(partial(run_webhook_sender, store, config, handle, inbox, clock=clock,
                                        metrics=metrics, transport=endpoint.transport()))
            yield Rig(store, handle, metrics, clock)
            nursery.cancel_scope.cancel()
    finally:
        db.close()


class AlwaysTheCeiling(random.Random):
    """Full jitter at its upper bound: the backoff ceilings themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def send(client: Any, conv: str, content: str, **extra: Any) -> dict[str, Any]:
    reply = await client.request("message:send", {"conversation_id": conv, "content": content, "type": "text",
                                                  "metadata": {}, **extra})
    assert reply["event"] == "message:new", reply
    return reply


def outbox_rows(settings: Settings) -> list[tuple[Any, ...]]:
    return query(settings, "SELECT id, type, payload, attempts FROM webhook_events")


# --- settings --------------------------------------------------------------------------------

def test_webhook_settings_come_from_the_environment(tmp_path: Path) -> None:
    assert make_settings(tmp_path).webhook_url == ""
    assert make_settings(tmp_path).webhook_events == ALL_EVENTS
    settings = load_settings(None, {"db": str(tmp_path / "w.db")}, environ={
        "WINKR_WEBHOOK_URL": "http://127.0.0.1:9000/hook", "WINKR_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WINKR_WEBHOOK_EVENTS": "message.created, user.blocked", "WINKR_WEBHOOK_TIMEOUT_SECONDS": "2.5",
        "WINKR_WEBHOOK_MAX_AGE_HOURS": "1"})
    assert settings.webhook_url == "http://127.0.0.1:9000/hook"
    assert settings.webhook_events == ("message.created", "user.blocked")
    assert settings.webhook_timeout_seconds == 2.5 and settings.webhook_max_age_hours == 1.0


@pytest.mark.parametrize(("overrides", "says"), [
    ({"webhook_secret": None}, "webhook_secret"),
    ({"webhook_secret": "sk_" + WEBHOOK_SECRET[6:]}, "whsec_"),
    ({"webhook_secret": "whsec_" + base64.b64encode(b"too short").decode()}, "24"),
    ({"webhook_secret": "whsec_not*base64!"}, "base64"),
    ({"webhook_url": "ftp://push.example.com/x"}, "http"),
    ({"webhook_url": "push.example.com/x"}, "http"),
    ({"webhook_events": ["message.created", "message.sent"]}, "message.sent"),
    ({"webhook_timeout_seconds": 0}, "webhook_timeout_seconds"),
    ({"webhook_max_age_hours": -1}, "webhook_max_age_hours"),
], ids=["url-without-secret", "wrong-prefix", "short-secret", "not-base64", "ftp", "no-scheme",
        "unknown-event", "zero-timeout", "negative-age"])
def test_bad_webhook_settings_are_refused_clearly(tmp_path: Path, overrides: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        webhook_settings(tmp_path, **overrides)
    assert says in str(info.value)
    assert WEBHOOK_SECRET[6:] not in str(info.value)  # never echo a secret


def test_serve_exits_2_when_a_url_has_no_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env.update(WINKR_JWT_SECRET=SECRET, WINKR_WEBHOOK_URL="https://push.example.com/hook")
    proc = subprocess.run([sys.executable, "-m", "winkr", "serve", "--port", "0", "--db", str(tmp_path / "w.db")],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "webhook_url is set but webhook_secret is not" in proc.stderr
    assert not (tmp_path / "w.db").exists()


# --- signing ---------------------------------------------------------------------------------

def test_the_signature_verifies_with_standardwebhooks() -> None:
    body = b'{"type":"message.created","timestamp":"2026-11-30T12:00:00.000Z","data":{"x":"\\u00e9"}}'
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(base64.b64decode(WEBHOOK_SECRET[6:]), "msg_1", now, body)}
    assert Webhook(WEBHOOK_SECRET).verify(body, headers)["data"] == {"x": "\u00e9"}
    for tampered in ({**headers, "webhook-id": "msg_2"}, {**headers, "webhook-timestamp": str(now - 1)}):
        with pytest.raises(WebhookVerificationError):
            Webhook(WEBHOOK_SECRET).verify(body, tampered)
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET).verify(body.replace(b"12:00", b"12:01"), headers)


DOCS = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


def documented(heading: str, language: str) -> str:
    """The first code block under ``heading`` in docs/webhooks.md."""
    match = re.search(re.escape(heading) + r"\n\n```" + language + r"\n(.*?)```", DOCS.read_text(), re.S)
    assert match, heading
    return match.group(1)


SAMPLE_DATA = {"content": "caf\u00e9 \u2713"}


def signed_sample() -> tuple[dict[str, str], bytes]:
    body = json.dumps({"type": "message.created", "timestamp": "2026-11-30T12:00:00.000Z",
                       "data": SAMPLE_DATA}, ensure_ascii=False).encode()  # raw UTF-8, as winkr sends
    now = int(time.time())
    return {"webhook-id": "msg_doc", "webhook-timestamp": str(now),
            "webhook-signature": sign(base64.b64decode(WEBHOOK_SECRET[6:]), "msg_doc", now, body)}, body


def test_the_documented_python_verification_accepts_our_signatures() -> None:
    namespace: dict[str, Any] = {}
    exec(documented("### Python, by hand", "python"), namespace)  # noqa: S102 - our own docs
    headers, body = signed_sample()
    assert namespace["verify"](WEBHOOK_SECRET, headers, body) is True
    assert namespace["verify"](WEBHOOK_SECRET, headers, body + b" ") is False


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_the_documented_node_verification_accepts_our_signatures(tmp_path: Path) -> None:
    headers, body = signed_sample()
    script = tmp_path / "verify.mjs"
    script.write_text(documented("### JavaScript, with Node's `crypto`", "js") + f"""
const headers = {json.dumps(headers)};
const body = Buffer.from({json.dumps(body.decode())}, "utf8");
console.log(JSON.stringify(verifyWinkrWebhook({json.dumps(WEBHOOK_SECRET)}, headers, body).data));
try {{ verifyWinkrWebhook({json.dumps(WEBHOOK_SECRET)}, headers, Buffer.concat([body, Buffer.from(" ")])); }}
catch (error) {{ console.log(error.message); }}
""")
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [json.dumps(SAMPLE_DATA, ensure_ascii=False, separators=(",", ":")),
                                        "no matching signature"]


# --- the outbox ------------------------------------------------------------------------------

async def test_an_event_commits_and_rolls_back_with_the_change_that_causes_it(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "w.db"))
    enabled = frozenset(ALL_EVENTS)
    try:
        async with trio.open_nursery() as nursery:
            store: StoreHandle = await nursery.start(run_store_writer, Store(db), run_inline)

            def block_then(fail: bool, s: Store) -> str | None:
                s.upsert_user("alice", "Alice", None)
                event_id = outbox.enqueue(s, "user.blocked", {"blocker_id": "alice"}, 1000.0, enabled)
                if fail:
                    raise ProtocolError(VALIDATION_ERROR, "refused after the enqueue")
                return event_id

            with pytest.raises(ProtocolError):
                await store.call(partial(block_then, True))
            assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 0
            assert db.execute("SELECT count(*) FROM webhook_events").fetchone()[0] == 0

            event_id = await store.call(partial(block_then, False))
            row = db.execute("SELECT id, type, payload, created_at, next_attempt_at, attempts "
                             "FROM webhook_events").fetchone()
            assert row[:2] == (event_id, "user.blocked") and event_id.startswith("msg_")
            assert json.loads(row[2]) == {"type": "user.blocked", "timestamp": "1970-01-01T00:16:40.000Z",
                                          "data": {"blocker_id": "alice"}}
            assert row[3:] == (1000.0, 1000.0, 0)

            # A type outside webhook_events writes nothing.
            assert await store.call(partial(outbox.enqueue, type_="user.blocked", data={}, happened_at=1.0,
                                            enabled=frozenset({"message.created"}))) is None
            nursery.cancel_scope.cancel()
    finally:
        db.close()


def test_an_unread_count_reads_the_deleted_messages_not_every_unread_one(tmp_path: Path) -> None:
    """message.created counts each offline recipient's unread messages in the send's
    transaction: it must not cost a scan of everything they have not read."""
    from winkr.store.store import _UNREAD_IN_CONVERSATION_SQL, _UNREAD_OF_USER_SQL

    db = open_database(str(tmp_path / "w.db"))
    try:
        for sql, args in ((_UNREAD_IN_CONVERSATION_SQL, ("c", "bob")), (_UNREAD_OF_USER_SQL, ("bob",))):
            plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args))
            assert "INDEX messages_deleted" in plan, plan
            assert "PRIMARY KEY (conversation_id=? AND seq>?)" not in plan, plan
    finally:
        db.close()


async def test_due_claims_events_for_one_attempt_with_a_lease(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "w.db"))
    store, enabled = Store(db), frozenset(ALL_EVENTS)
    try:
        ids = [outbox.enqueue(store, "user.blocked", {"n": n}, 100.0 + n, enabled) for n in range(3)]
        assert outbox.stats(store, 110.0) == (3, 10.0)
        claimed = outbox.due(store, now=105.0, limit=2, lease=25.0)
        assert [event.id for event in claimed] == ids[:2] and [e.attempts for e in claimed] == [1, 1]
        assert json.loads(claimed[0].payload)["data"] == {"n": 0}
        assert [event.id for event in outbox.due(store, now=105.0, limit=8, lease=25.0)] == [ids[2]]
        assert outbox.due(store, now=129.0, limit=8, lease=25.0) == []  # leased
        assert outbox.next_attempt_at(store) == 130.0
        outbox.delivered(store, ids[0])
        outbox.reschedule(store, ids[1], 200.0)
        outbox.drop(store, ids[2])
        assert outbox.stats(store, 300.0) == (1, 199.0)
        assert [(e.id, e.attempts) for e in outbox.due(store, now=200.0, limit=8, lease=25.0)] == [(ids[1], 2)]
    finally:
        db.close()


# --- the delivery actor (MockClock) ---------------------------------------------------------

async def test_retries_back_off_exponentially_then_the_event_is_dropped(tmp_path: Path) -> None:
    endpoint = Endpoint(statuses=(500,) * 100)
    async with sender_rig(tmp_path, endpoint, rng=AlwaysTheCeiling(), webhook_max_age_hours=1.0) as rig:
        event_id = await rig.enqueue({"recipient_id": "bob"})
        started = trio.current_time()
        await eventually(lambda: rig.count("dropped") == 1, timeout=3600)
        gaps = [round(b.at - a.at, 3) for a, b in zip(endpoint.attempts, endpoint.attempts[1:])]
        # First retry within 5 s, doubling, never more than 10 minutes apart; the last attempt
        # whose retry would come after the max age (1 h) is the last one.
        assert gaps == [5, 10, 20, 40, 80, 160, 320, 600, 600, 600, 600]
        assert endpoint.attempts[-1].at - started < 3600 <= endpoint.attempts[-1].at + 600 - started
        assert {a.headers["webhook-id"] for a in endpoint.attempts} == {event_id}
        assert len({a.body for a in endpoint.attempts}) == 1
        stamps = [int(a.headers["webhook-timestamp"]) for a in endpoint.attempts]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert rig.count("retry") == 11 and rig.count("delivered") == 0
        await rig.drained()


async def test_the_first_retry_after_a_timeout_comes_within_5_seconds(tmp_path: Path) -> None:
    endpoint = Endpoint(mode="hang")
    async with sender_rig(tmp_path, endpoint, rng=AlwaysTheCeiling(), webhook_timeout_seconds=20.0) as rig:
        await rig.enqueue({})
        await until(lambda: len(endpoint.attempts) == 1)
        endpoint.mode = "answer"
        await until(lambda: rig.count("delivered") == 1, timeout=60)
        assert [round(a.at - endpoint.attempts[0].at, 3) for a in endpoint.attempts] == [0, 20 + 5]


async def test_jittered_retries_stay_within_the_bounds(tmp_path: Path) -> None:
    endpoint = Endpoint(mode="refuse")
    async with sender_rig(tmp_path, endpoint, rng=random.Random(20261130), webhook_max_age_hours=2.0) as rig:
        await rig.enqueue({})
        await eventually(lambda: rig.count("dropped") == 1, timeout=7200)
    times = [a.at for a in endpoint.attempts]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 10
    assert all(0 <= gap <= min(600, 5 * 2 ** n) + 0.01 for n, gap in enumerate(gaps)), gaps
    assert times[-1] - times[0] < 7200
    assert len(set(round(g, 3) for g in gaps)) == len(gaps)  # jittered, not a fixed schedule


async def test_an_event_older_than_the_max_age_is_dropped_unsent(tmp_path: Path) -> None:
    endpoint = Endpoint()
    async with sender_rig(tmp_path, endpoint, webhook_max_age_hours=1.0) as rig:
        await rig.enqueue({"stale": True}, age=3601)
        fresh = await rig.enqueue({"stale": False})
        await until(lambda: rig.count("dropped") == 1 and rig.count("delivered") == 1)
        assert [a.headers["webhook-id"] for a in endpoint.attempts] == [fresh]


async def test_a_failing_endpoint_is_probed_not_stormed_and_recovery_sends_everything(tmp_path: Path) -> None:
    endpoint = Endpoint(mode="refuse")
    async with sender_rig(tmp_path, endpoint) as rig:
        for n in range(50):
            await rig.enqueue({"n": n})
        await trio.sleep(120)
        # Each event retried on its own schedule would be ~8 attempts in 2 minutes: 400.
        # One probe at a time, at most 5 s apart: about 24 (plus the first eight at once).
        assert len(endpoint.attempts) <= 8 + 120 / 5 + 6
        assert max(b.at - a.at for a, b in zip(endpoint.attempts[8:], endpoint.attempts[9:])) <= 5.001
        recovered = trio.current_time()
        endpoint.mode = "answer"
        await until(lambda: rig.count("delivered") == 50, timeout=60)
        assert trio.current_time() - recovered <= 5 + 1  # the next probe, then all of them
        await rig.drained()


async def test_events_too_old_are_dropped_while_the_endpoint_is_down(tmp_path: Path) -> None:
    endpoint = Endpoint(mode="refuse")
    async with sender_rig(tmp_path, endpoint, webhook_max_age_hours=0.01) as rig:  # 36 s
        for n in range(30):
            await rig.enqueue({"n": n})
        await eventually(lambda: rig.count("dropped") == 30, timeout=36 + 20)
        assert len(endpoint.attempts) < 30  # most were never attempted
        await rig.drained()


async def test_metrics_count_outcomes_waiting_events_and_the_oldest_age(tmp_path: Path) -> None:
    endpoint = Endpoint(mode="hang")
    async with sender_rig(tmp_path, endpoint, webhook_timeout_seconds=30.0) as rig:
        await rig.enqueue({"n": 1})
        await trio.sleep(10)
        await rig.enqueue({"n": 2})
        await until(lambda: sample(rig.metrics.text(), "winkr_webhook_events_waiting") == 2)
        await trio.sleep(5)
        text = rig.metrics.text()
        assert 15 <= sample(text, "winkr_webhook_oldest_event_age_seconds") < 17
        endpoint.mode, endpoint.statuses = "answer", [503]
        await until(lambda: rig.count("delivered") == 2, timeout=120)  # after the timeouts and a retry
        await until(lambda: sample(rig.metrics.text(), "winkr_webhook_events_waiting") == 0)
        text = rig.metrics.text()
        assert rig.count("retry") == 3  # two timeouts, one 503
        assert sample(text, "winkr_webhook_oldest_event_age_seconds") == 0
        assert sample(text, "winkr_webhook_delivery_seconds_count") == 2


async def test_a_graceful_restart_mid_attempt_delivers_it_again_with_the_same_id(
        tmp_path: Path, watchdog: dict[str, Any]) -> None:
    settings = webhook_settings(tmp_path, webhook_timeout_seconds=10.0)
    hanging = Endpoint(mode="hang")
    async with webhook_server(settings, hanging, watchdog) as harness:
        alice = await harness.connect("alice")
        conv = await harness.conversation(alice, "bob")
        await send(alice, conv, "are you there?")
        await until(lambda: len(hanging.attempts) == 1)
    answering = Endpoint()
    async with webhook_server(settings, answering, watchdog):
        restarted = trio.current_time()
        await until(lambda: len(answering.attempts) == 1, timeout=60)
        assert answering.attempts[0].at - restarted <= 10 + 15  # after the lease of the lost attempt
        assert answering.attempts[0].headers["webhook-id"] == hanging.attempts[0].headers["webhook-id"]
        assert answering.attempts[0].body == hanging.attempts[0].body
        await until(lambda: outbox_rows(settings) == [])


@pytest.mark.parametrize("mode", ["hang", "refuse"])
async def test_a_dead_endpoint_never_slows_the_chat(tmp_path: Path, watchdog: dict[str, Any], mode: str) -> None:
    endpoint = Endpoint(mode=mode)
    settings = webhook_settings(tmp_path, limits={"messages_per_minute": 0, "messages_per_hour": 0,
                                                  "messages_per_day": 0})
    async with webhook_server(settings, endpoint, watchdog) as harness:
        alice = await harness.connect("alice")
        conv = await harness.conversation(alice, "bob")
        for n in range(40):
            before = trio.current_time()
            await send(alice, conv, f"message {n}")
            # Under autojump, waiting on a hanging attempt would move the clock by its timeout.
            assert trio.current_time() - before < 0.001
        await until(lambda: len(endpoint.attempts) >= (8 if mode == "hang" else 2), timeout=30)
        await trio.sleep(60)
        assert endpoint.max_in_flight <= 8  # bounded concurrency
        assert len(outbox_rows(settings)) == 40


# --- message.created -------------------------------------------------------------------------

async def test_message_created_goes_exactly_to_recipients_without_an_open_connection(
        tmp_path: Path, watchdog: dict[str, Any]) -> None:
    endpoint = Endpoint()
    async with webhook_server(webhook_settings(tmp_path), endpoint, watchdog) as harness:
        alice = await harness.connect("alice", token=harness.token(
            "alice", username="Alice", avatar_url="https://cdn.example.com/alice.png"))
        bob = await harness.connect("bob")  # connected, never joins
        conv = await harness.conversation(alice, "bob", "carol")  # carol never connected
        await alice.request("conversation:join", {"conversation_id": conv})
        ack = await send(alice, conv, "hello both", client_message_id="c-1")
        await until(lambda: len(endpoint.attempts) == 1)
        await send(alice, conv, "hello both", client_message_id="c-1")  # a resend is no new message
        await trio.sleep(30)
        assert len(endpoint.attempts) == 1
        attempt = endpoint.attempts[0]
        assert attempt.headers["content-type"] == "application/json"
        assert attempt.headers["webhook-id"].startswith("msg_")
        payload = attempt.verified()
        assert payload == {"type": "message.created", "timestamp": ack["data"]["message"]["created_at"], "data": {
            "recipient_id": "carol", "conversation_id": conv, "message": ack["data"]["message"],
            "sender": {"id": "alice", "username": "Alice", "avatar_url": "https://cdn.example.com/alice.png"},
            "unread_count": 1}}

        # carol connects (without joining) and bob leaves: now only bob gets one.
        carol = await harness.connect("carol")
        await alice.expect("user:online", where=lambda e: e["data"]["user_id"] == "carol")
        await bob.close()
        await alice.expect("user:offline", where=lambda e: e["data"]["user_id"] == "bob")
        await send(alice, conv, "and again")
        await until(lambda: len(endpoint.attempts) == 2)
        await trio.sleep(30)
        assert [a.verified()["data"]["recipient_id"] for a in endpoint.attempts[1:]] == ["bob"]
        assert endpoint.attempts[1].verified()["data"]["unread_count"] == 2

        # Connected (joined or not), nobody gets one.
        await carol.request("conversation:join", {"conversation_id": conv})
        bob = await harness.connect("bob")
        await alice.expect("user:online", where=lambda e: e["data"]["user_id"] == "bob")
        await send(alice, conv, "everyone is here")
        await trio.sleep(30)
        assert len(endpoint.attempts) == 2


async def test_message_created_carries_the_masked_message_and_system_messages(
        tmp_path: Path, watchdog: dict[str, Any]) -> None:
    endpoint = Endpoint()
    async with webhook_server(webhook_settings(tmp_path), endpoint, watchdog) as harness:
        service = await harness.connect("matchmaker", service=True)
        reply = await service.request("conversation:create", {"participant_ids": ["alice", "bob"]})
        conv = reply["data"]["conversation"]["id"]
        system = await service.request("message:send", {"conversation_id": conv, "type": "system",
                                                        "content": "You matched!", "metadata": {}})
        assert system["event"] == "message:new", system
        await until(lambda: len(endpoint.attempts) == 2)
        by_recipient = {a.verified()["data"]["recipient_id"]: a.verified()["data"] for a in endpoint.attempts}
        assert sorted(by_recipient) == ["alice", "bob"]
        assert by_recipient["bob"]["message"]["type"] == "system"
        assert by_recipient["bob"]["sender"]["id"] == "matchmaker"
        assert len({a.headers["webhook-id"] for a in endpoint.attempts}) == 2

        alice = await harness.connect("alice")
        ack = await send(alice, conv, "mail me at jane.doe@example.com")
        await until(lambda: len(endpoint.attempts) == 3)
        data = endpoint.attempts[2].verified()["data"]
        assert data["recipient_id"] == "bob"
        assert "jane.doe" not in data["message"]["content"]
        assert data["message"] == ack["data"]["message"]
        assert data["unread_count"] == 2  # the system message and this one


async def test_only_the_configured_events_are_stored(tmp_path: Path, watchdog: dict[str, Any]) -> None:
    for name, overrides in (("off", {"webhook_url": ""}), ("filtered", {"webhook_events": ["user.blocked"]})):
        (tmp_path / name).mkdir()
        settings = webhook_settings(tmp_path / name, **overrides)
        endpoint = Endpoint()
        async with webhook_server(settings, endpoint, watchdog) as harness:
            alice = await harness.connect("alice")
            conv = await harness.conversation(alice, "bob")
            await send(alice, conv, "hi")
            await trio.sleep(10)
        assert outbox_rows(settings) == [] and endpoint.attempts == []


# --- a real receiver on loopback (real clock) -------------------------------------------------

@pytest.mark.trio(run=trio.run)
async def test_a_real_receiver_answering_500_then_200_gets_the_same_id_twice(
        tmp_path: Path, watchdog: dict[str, Any]) -> None:
    with Receiver(statuses=[500]) as receiver:
        settings = webhook_settings(tmp_path, webhook_url=receiver.url, webhook_timeout_seconds=5.0)
        # The first retry exactly 1.2 s later: another second in webhook-timestamp.
        async with webhook_server(settings, None, watchdog, Backoff(first=1.2, rng=AlwaysTheCeiling())) as harness:
            alice = await harness.connect("alice")
            conv = await harness.conversation(alice, "bob")
            ack = await send(alice, conv, "over loopback")
            acked_at = time.time()
            first = await trio.to_thread.run_sync(receiver.next, 10.0)
            second = await trio.to_thread.run_sync(receiver.next, 10.0)
    assert (first.status, second.status) == (500, 200)
    assert first.path == second.path == "/hooks/winkr"
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    for attempt in (first, second):
        payload = Webhook(WEBHOOK_SECRET).verify(attempt.body, attempt.headers)
        assert payload["data"]["message"] == ack["data"]["message"]
        # webhook-timestamp is the attempt's second, floored: the receipt is at or after it, and
        # after it by the fraction of that second plus the loopback transit (the old bound of 1 s
        # failed whenever an attempt started in the last milliseconds of a second).
        stamp = int(attempt.headers["webhook-timestamp"])
        assert stamp <= attempt.at < stamp + 1.5, (stamp, attempt.at)
    assert first.at - acked_at < 1.0  # delivered at once (nudged), not at some later poll
    assert 1.1 <= second.at - first.at < 3.0
    assert first.client_port == second.client_port  # one kept-alive connection


# --- kill -9 (a real process) -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_an_undelivered_event_survives_kill_9(tmp_path: Path, servers: Servers) -> None:
    from websockets.asyncio.client import connect

    db = tmp_path / "winkr.db"
    hook_port = free_port()  # nothing listens there yet: the endpoint is down
    env = dict(WINKR_JWT_SECRET=SECRET, WINKR_DB=str(db), WINKR_WEBHOOK_SECRET=WEBHOOK_SECRET,
               WINKR_WEBHOOK_URL=f"http://127.0.0.1:{hook_port}/hooks/winkr")

    def cli(*args: str) -> str:
        done = winkr(list(args), tmp_path, **env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    conv = json.loads(cli("conversation", "create", "alice", "bob"))["id"]
    token = cli("token", "alice").strip()
    first = servers.start(None, **env)
    proc, port = first.proc, first.port

    async def send_one() -> dict[str, Any]:
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {token}"},
                           open_timeout=10) as ws:
            await ws.send(json.dumps({"event": "message:send", "ref": "m1", "data": {
                "conversation_id": conv, "type": "text", "content": "are you awake?", "metadata": {}}}))
            return await reply_to(ws, "m1")

    ack = asyncio.run(send_one())
    assert ack["event"] == "message:new", ack
    # Wait until the first attempt has failed and been rescheduled (not merely leased).
    deadline, row = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as reader:
            row = reader.execute("SELECT id, attempts, next_attempt_at FROM webhook_events").fetchone()
        if row is not None and row[1] >= 1 and row[2] < time.time() + 15:  # a lease is 25 s
            break
        time.sleep(0.05)
    assert row is not None and row[1] >= 1, row
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    with Receiver(port=hook_port) as receiver:
        servers.start(None, **env)
        got = receiver.next(timeout=20)
        payload = Webhook(WEBHOOK_SECRET).verify(got.body, got.headers)
    assert got.headers["webhook-id"] == row[0]
    assert payload["type"] == "message.created"
    assert payload["data"]["recipient_id"] == "bob"
    assert payload["data"]["message"] == ack["data"]["message"]
