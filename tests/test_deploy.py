"""The documented deployment, followed literally (issue 13, item 1): the install block of
docs/deploy.md §2 runs under a temporary root, then winkr starts the way deploy/winkr.service
starts it — as an unprivileged user (systemd's DynamicUser), in its state directory, with its
environment, its EnvironmentFile read by "systemd" (this test, as root) and its ExecStart —
without systemd. It must tell "systemd" it is ready, answer /health, accept a token signed
with the secret the docs generate, serve metrics, log only JSON and stop cleanly on SIGTERM.

Needs root (to drop to the ``nobody`` user with setpriv, as systemd would); skipped otherwise."""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from processes import recv_json
from pyz_build import built_pyz
from websockets.asyncio.client import connect

from scripts._common import wait_for_port

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
UNIT = ROOT / "deploy" / "winkr.service"
INSTALL_MARKER = "# install: tests/test_deploy.py runs this block"
SYSTEM_PATHS = ("/etc/systemd/system", "/etc/winkr", "/opt/winkr", "/var/lib/winkr", "/var/cache/winkr")
START_TIMEOUT = 60.0  # the first start unpacks the pyz

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the deployment is for Linux")


def install_block() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.DOTALL)
    found = [block for block in blocks if block.startswith(INSTALL_MARKER)]
    assert len(found) == 1, f"docs/deploy.md must have one ```sh block starting with {INSTALL_MARKER!r}"
    return found[0]


def rooted(text: str, root: Path) -> str:
    for path in SYSTEM_PATHS:
        text = text.replace(path, f"{root}{path}")
    return text


def unit_service_section() -> dict[str, list[str]]:
    section: dict[str, list[str]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line
        elif current == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            section.setdefault(key, []).append(value)
    return section


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temporary folder the service user can reach (pytest's own is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="winkr-deploy-test-"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_unit_file_is_valid_for_systemd() -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_the_documented_layout_runs_as_an_unprivileged_user(public_tmp: Path,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the service as another user, as systemd does")
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux) to drop privileges")
    service_user = pwd.getpwnam("nobody")
    pyz = built_pyz(tmp_path_factory)
    tmp_path = public_tmp
    root, checkout = tmp_path / "root", tmp_path / "checkout"
    (checkout / "dist").mkdir(parents=True)
    (checkout / "deploy").mkdir()
    shutil.copy2(pyz, checkout / "dist" / "winkr.pyz")
    shutil.copy2(UNIT, checkout / "deploy" / "winkr.service")
    for path in ("/etc", "/opt", "/var/lib", "/var/cache"):
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)

    # 1. The install block, as root, with package managers and systemd stubbed out.
    calls = tmp_path / "calls.log"
    stubs = (f'apt-get() {{ echo "apt-get $*" >> {calls}; }}\n'
             f'systemctl() {{ echo "systemctl $*" >> {calls}; }}\n')
    script = stubs + rooted(install_block(), root)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=checkout, capture_output=True, text=True,
                          timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    assert "systemctl daemon-reload" in calls.read_text()
    assert "systemctl enable --now winkr" in calls.read_text()
    env_file = root / "etc/winkr/winkr.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"

    # 2. What systemd does for the unit.
    unit = unit_service_section()
    assert unit["DynamicUser"] == ["yes"]
    state = Path(rooted("/var/lib/" + unit["StateDirectory"][0], root))
    cache = Path(rooted("/var/cache/" + unit["CacheDirectory"][0], root))
    for folder, mode in ((state, int(unit["StateDirectoryMode"][0], 8)), (cache, 0o755)):
        folder.mkdir(mode=mode)
        os.chown(folder, service_user.pw_uid, service_user.pw_gid)
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for assignment in unit.get("Environment", []):
        key, _, value = assignment.partition("=")
        environment[key] = rooted(value, root)
    for name in unit.get("EnvironmentFile", []):
        path = Path(rooted(name.lstrip("-"), root))
        for line in path.read_text().splitlines():  # systemd reads it as root, before dropping privileges
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                environment[key.strip()] = value.strip()
    assert len(environment.get("WINKR_JWT_SECRET", "")) >= 32, "the docs generate the secret"
    command = shlex.split(rooted(unit["ExecStart"][0], root))
    python = command[0]
    probe = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=30) if os.path.exists(python) else None
    if probe is None or probe.stdout.strip() != f"{sys.version_info[0]}.{sys.version_info[1]}":
        command[0] = sys.executable  # the unit's python3 is another version here than the one the pyz is for
    # Where this test's machine has no port 8080/9108 to spare: free ones (flags override the file).
    command += ["--port", "0", "--metrics-port", "0"]
    umask = int(unit["UMask"][0], 8)
    drop = ["setpriv", f"--reuid={service_user.pw_uid}", f"--regid={service_user.pw_gid}", "--clear-groups"]

    # The privilege drop is real: the service user cannot read the root-only secret file.
    peek = subprocess.run([*drop, "cat", str(env_file)], capture_output=True, text=True, timeout=30)
    assert peek.returncode != 0, "setpriv did not drop privileges; this test would prove nothing"

    # Type=notify: systemd listens on a datagram socket for READY=1.
    assert unit["Type"] == ["notify"]
    notify_path = tmp_path / "notify.sock"
    notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notifications.bind(str(notify_path))
    os.chmod(notify_path, 0o777)
    environment["NOTIFY_SOCKET"] = str(notify_path)

    stderr_path = tmp_path / "service.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([*drop, *command], cwd=rooted(unit["WorkingDirectory"][0], root), env=environment,
                                stdout=subprocess.PIPE, stderr=stderr, text=True,
                                preexec_fn=lambda: os.umask(umask))
    try:
        port, stdout_lines = wait_for_port(proc, stderr_path, START_TIMEOUT)
        notifications.settimeout(10)
        ready = notifications.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1", ready
        assert f"STATUS=listening on ws://127.0.0.1:{port}/ws" in ready
        metrics_port = _metrics_port(stderr_path)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert "winkr_connections " in metrics and "process_resident_memory_bytes " in metrics

        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, environment["WINKR_JWT_SECRET"],
                           algorithm="HS256")

        async def hello() -> None:
            async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {token}"},
                               open_timeout=10) as ws:
                event = await recv_json(ws)
                assert event["event"] == "connection:established", event

        asyncio.run(hello())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, stderr_path.read_text()
    finally:
        notifications.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    database = state / "winkr.db"
    assert database.stat().st_uid == service_user.pw_uid
    assert not (state / "winkr.db.secret").exists(), "the secret came from the EnvironmentFile"
    assert any(cache.iterdir()), "the pyz unpacked itself into the cache directory"
    lines = stderr_path.read_text().splitlines()
    while not stdout_lines.empty():
        lines.append(stdout_lines.get())
    for line in lines:  # log_format = "json" in the documented config
        assert json.loads(line)["msg"], line


def _metrics_port(stderr: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if match := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", stderr.read_text()):
            return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no metrics line; stderr:\n{stderr.read_text()}")
