"""Test harness: the real server over trio's in-memory streams, a real database, and
trio's MockClock with autojump, so timeouts of minutes take milliseconds.

Every test that runs a server runs on both engines: the ``engine`` fixture is parametrised
``sqlite`` (a file in ``tmp_path``) and ``postgresql`` (a fresh schema in the database at
``WINKR_TEST_POSTGRES_URL``, default ``postgresql://127.0.0.1:5432/test``, dropped after the
test). ``settings`` depends on it, and ``make_settings`` refuses to build settings for a test
that did not ask for it, so no server test can run on one engine by oversight. A test marked
``sqlite_only`` runs on SQLite alone. Without a reachable PostgreSQL the ``postgresql`` half
skips with one line, or fails when ``WINKR_TEST_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it).
"""
from __future__ import annotations

import inspect
import itertools
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import attrs
import orjson
import pytest
import trio
import trio.testing
from processes import Servers
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, wrap_client_stream

from winkr.auth import mint_token
from winkr.clock import trio_wall_clock
from winkr.config import Settings, load_settings
from winkr.server import Server
from winkr.store.engine import to_psycopg
from winkr.store.writer import run_inline

SECRET = "test-secret-please-ignore-0123456789abcdef"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
"""Every timestamp of the protocol: RFC 3339, UTC, milliseconds, ``Z`` (contract §11.11)."""


class _Timestamp:
    """Equal to any string ``TIMESTAMP`` matches, for comparing whole frames."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and TIMESTAMP.match(other) is not None

    def __repr__(self) -> str:
        return "<RFC3339 .mmmZ>"


TS = _Timestamp()
RECV_TIMEOUT = 30.0  # mock seconds: a missing event fails the test, instantly in real time
MAX_FRAME = 32 * 1024  # the default frame limit (contract §8)
URL = "https://cdn.winkr.test/p/abc.jpg"  # a media URL the server accepts
RATE_LIMITS_OFF = {"messages_per_minute": 0, "messages_per_hour": 0, "messages_per_day": 0, "typing_per_minute": 0,
                   "conversations_per_day": 0, "inbound_events_per_second": 0, "status_changes_per_minute": 0}
"""``limits`` for ``make_settings`` that let one user send as much as a test needs."""

POSTGRES_URL = os.environ.get("WINKR_TEST_POSTGRES_URL") or "postgresql://127.0.0.1:5432/test"
REQUIRE_POSTGRES = os.environ.get("WINKR_TEST_REQUIRE_POSTGRES", "") not in ("", "0")
ENGINES = ("sqlite", "postgresql")


@attrs.frozen
class EngineUnderTest:
    """The engine of the running test: its name and, for PostgreSQL, the URL of its own schema."""

    name: str
    database_url: str | None = None  # None: SQLite in tmp_path


_active_engine: list[EngineUnderTest] = []  # set by the `engine` fixture for the test's duration


def make_settings(tmp_path: Any, **overrides: Any) -> Settings:
    """Settings for a test server on the test's engine (the ``engine`` fixture must be active)."""
    # Every trio test has an engine (pytest_generate_tests); a plain test builds settings only
    # (or runs subprocess servers, which are SQLite ones): SQLite in tmp_path.
    limits = overrides.pop("limits", {})
    flags = {"db": str(tmp_path / "winkr.db"), "jwt_secret": SECRET, **overrides}
    if _active_engine and _active_engine[-1].database_url is not None:
        flags.setdefault("database_url", _active_engine[-1].database_url)
    if limits:
        flags["limits"] = limits
    return load_settings(None, flags, environ={})


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "sqlite_only: the test is about SQLite itself; no PostgreSQL run")
    config.addinivalue_line("markers", "sqlite: the SQLite run of a test parametrised over engines")
    config.addinivalue_line("markers", "postgresql: the PostgreSQL run of a test parametrised over engines")
    config.addinivalue_line("markers", "postgres_only: the test is about PostgreSQL itself (row locks, "
                                       "advisory locks, reconnects); no SQLite run")


