"""Real ``winkr serve`` nodes on one PostgreSQL schema and one Redis, for the cluster tests on
real engines (tests/test_cluster_processes.py): starting nodes (and a ``redis-server`` of the
test's own), and a small trio WebSocket client that records everything it receives.

Everything here runs on the real clock (the tests are ``@pytest.mark.trio(run=trio.run)``),
talks to 127.0.0.1 only, and every wait is bounded.
"""
from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, connect_websocket_url

SECRET = "cluster-process-test-secret-0123456789abcdef"
WAIT = 30.0  # seconds: any single expectation; the tests are bounded by these


def token(user_id: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user_id, "username": user_id, "iat": now - 5, "exp": now + 3600}, SECRET,
                      algorithm="HS256")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A ``redis-server`` of the test's own on a free port (no persistence), killed by PID: the
    shared Redis is never restarted."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (.ci/run installs it)"
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Progress:
    """Something the test's own tasks move on (acknowledgements counted): ``notify`` after each
    step, ``wait_until`` a condition holds."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        with trio.fail_after(timeout):
            while not condition():
                await self._changed.wait()


@attrs.define
class Peer:
    """One client connection: every event it got (in order), and requests by ref."""

    user_id: str
    url: str
    ws: WebSocketConnection | None = None
    events: list[dict[str, Any]] = attrs.Factory(list)
    closed: trio.Event = attrs.Factory(trio.Event)
    changed: trio.Event = attrs.Factory(trio.Event)
    refs: Any = attrs.Factory(lambda: (f"r{n}" for n in itertools.count()))

    async def connect(self, nursery: trio.Nursery, url: str | None = None) -> None:
        """Connect (to ``url``: another node) and wait for ``connection:established``; retries
        a refused handshake (a node still starting, a slot not yet free, 503 while Redis is
        away) until ``WAIT``. The connection lives in a task of ``nursery``."""
        self.url = url or self.url
        deadline = trio.current_time() + WAIT
        since = len(self.events)
        while not await nursery.start(self._hold, self.url):
            assert trio.current_time() < deadline, f"{self.user_id} could not connect to {self.url}"
            await trio.sleep(0.2)
        await self.wait_for(lambda e: e["event"] == "connection:established", since=since)

    async def _hold(self, url: str, *, task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED) -> None:
        """One connection, until it closes; reports whether the handshake was accepted. (A
        refusal is raised by trio-websocket's reader task: it gets a nursery of its own.)"""
        started = False
        try:
            async with trio.open_nursery() as inner:
                ws = await connect_websocket_url(inner, url, extra_headers=[
                    ("Authorization", f"Bearer {token(self.user_id)}")])
                self.ws, self.closed = ws, trio.Event()
                started = True
                task_status.started(True)
                await self._read(ws)
                inner.cancel_scope.cancel()
        except* (HandshakeError, ConnectionClosed, OSError):
            pass  # refused (not started), or the node went away (the reader marked it closed)
        if not started:
            task_status.started(False)

    async def _read(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                self.events.append(orjson.loads(await ws.get_message()))
                self._wake()
        except ConnectionClosed:
            pass
        finally:
            if self.ws is ws:
                self.closed.set()
                self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], since: int = 0,
                       timeout: float = WAIT) -> dict[str, Any]:
        """The first event from index ``since`` on that ``match``es (waiting up to ``timeout``)."""
        with trio.fail_after(timeout):
            while True:
                for event in self.events[since:]:
                    if match(event):
                        return event
                await self.changed.wait()

    async def send(self, event: str, data: dict[str, Any], ref: str | None = None) -> str:
        ref = ref or next(self.refs)
        assert self.ws is not None
        await self.ws.send_message(orjson.dumps({"event": event, "data": data, "ref": ref}).decode())
        return ref

    async def request(self, event: str, data: dict[str, Any], timeout: float = WAIT) -> dict[str, Any]:
        """Send and wait for the reply carrying its ref; raises ``ConnectionClosed`` when the
        connection ends first."""
        since = len(self.events)
        ref = await self.send(event, data)
        with trio.fail_after(timeout):
            while True:
                for reply in self.events[since:]:
                    if reply.get("ref") == ref:
                        return reply
                if self.closed.is_set():
                    raise ConnectionClosed(None)
                await self.changed.wait()

    def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        """The ``message:new`` broadcasts received for the conversation (not acknowledgements)."""
        return [e["data"]["message"] for e in self.events if e["event"] == "message:new" and "ref" not in e
                and e["data"]["message"]["conversation_id"] == conversation_id]

    async def aclose(self) -> None:
        if self.ws is not None:
            with trio.move_on_after(2):
                await self.ws.aclose()
