"""The operator interface (contract §1) as a user runs it: real processes, real loopback
sockets, real time (every wait bounded)."""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import TIMESTAMP
from processes import RunningServer, Servers, recv_json, reply_to, winkr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

SECRET = "cli-test-secret-0123456789abcdef0123456789"


def stop(server: RunningServer, sig: int) -> int:
    """Send ``sig`` and return the exit status; it must come within 10 seconds."""
    started = time.monotonic()
    server.proc.send_signal(sig)
    try:
        status = server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 10 s after {signal.Signals(sig).name}:\n{server.log_text()}") from None
    assert time.monotonic() - started < 10
    return status


# --- winkr token -------------------------------------------------------------------------------

def test_token_prints_only_a_verifiable_token(tmp_path: Path) -> None:
    before = int(time.time())
    result = winkr(["token", "alice", "--username", "Alice A", "--ttl", "600", "--db",
                    str(tmp_path / "w.db")], tmp_path, WINKR_JWT_SECRET=SECRET)
    after = int(time.time()) + 1
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    claims = jwt.decode(lines[0], SECRET, algorithms=["HS256"])
    assert jwt.get_unverified_header(lines[0])["alg"] == "HS256"
    assert claims["sub"] == "alice"
    assert claims["username"] == "Alice A"
    assert before + 600 <= claims["exp"] <= after + 600
    assert not (tmp_path / "w.db.secret").exists()  # a configured secret is never replaced