def pytest_generate_tests(metafunc: Any) -> None:
    # Every trio test may run a server (harness, running, make_settings): all of them run on
    # both engines, whether or not they name ``engine`` (a pure one merely runs twice).
    if "engine" not in metafunc.fixturenames and inspect.iscoroutinefunction(metafunc.function):
        metafunc.fixturenames.append("engine")
    if "engine" in metafunc.fixturenames:
        engines = list(ENGINES)
        if metafunc.definition.get_closest_marker("sqlite_only"):
            engines = ["sqlite"]
        elif metafunc.definition.get_closest_marker("postgres_only"):
            engines = ["postgresql"]
        # marked too, so that `pytest -m postgresql` (or `-m "not postgresql"`) runs one half
        metafunc.parametrize("engine", [pytest.param(name, marks=getattr(pytest.mark, name)) for name in engines],
                             indirect=True, ids=engines)


_postgres: dict[str, Any] = {}  # "admin": a psycopg connection to POSTGRES_URL, or "error": why not


def _postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used for tests (probed once), or None; keeps the connection
    that creates and drops the tests' schemas."""
    if "admin" not in _postgres and "error" not in _postgres:
        try:
            import psycopg

            _postgres["admin"] = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
        except Exception as exc:  # noqa: BLE001 - ImportError or any connection failure: say which
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _postgres["error"] = (f"no PostgreSQL at {POSTGRES_URL} (set WINKR_TEST_POSTGRES_URL): "
                                  f"{type(exc).__name__}: {first_line}")
    return _postgres.get("error")


def _postgres_admin() -> Any:
    """The admin connection; fails the test when PostgreSQL is unusable (the collection hook
    has already marked the PostgreSQL half skipped unless WINKR_TEST_REQUIRE_POSTGRES is set)."""
    problem = _postgres_problem()
    if problem is not None:
        pytest.fail(f"{problem} [WINKR_TEST_REQUIRE_POSTGRES is set: a skip is a failure]", pytrace=False)
    return _postgres["admin"]


def postgres_schema_url(schema: str) -> str:
    """POSTGRES_URL with every connection's search_path set to ``schema``."""
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options={quote(f'-c search_path={schema}')}"


@pytest.fixture(autouse=True)
def _trio_tests_run_on_their_engine(request: Any) -> None:
    """A trio test parametrised over engines without naming ``engine`` (pytest_generate_tests
    adds it) still gets it, before its body calls ``make_settings``."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "engine" in callspec.params:
        request.getfixturevalue("engine")


@pytest.fixture
def engine(request: Any) -> Iterator[EngineUnderTest]:
    """The database engine of this test (parametrised over ``ENGINES`` by pytest_generate_tests)."""
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        chosen = EngineUnderTest("sqlite")
        _active_engine.append(chosen)
        try:
            yield chosen
        finally:
            _active_engine.remove(chosen)
        return
    admin = _postgres_admin()
    schema = f"test_{secrets.token_hex(6)}"
    admin.execute(f"CREATE SCHEMA {schema}")
    chosen = EngineUnderTest("postgresql", postgres_schema_url(schema))
    _active_engine.append(chosen)
    try:
        yield chosen
    finally:
        _active_engine.remove(chosen)
        admin.execute("SET lock_timeout = '10s'")
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


def query(settings: Settings, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) from the settings' database, on either engine, on
    a connection of its own (autocommit: it sees what the server committed)."""
    database = settings.database
    if database.engine == "sqlite":
        db = sqlite3.connect(database.path, isolation_level=None)
        try:
            return [tuple(row) for row in db.execute(sql, params)]
        finally:
            db.close()
    import psycopg

    with psycopg.connect(database.conninfo, autocommit=True) as connection:
        return [tuple(row) for row in connection.execute(to_psycopg(sql), params)]


