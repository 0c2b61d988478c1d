"""The operator interface on PostgreSQL (contract §16, §17.11): real processes on loopback,
each test in a schema of its own (the ``engine`` fixture), every wait bounded, every process
killed at the end."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings, query
from processes import reply_to, wait_for_port
from websockets.asyncio.client import connect

from winkr.store.schema import SCHEMA_VERSION

SECRET = "pg-cli-test-secret-0123456789abcdef0123456789"
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
NODES = 4
# Runs winkr's CLI with psycopg made unimportable: a machine without the cluster extra.
WITHOUT_PSYCOPG = "import sys; sys.modules['psycopg'] = None; from winkr.cli import main; sys.exit(main())"


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env["WINKR_JWT_SECRET"] = SECRET
    env.update(extra)
    return env


def winkr(args: list[str], cwd: Path, *, python_args: tuple[str, ...] = ("-m", "winkr"),
          **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python_args, *args], cwd=cwd, env=environment(**env),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


@pytest.fixture
def pg_url(tmp_path: Path, engine: Any) -> str:
    url = make_settings(tmp_path).database_url
    assert url is not None and url.startswith("postgresql://")
    return url


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """``serve(args)`` starts ``winkr serve --port 0 ARGS`` and returns (process, port) once it
    listens; every process started is killed at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(args: list[str], name: str = "serve") -> subprocess.Popen[str]:
        stderr_path = tmp_path / f"{name}.stderr"
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "winkr", "serve", "--port", "0", *args], cwd=tmp_path,
                                    env=environment(), stdout=subprocess.PIPE, stderr=stderr, text=True)
        procs.append(proc)
        return proc

    def run(args: list[str], name: str = "serve") -> tuple[subprocess.Popen[str], int]:
        proc = start(args, name)
        port, _ = wait_for_port(proc, tmp_path / f"{name}.stderr", START_TIMEOUT)
        return proc, port

    run.start = start  # type: ignore[attr-defined]
    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def token(cwd: Path, user: str) -> str:
    result = winkr(["token", user], cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def send_one(port: int, cwd: Path, content: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token(cwd, 'alice')}"}
    async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers, open_timeout=10) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["event"] == "connection:established", hello
        await ws.send(json.dumps({"event": "conversation:create", "data": {"participant_ids": ["bob"]}, "ref": "c"}))
        conversation = (await reply_to(ws, "c"))["data"]["conversation"]["id"]
        await ws.send(json.dumps({"event": "message:send", "ref": "m", "data": {
            "conversation_id": conversation, "type": "text", "content": content, "client_message_id": content}}))
        ack = await reply_to(ws, "m")
        assert ack["event"] == "message:new", ack
        message: dict[str, Any] = ack["data"]["message"]
        return message


