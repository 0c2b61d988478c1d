"""The server API as the app's backend uses it (contract §13): ``winkr serve --api-port`` as a
real process, HTTP/1.1 over real loopback sockets (hypercorn), real time, every wait bounded;
``winkr api-key``; and a property-based run of schemathesis against the live
``/v1/openapi.json`` (a bounded number of examples per endpoint)."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from websockets.asyncio.client import connect

from winkr.api.openapi import openapi_document
from winkr.config import Settings

SECRET = "api-live-test-secret-0123456789abcdef01234"
KEY = "live-api-key-0123456789abcdef"
START_TIMEOUT = 20.0
EXAMPLES = 25  # per endpoint and mode: ~13 x 2 x 25 requests, a few seconds
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws, server API on http://127\.0\.0\.1:(\d+)")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env["WINKR_JWT_SECRET"] = SECRET
    env.update(extra)
    return env


def winkr(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "winkr", *args], cwd=cwd, env=environment(**env),
                          capture_output=True, text=True, timeout=30)


class Server:
    def __init__(self, proc: subprocess.Popen[str], ws_port: int, api_port: int, stderr: Path) -> None:
        self.proc, self.ws_port, self.api_port, self.stderr = proc, ws_port, api_port, stderr

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def token(self, user_id: str, cwd: Path) -> str:
        result = winkr(["token", user_id, "--db", str(cwd / "w.db")], cwd)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


def start(tmp_path: Path, *args: str, **env: str) -> Server:
    """``winkr serve --port 0 --api-port 0`` until its listening line (which names both ports)."""
    stderr_path = tmp_path / "serve.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "winkr", "serve", "--port", "0", "--api-port", "0", "--db",
                                 str(tmp_path / "w.db"), *args], cwd=tmp_path, env=environment(**env),
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if match := LISTENING.search(line):
            return Server(proc, int(match.group(1)), int(match.group(2)), stderr_path)
    proc.kill()
    raise AssertionError(f"no listening line; stderr:\n{stderr_path.read_text(errors='replace')}")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Every server a test starts is killed at the end, whatever happened."""
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(timeout=10)


def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh socket; reads the answer until the server closes or the body ends."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
        return int(lines[0].split()[1]), headers, body


# --- the generated key and `winkr api-key` ---------------------------------------------------------