class TaskSteps(trio.abc.Instrument):
    """Counts the scheduler's steps of the tasks whose name ends with ``suffix`` while it is
    added (``trio.lowlevel.add_instrument``): how many times an actor was woken."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


@attrs.define
class Client:
    """A test client: one WebSocket plus the events it received and has not yet looked at."""

    ws: WebSocketConnection
    user_id: str
    refs: Any = attrs.Factory(lambda: (f"r{n}" for n in itertools.count()))
    backlog: list[dict[str, Any]] = attrs.Factory(list)

    async def send(self, event: str, data: dict[str, Any] | None = None, ref: str | None = None) -> str:
        ref = ref if ref is not None else next(self.refs)
        await self.ws.send_message(orjson.dumps({"event": event, "data": data or {}, "ref": ref}).decode())
        return ref

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send_message(frame)

    async def _next(self) -> dict[str, Any]:
        with trio.fail_after(RECV_TIMEOUT):
            return orjson.loads(await self.ws.get_message())

    async def recv(self) -> dict[str, Any]:
        """The next event, in order."""
        if self.backlog:
            return self.backlog.pop(0)
        return await self._next()

    async def expect(self, event: str, ref: str | None = None,
                     where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The first event of this name (and ref) — earlier others are kept for later."""
        for i, msg in enumerate(self.backlog):
            if msg["event"] == event and (ref is None or msg.get("ref") == ref) and (where is None or where(msg)):
                return self.backlog.pop(i)
        while True:
            msg = await self._next()
            if msg["event"] == event and (ref is None or msg.get("ref") == ref) and (where is None or where(msg)):
                return msg
            self.backlog.append(msg)

    async def request(self, event: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send and return the direct reply (success or error) carrying our ref."""
        ref = await self.send(event, data)
        for i, msg in enumerate(self.backlog):
            if msg.get("ref") == ref:
                return self.backlog.pop(i)
        while True:
            msg = await self._next()
            if msg.get("ref") == ref:
                return msg
            self.backlog.append(msg)

    async def nothing_more(self, wait: float = 1.0) -> list[dict[str, Any]]:
        """Whatever arrives within ``wait`` mock seconds (for "nothing else was sent")."""
        got = list(self.backlog)
        self.backlog.clear()
        with trio.move_on_after(wait):
            while True:
                got.append(orjson.loads(await self.ws.get_message()))
        return got

    def events(self) -> list[str]:
        return [m["event"] for m in self.backlog]

    async def close(self) -> None:
        await self.ws.aclose()


@attrs.define
class Harness:
    server: Server
    nursery: trio.Nursery
    settings: Settings

    def token(self, user_id: str, *, ttl: float = 3600, service: bool = False, **claims: Any) -> str:
        return mint_token(self.settings, SECRET, user_id, ttl=ttl, now=self.server.clock(),
                          username=claims.get("username", f"name-{user_id}"),
                          avatar_url=claims.get("avatar_url"), service=service)

    async def open_ws(self, path: str = "/ws", headers: list[tuple[str, str]] | None = None,
                      subprotocols: list[str] | None = None) -> WebSocketConnection:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.server.accept_stream(server_stream)
        return await wrap_client_stream(self.nursery, client_stream, "localhost", path,
                                        subprotocols=subprotocols, extra_headers=headers)

    async def connect(self, user_id: str, *, established: bool = True, token: str | None = None,
                      service: bool = False) -> Client:
        ws = await self.open_ws(headers=bearer(token or self.token(user_id, service=service)))
        return await welcomed(ws, user_id) if established else Client(ws, user_id)

    async def conversation(self, creator: Client, *others: str) -> str:
        reply = await creator.request("conversation:create", {"participant_ids": list(others)})
        assert reply["event"] == "conversation:created", reply
        return reply["data"]["conversation"]["id"]


# --- steps and checks the tests share --------------------------------------------------------------

def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def claims_for(harness: Harness, sub: Any = "alice", ttl: float = 3600, **extra: Any) -> dict[str, Any]:
    """Claims valid now on the harness's clock (drop one by passing it as None)."""
    now = harness.server.clock()
    claims: dict[str, Any] = {"sub": sub, "iat": int(now), "exp": int(now + ttl), **extra}
    return {k: v for k, v in claims.items() if v is not None}


async def welcomed(ws: WebSocketConnection, user_id: str) -> Client:
    """The client of an accepted handshake, once ``connection:established`` named ``user_id``."""
    client = Client(ws, user_id)
    hello = await client.recv()
    assert hello["event"] == "connection:established", hello
    assert hello["data"]["user_id"] == user_id, hello
    return client


async def still_works(client: Client) -> None:
    """The connection keeps serving: a request is answered with its ref."""
    reply = await client.request("conversation:list")
    assert reply["event"] == "conversation:list", reply
    assert isinstance(reply["data"]["conversations"], list), reply


def text(conversation_id: str, content: str = "hello there", **extra: Any) -> dict[str, Any]:
    """``message:send`` data of a text message."""
    return {"conversation_id": conversation_id, "content": content, "type": "text", "metadata": {}, **extra}


async def send_text(client: Client, conversation_id: str, content: str = "hello there", **extra: Any) -> dict[str, Any]:
    """Send a text message; return the acknowledged message object."""
    reply = await client.request("message:send", text(conversation_id, content, **extra))
    assert reply["event"] == "message:new", reply
    return reply["data"]["message"]


async def join(client: Client, conversation_id: str) -> dict[str, Any]:
    reply = await client.request("conversation:join", {"conversation_id": conversation_id})
    assert reply["event"] == "conversation:joined", reply
    return reply


async def history(client: Client, conversation_id: str, **query: Any) -> dict[str, Any]:
    """The data of a ``message:history`` reply (``messages``, ``has_more``)."""
    reply = await client.request("message:history", {"conversation_id": conversation_id, **query})
    assert reply["event"] == "message:history", reply
    return reply["data"]


async def history_messages(client: Client, conversation_id: str) -> list[dict[str, Any]]:
    """The conversation's last 100 messages, oldest first."""
    return (await history(client, conversation_id, limit=100))["messages"]


async def joined_pair(harness: Harness, *, alice_joined: bool = True, bob_joined: bool = True,
                      bob_on: Harness | None = None) -> tuple[Client, Client, str]:
    """alice and bob in one conversation (bob told of it), each joined to its room unless said
    otherwise; whatever the setup sent is read and dropped. ``bob_on``: the server (another
    node of a cluster) bob connects to, ``harness`` if None; alice creates the conversation."""
    alice = await harness.connect("alice")
    bob = await (bob_on or harness).connect("bob")
    conv = await harness.conversation(alice, "bob")
    await bob.expect("conversation:created")
    if alice_joined:
        await join(alice, conv)
    if bob_joined:
        await join(bob, conv)
    await settle(alice, bob)
    return alice, bob, conv


async def send_ok(sender: Client, receiver: Client, conv: str, data: dict[str, Any]) -> dict[str, Any]:
    """Send; check the acknowledgement and that the receiver got the same message; return it."""
    ref = await sender.send("message:send", {"conversation_id": conv, **data})
    ack = await sender.expect("message:new", ref=ref)
    assert ack["ref"] == ref
    message = ack["data"]["message"]
    got = await receiver.expect("message:new")
    assert "ref" not in got, got
    assert got["data"]["message"] == message
    return message


async def send_refused(sender: Client, receiver: Client, conv: str, data: dict[str, Any],
                       code: str, field: str | None) -> dict[str, Any]:
    """Send; check the error, that nothing was stored and the receiver got nothing."""
    ref = await sender.send("message:send", {"conversation_id": conv, **data})
    reply = await sender.expect("error", ref=ref)
    assert_error(reply, code, field, "message:send", ref)
    assert [e for e in await receiver.nothing_more(0.5) if e["event"] in ("message:new", "conversation:unread")] == []
    assert await history_messages(sender, conv) == []
    return reply


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


async def until_closed(client: Client, timeout: float = 30.0) -> tuple[list[dict[str, Any]], int]:
    """Every event up to the server's close frame, and its code; fails after ``timeout``."""
    events = list(client.backlog)
    client.backlog.clear()
    with trio.fail_after(timeout):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                events.append(orjson.loads(await client.ws.get_message()))
    return events, info.value.reason.code


def iso(ts: float) -> str:
    """``ts`` as the server writes timestamps (milliseconds cut, not rounded)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def metric(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` in a Prometheus text scrape (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def assert_refused(rejection: ConnectionRejected, status: int, code: str) -> dict[str, Any]:
    """A handshake refused with this HTTP status and error code; the error's data."""
    assert rejection.status_code == status, (rejection.status_code, rejection.body)
    data = error_body(rejection)["data"]
    assert data["code"] == code, data
    return data


def assert_unauthorized(rejection: ConnectionRejected) -> None:
    assert_refused(rejection, 401, "UNAUTHORIZED")


def run_with_autojump(fn: Any, clock: Any = None, instruments: Any = ()) -> Any:
    """Every trio test runs on MockClock with autojump unless it names its own clock, so no
    test waits for real time by accident."""
    return trio.run(fn, clock=clock or trio.testing.MockClock(autojump_threshold=0),
                    instruments=instruments)


def pytest_collection_modifyitems(items: list[Any]) -> None:
    postgres_items = [item for item in items if item.get_closest_marker("postgresql")]
    if postgres_items and not REQUIRE_POSTGRES and (problem := _postgres_problem()) is not None:
        for item in postgres_items:
            item.add_marker(pytest.mark.skip(reason=problem))
        _postgres["skipped"] = len(postgres_items)
    for item in items:
        if not inspect.iscoroutinefunction(getattr(item, "function", None)):
            continue
        if not any("run" in marker.kwargs for marker in item.iter_markers("trio")):
            item.add_marker(pytest.mark.trio(run=run_with_autojump))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _postgres.get("skipped"):
        terminalreporter.write_line(f"SKIPPED the PostgreSQL half ({_postgres['skipped']} tests): {_postgres['error']}",
                                    yellow=True)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (in mock time) until ``predicate()`` holds: for effects no event announces, such as a
    log line or a gauge written after the client saw its last frame. Fails after ``timeout``."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling by design (see the sleep)
            await trio.sleep(0.01)


async def settle(*clients: Client) -> None:
    """Let everything in flight arrive, and forget it (setup noise)."""
    for client in clients:
        await client.nothing_more()


def concerning(
        events: list[dict[str, Any]], conversation_id: str, event: str | None = None) -> list[dict[str, Any]]:
    """The events that mention the conversation (optionally: only of one name)."""
    return [e for e in events if conversation_id in orjson.dumps(e).decode()
            and (event is None or e["event"] == event)]


def assert_error(
        reply: dict[str, Any], code: str, field: str | None, request_event: str,
        ref: str | None = None) -> None:
    assert reply["event"] == "error", reply
    assert reply["data"]["code"] == code, reply
    assert reply["data"]["request_event"] == request_event, reply
    if field is not None:
        assert reply["data"]["details"]["field"] == field, reply
    if ref is not None:
        assert reply["ref"] == ref, reply


async def refused(harness: Harness, headers: list[tuple[str, str]] | None = None, path: str = "/ws",
                  subprotocols: list[str] | None = None) -> ConnectionRejected:
    """Attempt a handshake that must be refused. trio-websocket raises the rejection from its
    reader task, so the attempt gets a nursery of its own (not the harness's)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    harness.server.accept_stream(server_stream)
    rejections: list[ConnectionRejected] = []
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                ws = await wrap_client_stream(nursery, client_stream, "localhost", path,
                                              subprotocols=subprotocols, extra_headers=headers)
            nursery.cancel_scope.cancel()
            pytest.fail(f"the handshake was accepted (subprotocol {ws.subprotocol!r})")
    except* ConnectionRejected as group:
        rejections.extend(e for e in group.exceptions if isinstance(e, ConnectionRejected))
    assert len(rejections) == 1, rejections
    return rejections[0]


def error_body(rejection: ConnectionRejected) -> dict[str, Any]:
    """The JSON body of a refused handshake: ``{"event": "error", "data": {...}}``."""
    assert rejection.body, "a refused handshake carries a JSON body"
    body = orjson.loads(rejection.body)
    assert body["event"] == "error", body
    assert isinstance(body["data"]["message"], str) and body["data"]["message"], body
    return body


@asynccontextmanager
async def running(settings: Settings, watchdog: dict[str, Any] | None = None,
                  **server_kwargs: Any) -> AsyncIterator[Harness]:
    """One server on ``settings`` for the body of the ``async with``; shut down gracefully
    after it (so a second ``running`` on the same settings is a restart on the same db).
    ``server_kwargs`` go to ``Server`` (a ``limiter`` shared with another node)."""
    if watchdog is not None:
        watchdog["token"] = trio.lowlevel.current_trio_token()
    # The clients' tasks live in a nursery of their own: once the server has shut down
    # (gracefully: within its shutdown_timeout), whatever the clients left unread is dropped.
    async with trio.open_nursery() as clients:
        async with trio.open_nursery() as servers:
            server = await start_server(servers, settings, **server_kwargs)
            try:
                yield Harness(server, clients, settings)
            finally:
                server.request_shutdown()
        clients.cancel_scope.cancel()


async def start_server(nursery: trio.Nursery, settings: Settings, **server_kwargs: Any) -> Server:
    server = Server(settings, SECRET, **{"clock": trio_wall_clock(), "run_sync": run_inline, **server_kwargs})
    await nursery.start(server.serve, [])
    return server


WATCHDOG_SECONDS = 120.0  # real seconds; no test comes near it


@pytest.fixture(autouse=True)
def watchdog() -> Any:
    """Fail instead of hanging when the server never lets (mock) time pass: a task that never
    blocks keeps MockClock's autojump from firing, so no trio timeout could end the test.
    Armed by setting ``watchdog["token"]`` to the running trio token (``harness`` does)."""
    state: dict[str, Any] = {}

    def bite() -> None:
        raise RuntimeError(f"watchdog: no progress in {WATCHDOG_SECONDS} real seconds")

    def fire() -> None:
        if state.get("token") is not None:
            state["token"].run_sync_soon(bite)

    timer = threading.Timer(WATCHDOG_SECONDS, fire)
    timer.daemon = True
    timer.start()
    yield state
    timer.cancel()


@pytest.fixture
def settings(request: Any, tmp_path: Any, engine: EngineUnderTest) -> Settings:
    """The default settings on the test's engine, or overrides given with
    ``parametrize("settings", [{...}], indirect=True)``."""
    return make_settings(tmp_path, **getattr(request, "param", {}))


@pytest.fixture
async def harness(settings: Settings, watchdog: dict[str, Any]) -> AsyncIterator[Harness]:
    watchdog["token"] = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, settings)
        yield Harness(server, nursery, settings)
        server.request_shutdown()
        nursery.cancel_scope.deadline = trio.current_time() + 30


@pytest.fixture
def servers(tmp_path: Any) -> Iterator[Servers]:
    """``servers.start(db, ...)`` runs ``winkr serve`` as a process on loopback (tests/processes.py);
    every one still running at the test's end is killed."""
    started = Servers(tmp_path)
    yield started
    started.kill_all()


# --- Redis (the cluster's shared engine) -----------------------------------------------------------

REDIS_URL = os.environ.get("WINKR_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
REQUIRE_REDIS = os.environ.get("WINKR_TEST_REQUIRE_REDIS", "") not in ("", "0")
_redis: dict[str, str] = {}  # "error": why Redis cannot be used (probed once)


def _redis_problem() -> str | None:
    if "ok" not in _redis and "error" not in _redis:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
            client.ping()
            client.close()
            _redis["ok"] = "yes"
        except Exception as exc:  # noqa: BLE001 - ImportError or any connection failure: say which
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _redis["error"] = (f"no Redis at {REDIS_URL} (set WINKR_TEST_REDIS_URL): "
                               f"{type(exc).__name__}: {first_line}")
    return _redis.get("error")


@pytest.fixture
def redis_url() -> str:
    """The shared test Redis (``WINKR_TEST_REDIS_URL``): the test skips with one line when none
    answers, or fails when ``WINKR_TEST_REQUIRE_REDIS=1`` (``.ci/run`` sets it)."""
    problem = _redis_problem()
    if problem is not None:
        if REQUIRE_REDIS:
            pytest.fail(f"{problem} [WINKR_TEST_REQUIRE_REDIS is set: a skip is a failure]", pytrace=False)
        pytest.skip(problem)
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted after the test (never anyone else's)."""
    import redis

    prefix = f"winkr-test:{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