@pytest.mark.parametrize("args", [
    ["bob "], [""], ["a\u200bb"], ["x" * 65], ["bob", "--avatar-url", "javascript:alert(1)"],
    ["bob", "--username", "tab\there"], ["bob", "--ttl", "-5"], ["bob", "--ttl", "0"], ["bob", "--ttl", "1e20"],
], ids=repr)
def test_token_refuses_to_print_a_token_the_server_would_refuse(tmp_path: Path, args: list[str]) -> None:
    """Found by probing: each of these printed a token, and the server answered it with 401."""
    result = winkr(["token", *args, "--db", str(tmp_path / "w.db")], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("winkr: "), result.stderr


# --- the generated secret ----------------------------------------------------------------------

def test_generated_secret_is_private_and_used_by_token(tmp_path: Path, servers: Servers) -> None:
    db = tmp_path / "data" / "chat.db"
    db.parent.mkdir()
    server = servers.start(db)
    secret_file = Path(str(db) + ".secret")
    assert secret_file.exists(), list(db.parent.iterdir())
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    assert "chat.db.secret" in server.log_text()  # it says so in its log

    result = winkr(["token", "alice", "--db", str(db)], tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.decode(token, secret, algorithms=["HS256"])["sub"] == "alice"

    async def scenario() -> None:
        async with connect(server.url, additional_headers={"Authorization": f"Bearer {token}"},
                           open_timeout=10) as ws:
            hello = await recv_json(ws)
            assert hello["event"] == "connection:established", hello
            assert hello["data"]["user_id"] == "alice"

    asyncio.run(scenario())
    assert stop(server, signal.SIGTERM) == 0
    assert secret_file.read_text().strip() == secret


# --- winkr conversation create --------------------------------------------------------------------

def test_conversation_create_prints_one_json_object(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    result = winkr(["conversation", "create", "anna", "ben", "--db", str(db)], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    conversation = json.loads(lines[0])
    assert set(conversation) == {"id", "participant_ids", "created_at"}
    assert isinstance(conversation["id"], str) and conversation["id"]
    assert sorted(conversation["participant_ids"]) == ["anna", "ben"]
    assert TIMESTAMP.match(conversation["created_at"]), conversation


@pytest.mark.parametrize("user_ids", [["bob ", "anna"], ["anna", "b\u200bob"], ["anna", "x" * 65]], ids=repr)
def test_conversation_create_without_a_server_refuses_ids_the_server_refuses(
        tmp_path: Path, user_ids: list[str]) -> None:
    """Found by probing: with no server running, the CLI wrote these straight into the database
    (through a running server they were refused with VALIDATION_ERROR)."""
    db = tmp_path / "w.db"
    result = winkr(["conversation", "create", *user_ids, "--db", str(db)], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.startswith("winkr: participant_ids."), result.stderr
    if db.exists():
        with sqlite3.connect(db) as check:
            assert check.execute("SELECT count(*) FROM conversations").fetchone() == (0,)


# --- winkr serve, end to end, and graceful shutdown -----------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_end_to_end_then_graceful_shutdown(tmp_path: Path, servers: Servers, sig: int) -> None:
    db = tmp_path / "live.db"
    server = servers.start(db, WINKR_JWT_SECRET=SECRET)

    # The CLI works against the running server's database.
    created = winkr(["conversation", "create", "alice", "bob", "--db", str(db)], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert created.returncode == 0, created.stderr
    listed_conversation = json.loads(created.stdout)
    token = winkr(["token", "alice", "--db", str(db)], tmp_path, WINKR_JWT_SECRET=SECRET).stdout.strip()

    acked: dict[str, Any] = {}
    signalled: list[float] = []

    async def scenario() -> None:
        async with connect(server.url, additional_headers={"Authorization": f"Bearer {token}"},
                           open_timeout=10) as ws:
            hello = await recv_json(ws)
            assert hello["event"] == "connection:established", hello

            await ws.send(json.dumps({"event": "conversation:list", "data": {}, "ref": "l1"}))
            listing = await reply_to(ws, "l1")
            assert listing["event"] == "conversation:list", listing
            assert listed_conversation["id"] in [c["id"] for c in listing["data"]["conversations"]]

            await ws.send(json.dumps({"event": "conversation:create",
                                      "data": {"participant_ids": ["carol"]}, "ref": "c1"}))
            created_reply = await reply_to(ws, "c1")
            assert created_reply["event"] == "conversation:created", created_reply
            conv = created_reply["data"]["conversation"]["id"]

            await ws.send(json.dumps({"event": "message:send", "ref": "m1", "data": {
                "conversation_id": conv, "content": "hello over loopback", "type": "text", "metadata": {}}}))
            ack = await reply_to(ws, "m1")
            assert ack["event"] == "message:new", ack
            assert ack["data"]["message"]["content"] == "hello over loopback"
            acked.update(ack["data"]["message"])

            server.proc.send_signal(sig)
            signalled.append(time.monotonic())
            events = []
            with pytest.raises(ConnectionClosed) as info:
                async with asyncio.timeout(10):
                    while True:
                        events.append(json.loads(await ws.recv()))
            assert events and events[-1]["event"] == "connection:closed", events
            assert events[-1]["data"]["reason"] == "server_shutdown"
            assert events[-1]["data"]["code"] == 1001
            assert info.value.rcvd is not None, "no close frame from the server"
            assert info.value.rcvd.code == 1001

    try:
        asyncio.run(scenario())
    except BaseException:
        print(server.log_text(), file=sys.stderr)
        raise
    try:
        status = server.proc.wait(timeout=max(0.1, 10 - (time.monotonic() - signalled[0])))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 10 s after the signal:\n{server.log_text()}") from None
    assert status == 0, server.log_text()

    db_conn = sqlite3.connect(db)
    try:
        row = db_conn.execute("SELECT content FROM messages WHERE conversation_id = ? AND seq = ?",
                              (acked["conversation_id"], acked["seq"])).fetchone()
    finally:
        db_conn.close()
    assert row == ("hello over loopback",)


def test_two_listeners_on_one_port_are_refused_naming_both(tmp_path: Path) -> None:
    result = winkr(["serve", "--db", str(tmp_path / "w.db"), "--port", "0", "--metrics-port", "18123",
                    "--api-port", "18123"], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert result.returncode == 2
    assert "--metrics-port and --api-port are all 18123" in result.stderr
    assert not (tmp_path / "w.db").exists()