def test_serve_generates_a_private_key_that_api_key_prints(tmp_path: Path, servers: list[Server]) -> None:
    server = start(tmp_path)
    servers.append(server)
    key_file = tmp_path / "w.db.api-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "w.db.api-key" in server.stderr.read_text()  # it says where, never the key itself
    result = winkr(["api-key", "--db", str(tmp_path / "w.db")], tmp_path)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key == key_file.read_text().strip() and len(key) >= 40
    assert key not in server.stderr.read_text()
    with httpx.Client(base_url=server.api, timeout=10) as api:
        assert api.get("/v1/users/alice/presence").status_code == 401
        ok = api.get("/v1/users/alice/presence", headers={"authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["online"] is False
        started = time.monotonic()
        assert server.stop() == 0  # an idle keep-alive connection does not hold the shutdown
        assert time.monotonic() - started < 5
    # A restart keeps the same key.
    server = start(tmp_path)
    servers.append(server)
    assert key_file.read_text().strip() == key


def test_api_key_never_makes_a_key_the_server_would_not_use(tmp_path: Path) -> None:
    result = winkr(["api-key", "--db", str(tmp_path / "w.db")], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "winkr serve --api-port" in result.stderr
    assert not (tmp_path / "w.db.api-key").exists()
    configured = winkr(["api-key", "--db", str(tmp_path / "w.db")], tmp_path, WINKR_API_KEYS="k-one,k-two")
    assert (configured.returncode, configured.stdout) == (0, "k-one\n")
    config = tmp_path / "w.toml"
    config.write_text("api_port = 8099\n")
    made = winkr(["api-key", "--db", str(tmp_path / "w.db"), "--config", str(config)], tmp_path)
    assert made.returncode == 0 and made.stdout.strip() == (tmp_path / "w.db.api-key").read_text().strip()


# --- HTTP over loopback ------------------------------------------------------------------------------

def test_the_api_over_loopback_drives_the_live_server(tmp_path: Path, servers: list[Server]) -> None:
    server = start(tmp_path, WINKR_API_KEYS=f"{KEY},another-key-98765")
    servers.append(server)
    assert not (tmp_path / "w.db.api-key").exists()  # keys configured: none generated
    token = server.token("alice", tmp_path)
    auth = {"authorization": f"Bearer {KEY}"}

    async def scenario() -> None:
        async with connect(f"ws://127.0.0.1:{server.ws_port}/ws",
                           additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
            assert json.loads(await ws.recv())["event"] == "connection:established"
            async with httpx.AsyncClient(base_url=server.api, headers=auth, timeout=10) as api:
                assert (await api.get("/healthz")).json() == {"status": "ok"}
                assert (await api.get("/readyz")).json() == {"status": "ready"}
                created = await api.post("/v1/conversations", json={"participant_ids": ["alice", "bob"]})
                assert created.status_code == 201
                conversation_id = created.json()["conversation"]["id"]
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert event["event"] == "conversation:created"
                posted = await api.post(f"/v1/conversations/{conversation_id}/messages", json={"content": "Hi!"})
                assert posted.status_code == 201 and posted.json()["message"]["sender_id"] == "system"
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert event["event"] == "conversation:unread"
                presence = (await api.get("/v1/users/alice/presence")).json()
                assert (presence["online"], presence["connections"]) == (True, 1)
                gone = await api.post("/v1/users/alice/disconnect", json={"revoke_tokens": True})
                assert gone.json() == {"closed_connections": 1}
                closing = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert closing["data"] == {"reason": "disconnected", "code": 4004, "timestamp": closing["data"][
                    "timestamp"]}
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 4004

    asyncio.run(scenario())
    # The revoked token is refused at the handshake, also after a restart.
    status, _, body = raw_http(server.ws_port, _upgrade(token))
    assert status == 401 and json.loads(body)["data"]["code"] == "UNAUTHORIZED"
    assert server.stop() == 0
    server = start(tmp_path, WINKR_API_KEYS=KEY)
    servers.append(server)
    status, _, _ = raw_http(server.ws_port, _upgrade(token))
    assert status == 401
    assert server.stop() == 0


def _upgrade(token: str) -> bytes:
    return (f"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()


def test_errors_over_loopback_are_json(tmp_path: Path, servers: list[Server]) -> None:
    server = start(tmp_path, WINKR_API_KEYS=KEY)
    servers.append(server)
    auth = f"Authorization: Bearer {KEY}\r\n"
    cases = [
        (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404, "NOT_FOUND"),
        (f"PATCH /v1/conversations/c HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(), 405, "VALIDATION_ERROR"),
        (f"POST /v1/conversations HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 70000\r\n\r\n".encode(), 413,
         "MESSAGE_TOO_LARGE"),
        (f"POST /v1/conversations HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 5\r\n\r\n{{bad}}".encode(), 400,
         "VALIDATION_ERROR"),
        (b"GET /v1/users/a/presence HTTP/1.1\r\nHost: x\r\n\r\n", 401, "UNAUTHORIZED"),
    ]
    for request, status, code in cases:
        got, headers, body = raw_http(server.api_port, request)
        assert (got, headers["content-type"]) == (status, "application/json"), body
        assert json.loads(body)["error"]["code"] == code
    assert server.stop() == 0


# --- schemathesis against the live document ----------------------------------------------------------

@pytest.fixture(scope="module")
def live_api(tmp_path_factory: Any) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp("schemathesis")
    # Limits off: random requests must meet the schema, not the rate limits.
    server = start(tmp_path, WINKR_API_KEYS=KEY, WINKR_MESSAGES_PER_MINUTE="0", WINKR_MESSAGES_PER_HOUR="0",
                   WINKR_MESSAGES_PER_DAY="0")
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
    server.proc.wait(timeout=10)


OPERATIONS = [
    (method.upper(), path) for path, item in openapi_document(Settings())["paths"].items()
    for method in item if method != "parameters"]


def _seeded_strategies(server: Server, operation: Any, method: str, path: str) -> list[Any]:
    """Strategies that also reach the success statuses: fuzzed requests on a conversation that
    exists (a fresh one per operation) and on users with plain ids; creating a plain pair."""
    strategies = []
    if "{conversation_id}" in path:
        partner = f"partner-of-{method}-{path}"  # a pair of its own: closing it spoils no other test
        response = httpx.post(f"{server.api}/v1/conversations", json={"participant_ids": ["alice", partner]},
                              headers={"authorization": f"Bearer {KEY}"}, timeout=10)
        conversation_id = response.json()["conversation"]["id"]
        strategies.append(operation.as_strategy(path_parameters={"conversation_id": conversation_id}))
    if "{user_id}" in path:
        fixed = {"user_id": "alice", **({"blocked_id": "bob"} if "{blocked_id}" in path else {})}
        strategies.append(operation.as_strategy(path_parameters=fixed))
    if (method, path) == ("POST", "/v1/conversations"):
        strategies.append(operation.as_strategy(body={"participant_ids": ["carol", "dave"]}))
    return strategies


@pytest.mark.parametrize("method, path, mode", [
    (method, path, mode) for method, path in OPERATIONS for mode in GenerationMode
    if mode.is_positive or path not in ("/healthz", "/readyz", "/v1/openapi.json")])  # (no input to spoil)
def test_the_live_api_matches_its_openapi_document(live_api: Server, method: str, path: str,
                                                   mode: GenerationMode) -> None:
    """Every endpoint with schema-valid and schema-invalid inputs: no server error, documented
    statuses, content types and response schemas, invalid input refused, the key enforced
    (schemathesis' default checks)."""
    # The key as the document's security scheme ("apiKey", HTTP bearer), so that schemathesis
    # knows it is the credential (``ignored_auth`` leaves it out or spoils it on purpose).
    config = schemathesis.Config.from_str(f'[auth.openapi.apiKey]\nbearer = "{KEY}"\n')
    schema = schemathesis.openapi.from_url(f"{live_api.api}/v1/openapi.json", config=config)
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    if mode.is_positive:
        strategy = st.one_of(strategy, *_seeded_strategies(live_api, operation, method, path))

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    check()
