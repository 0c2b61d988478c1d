"""``winkr db backup`` and ``winkr db check`` (issue 5, data tools): real processes, a real
server on loopback, every wait bounded and every process killed at the end."""
from __future__ import annotations

import asyncio
import json
import sqlite3
from functools import partial
from pathlib import Path

import processes
import pytest
from processes import RunningServer, Servers, reply_to
from websockets.asyncio.client import connect

from winkr.store import maintenance
from winkr.store.schema import SCHEMA_VERSION, SchemaTooNew, open_database

SECRET = "db-tools-test-secret-0123456789abcdef012345"
winkr = partial(processes.winkr, WINKR_JWT_SECRET=SECRET)  # ``winkr(args, cwd)``: every command with this secret


def make_db(path: Path) -> Path:
    open_database(str(path)).close()
    return path


def set_user_version(path: Path, version: int) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(f"PRAGMA user_version = {version}")
    finally:
        db.close()


@pytest.fixture
def server(tmp_path: Path, servers: Servers) -> RunningServer:
    """``winkr serve --port 0`` on ``tmp_path/live.db``."""
    return servers.start(tmp_path / "live.db", WINKR_JWT_SECRET=SECRET)


async def send_messages(port: int, token: str, texts: list[str]) -> str:
    """Create a conversation with bob, send ``texts``, wait for every ack; return its id."""
    async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {token}"},
                       open_timeout=10) as ws:
        await ws.send(json.dumps({"event": "conversation:create", "data": {"participant_ids": ["bob"]},
                                  "ref": "c1"}))
        created = await reply_to(ws, "c1")
        assert created["event"] == "conversation:created", created
        conversation = created["data"]["conversation"]["id"]
        for n, text in enumerate(texts):
            await ws.send(json.dumps({"event": "message:send", "ref": f"m{n}", "data": {
                "conversation_id": conversation, "content": text, "type": "text", "metadata": {}}}))
            ack = await reply_to(ws, f"m{n}")
            assert ack["event"] == "message:new", ack
        return conversation


# --- backup -------------------------------------------------------------------------------------

def test_backup_while_serving_is_consistent_and_passes_check(tmp_path: Path, server: RunningServer) -> None:
    port = server.port
    token = winkr(["token", "alice", "--db", str(tmp_path / "live.db")], tmp_path).stdout.strip()
    asyncio.run(send_messages(port, token, ["before the backup"]))

    copy = tmp_path / "backups" / "copy.db"
    copy.parent.mkdir()
    result = winkr(["db", "backup", str(copy), "--db", str(tmp_path / "live.db")], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["path"] == str(copy) and report["messages"] == 1, report
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.db"]  # no temporary left behind

    db = sqlite3.connect(copy)
    try:
        assert db.execute("SELECT content FROM messages").fetchall() == [("before the backup",)]
    finally:
        db.close()
    checked = winkr(["db", "check", "--db", str(copy)], tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True

    # The server is undisturbed and keeps writing.
    asyncio.run(send_messages(port, token, ["after the backup"]))
    assert server.proc.poll() is None


def test_backup_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    db = make_db(tmp_path / "w.db")
    target = tmp_path / "copy.db"
    target.write_text("precious")
    refused = winkr(["db", "backup", str(target), "--db", str(db)], tmp_path)
    assert refused.returncode != 0
    assert "exists" in refused.stderr and "--force" in refused.stderr
    assert refused.stdout == ""
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    forced = winkr(["db", "backup", str(target), "--db", str(db), "--force"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["messages"] == 0
    assert maintenance.check(target)["ok"]


def test_backup_of_a_missing_database_fails_and_creates_nothing(tmp_path: Path) -> None:
    result = winkr(["db", "backup", str(tmp_path / "copy.db"), "--db", str(tmp_path / "none.db")], tmp_path)
    assert result.returncode == 1
    assert "no database" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- check --------------------------------------------------------------------------------------

def test_check_healthy_database(tmp_path: Path) -> None:
    db = make_db(tmp_path / "w.db")
    assert winkr(["conversation", "create", "anna", "ben", "--db", str(db)], tmp_path).returncode == 0
    result = winkr(["db", "check", "--db", str(db)], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["integrity"] == ["ok"] and report["foreign_key_violations"] == []
    assert report["schema_version"] == report["code_schema_version"] == SCHEMA_VERSION
    assert report["tables"]["conversations"] == 1 and report["tables"]["participants"] == 2


def test_check_reports_foreign_key_violations(tmp_path: Path) -> None:
    db = make_db(tmp_path / "w.db")
    conn = sqlite3.connect(db)  # foreign keys off on this connection: plant an orphan
    conn.execute("INSERT INTO participants (conversation_id, user_id) VALUES ('nowhere', 'x')")
    conn.commit()
    conn.close()
    result = winkr(["db", "check", "--db", str(db)], tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["foreign_key_violations"][0]["table"] == "participants"


def test_check_and_backup_refuse_a_newer_database(tmp_path: Path) -> None:
    db = make_db(tmp_path / "w.db")
    set_user_version(db, 999)
    for args in (["db", "check"], ["db", "backup", str(tmp_path / "copy.db")]):
        result = winkr([*args, "--db", str(db)], tmp_path)
        assert result.returncode == 2, result
        assert "newer than this code" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "copy.db").exists()
    with pytest.raises(SchemaTooNew):
        maintenance.check(db)


def test_check_of_an_older_database_says_it_needs_migration(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    sqlite3.connect(db).close()  # user_version 0, no tables
    report = maintenance.check(db)
    assert report["ok"] is True and report["needs_migration"] is True and report["tables"] == {}


def test_serve_refuses_a_newer_database_without_a_traceback(tmp_path: Path) -> None:
    db = make_db(tmp_path / "w.db")
    set_user_version(db, 999)
    result = winkr(["serve", "--port", "0", "--db", str(db)], tmp_path)
    assert result.returncode != 0
    assert "newer than this code" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