@pytest.mark.postgres_only
def test_serve_on_postgresql_then_db_check(tmp_path: Path, pg_url: str, serve: Any) -> None:
    proc, port = serve(["--database-url", pg_url])
    acked = asyncio.run(send_one(port, tmp_path, "hello postgres"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    settings = make_settings(tmp_path)
    assert query(settings, "SELECT seq, content FROM messages WHERE conversation_id = ?",
                 (acked["conversation_id"],)) == [(1, "hello postgres")]

    result = winkr(["db", "check"], tmp_path, WINKR_DATABASE_URL=pg_url)  # the URL from the environment
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engine"] == "postgresql" and report["ok"] is True
    assert report["schema_version"] == SCHEMA_VERSION and report["needs_migration"] is False
    assert report["tables"]["messages"] == 1 and report["tables"]["conversations"] == 1
    assert "options=" in report["database"]


@pytest.mark.postgres_only
def test_nodes_that_start_together_on_an_empty_database_all_start(tmp_path: Path, pg_url: str, serve: Any) -> None:
    procs = [serve.start(["--database-url", pg_url], f"node{n}") for n in range(NODES)]
    ports = [wait_for_port(proc, tmp_path / f"node{n}.stderr", START_TIMEOUT)[0] for n, proc in enumerate(procs)]
    assert len(set(ports)) == NODES
    settings = make_settings(tmp_path)
    assert query(settings, "SELECT version FROM schema_migrations ORDER BY version") == [
        (n,) for n in range(1, SCHEMA_VERSION + 1)]
    # one database, one numbering: messages through two nodes land in their own conversations
    first = asyncio.run(send_one(ports[0], tmp_path, "via node 0"))
    second = asyncio.run(send_one(ports[1], tmp_path, "via node 1"))
    assert first["conversation_id"] == second["conversation_id"]  # the pair's one conversation
    assert (first["seq"], second["seq"]) == (1, 2)


@pytest.mark.postgres_only
@pytest.mark.parametrize("args", [["serve", "--port", "0"], ["db", "check"], ["conversation", "create", "a", "b"]],
                         ids=["serve", "db_check", "conversation_create"])
def test_without_the_cluster_extra_a_postgresql_url_exits_2_naming_it(tmp_path: Path, pg_url: str,
                                                                      args: list[str]) -> None:
    result = winkr([*args, "--database-url", pg_url], tmp_path, python_args=("-c", WITHOUT_PSYCOPG))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pip install 'winkr[cluster]'" in lines[0] and "Traceback" not in result.stderr


def test_without_the_cluster_extra_sqlite_needs_nothing_else(tmp_path: Path) -> None:
    result = winkr(["conversation", "create", "a", "b", "--database-url", "sqlite:///w.db"], tmp_path,
                   python_args=("-c", WITHOUT_PSYCOPG))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "w.db").exists()


@pytest.mark.postgres_only
def test_db_backup_of_postgresql_points_at_pg_dump(tmp_path: Path, pg_url: str) -> None:
    result = winkr(["db", "backup", str(tmp_path / "copy.db"), "--database-url", pg_url], tmp_path)
    assert result.returncode == 2
    assert "pg_dump" in result.stderr and not (tmp_path / "copy.db").exists()


def test_an_unreachable_postgresql_is_one_line_and_exit_2(tmp_path: Path) -> None:
    url = "postgresql://winkr:hunter2@127.0.0.1:1/nowhere"  # port 1: nothing listens there
    result = winkr(["serve", "--port", "0", "--database-url", url], tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot open the database postgresql://winkr:***@127.0.0.1:1/nowhere" in lines[0], lines
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_check_config_names_the_postgresql_database(tmp_path: Path) -> None:
    result = winkr(["check-config", "--database-url", "postgresql://w:pw@db.internal/winkr"], tmp_path)
    assert result.returncode == 0, result.stdout
    assert "database postgresql://w:***@db.internal/winkr" in result.stdout and "pw@" not in result.stdout
    result = winkr(["check-config", "--database-url", "sqlite://w.db"], tmp_path)
    assert result.returncode == 2 and "--database-url: 'sqlite://w.db': a SQLite URL has three slashes" in (
        result.stderr), result.stderr


@pytest.mark.postgres_only
def test_conversation_create_without_a_server_writes_postgresql(tmp_path: Path, pg_url: str) -> None:
    result = winkr(["conversation", "create", "anna", "ben", "--database-url", pg_url], tmp_path)
    assert result.returncode == 0, result.stderr
    conversation = json.loads(result.stdout)
    assert sorted(conversation["participant_ids"]) == ["anna", "ben"]
    report = json.loads(winkr(["db", "check", "--database-url", pg_url], tmp_path).stdout)
    assert report["tables"]["conversations"] == 1 and report["tables"]["participants"] == 2


def test_an_absolute_sqlite_url_from_the_environment_is_the_database(tmp_path: Path) -> None:
    database = tmp_path / "data" / "chat.db"
    database.parent.mkdir()
    url = f"sqlite:///{database}"  # database is absolute: four slashes in all
    assert url.startswith("sqlite:////")
    assert winkr(["conversation", "create", "anna", "ben"], tmp_path, WINKR_DATABASE_URL=url).returncode == 0
    report = json.loads(winkr(["db", "check"], tmp_path, WINKR_DATABASE_URL=url).stdout)
    assert report["engine"] == "sqlite" and report["path"] == str(database) and report["ok"] is True
    assert not (tmp_path / "winkr.db").exists()  # not the default file


def test_the_run_file_goes_beside_the_file_an_sqlite_url_names(tmp_path: Path, serve: Any) -> None:
    """…so that `winkr conversation create` with the same URL finds the running server."""
    database = tmp_path / "data" / "chat.db"
    database.parent.mkdir()
    proc, port = serve(["--database-url", f"sqlite:///{database}"])
    run_file = Path(f"{database}.run.json")
    assert json.loads(run_file.read_text())["url"] == f"ws://127.0.0.1:{port}/ws"
    assert not (tmp_path / "winkr.db.run.json").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0 and not run_file.exists()
