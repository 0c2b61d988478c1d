"""Failures an operator can fix (issue 13) as an operator meets them: the real ``winkr`` CLI
as a subprocess. Each is one line that names the port or path and what to do, exit status 2,
and nothing created; JSON logging means every line is JSON; ``--version``, ``check-config``."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import Servers, environment, winkr

from winkr import __version__

SECRET = "startup-test-secret-0123456789abcdef0123456789"


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- item 2: a port in use ---------------------------------------------------------------------

def test_a_port_in_use_is_one_line_and_creates_nothing(tmp_path: Path, taken_port: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = winkr(["serve", "--port", str(taken_port), "--db", str(data / "w.db")], tmp_path)  # no secret set
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"winkr: port {taken_port} on 127.0.0.1 is already in use "
                                       "(--port 0 picks a free one)")
    assert list(data.iterdir()) == []  # no database, no generated secret


def test_a_metrics_port_in_use_is_one_line_and_creates_nothing(tmp_path: Path, taken_port: int) -> None:
    result = winkr(["serve", "--port", "0", "--metrics-port", str(taken_port), "--db", str(tmp_path / "w.db")],
                   tmp_path)
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"winkr: port {taken_port} on 127.0.0.1 is already in use "
                                       "(--metrics-port 0 picks a free one)")
    assert list(tmp_path.iterdir()) == []


def test_in_json_mode_the_failure_is_a_json_line(tmp_path: Path, taken_port: int) -> None:
    result = winkr(["serve", "--port", str(taken_port), "--log-format", "json", "--db", str(tmp_path / "w.db")],
                   tmp_path)
    assert result.returncode == 2
    entry = json.loads(one_line(result.stderr))
    assert entry["level"] == "error" and "already in use" in entry["msg"]


# --- item 4: a missing database folder -------------------------------------------------------------

def test_a_missing_database_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "there"
    result = winkr(["serve", "--port", "0", "--db", str(missing / "w.db")], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert f"the database folder {missing} does not exist" in line
    assert f"mkdir -p {missing}" in line
    assert not (tmp_path / "not").exists()


def test_a_database_that_is_a_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "w.db").mkdir()
    result = winkr(["serve", "--port", "0", "--db", str(tmp_path / "w.db")], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert result.returncode == 2
    assert f"the database {tmp_path / 'w.db'} is a folder" in one_line(result.stderr)


# --- item 5: winkr token never generates a secret ------------------------------------------------------

def test_token_without_a_secret_says_where_it_looked_and_creates_nothing(tmp_path: Path) -> None:
    result = winkr(["token", "alice"], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert "no JWT secret found" in line
    assert "no WINKR_JWT_SECRET" in line and "no --config file" in line
    assert f"no file {tmp_path / 'winkr.db.secret'}" in line
    assert list(tmp_path.iterdir()) == []

    config = tmp_path / "w.toml"
    config.write_text(f'db = "{tmp_path / "elsewhere.db"}"\n')
    result = winkr(["token", "alice", "--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert f"no jwt_secret in {config}" in result.stderr
    assert f"no file {tmp_path / 'elsewhere.db.secret'}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.toml"]


def test_token_uses_the_secret_file_serve_wrote(tmp_path: Path) -> None:
    (tmp_path / "winkr.db.secret").write_text("s" * 48 + "\n")
    result = winkr(["token", "alice"], tmp_path)
    assert result.returncode == 0, result.stderr
    import jwt

    assert jwt.decode(result.stdout.strip(), "s" * 48, algorithms=["HS256"])["sub"] == "alice"


def test_a_short_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "winkr.db.secret").write_text("abc\n")
    for command in (["token", "alice"], ["serve", "--port", "0"]):
        result = winkr(command, tmp_path)
        assert result.returncode == 2
        assert f"the secret in {tmp_path / 'winkr.db.secret'} is 3 bytes" in one_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["winkr.db.secret"]


def test_the_readme_placeholder_secret_is_refused(tmp_path: Path) -> None:
    result = winkr(["serve", "--port", "0"], tmp_path, WINKR_JWT_SECRET="...")
    assert result.returncode == 2
    assert one_line(result.stderr).startswith("winkr: WINKR_JWT_SECRET is 3 bytes: an HS256 secret needs at least 32")
    assert list(tmp_path.iterdir()) == []


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    result = winkr(["serve"], tmp_path, WINKR_PORT="eighty")
    assert result.returncode == 2
    assert one_line(result.stderr) == "winkr: invalid setting WINKR_PORT='eighty': expected an integer"


# --- item 10: --version and check-config -------------------------------------------------------

def test_version(tmp_path: Path) -> None:
    result = winkr(["--version"], tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith(f"winkr {__version__} (Python {sys.version_info[0]}.{sys.version_info[1]}.")


def test_check_config_passes_a_usable_config(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text(f'db = "{tmp_path / "w.db"}"\nport = 9000\n')
    result = winkr(["check-config", "--config", str(config)], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert all(line.startswith(("ok ", "note ")) for line in lines), lines
    assert any("JWT secret from jwt_secret" in line for line in lines)
    assert any(str(tmp_path / "w.db") in line for line in lines)
    assert list(tmp_path.iterdir()) == [config]  # checking creates nothing


def test_check_config_names_each_problem(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    config = tmp_path / "w.toml"
    config.write_text(f'db = "{tmp_path / "gone" / "w.db"}"\njwt_algorithm = "ES256"\n'
                      f'jwt_public_key = "{bad_key}"\njwt_private_key = "{tmp_path / "missing.pem"}"\n')
    result = winkr(["check-config", "--config", str(config)], tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 3, result.stdout
    assert f"the database folder {tmp_path / 'gone'} does not exist" in errors[0]
    assert f"jwt_public_key {bad_key} is not a usable ES256 key" in errors[1]
    assert f"cannot read jwt_private_key {tmp_path / 'missing.pem'}: No such file or directory" in errors[2]


def test_check_config_reports_a_bad_setting(tmp_path: Path) -> None:
    result = winkr(["check-config"], tmp_path, WINKR_LOG_FORMAT="xml")
    assert result.returncode == 2
    assert "WINKR_LOG_FORMAT must be text or json" in result.stderr


# --- item 7: --log-format json means every line is JSON ------------------------------------------

def test_json_log_format_writes_only_json_lines(tmp_path: Path, servers: Servers) -> None:
    server = servers.start(tmp_path / "w.db", args=["--log-format", "json"])
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=10) == 0
    lines = server.lines
    stdout_lines = []
    while not lines.empty():
        stdout_lines.append(lines.get())
    stderr_lines = server.log_text().splitlines()
    assert stderr_lines, "the generated-secret warning and the shutdown are logged"
    for line in stderr_lines + stdout_lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    assert any("generated one" in json.loads(line)["msg"] for line in stderr_lines)


def test_the_listening_line_is_json_in_json_mode(tmp_path: Path) -> None:
    stderr_path = tmp_path / "serve.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "winkr", "serve", "--port", "0", "--log-format", "json",
                                 "--db", str(tmp_path / "w.db")], cwd=tmp_path,
                                env=environment(WINKR_JWT_SECRET=SECRET), stdout=subprocess.PIPE, stderr=stderr,
                                text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["msg"].startswith("listening on ws://127.0.0.1:") and first["level"] == "info"
        assert first["url"].endswith("/ws") and first["health"].endswith("/health")
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --- systemd readiness ----------------------------------------------------------------------------

def test_sd_notify_reaches_an_abstract_socket_and_is_silent_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from winkr.sdnotify import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    name = f"winkr-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1") is True
        assert listener.recv(100) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
    assert notify("READY=1") is False  # never raises
