"""Real ``winkr serve`` processes on loopback for the client end-to-end tests: start one on a
given database and port, ``kill -9`` it, start it again on the same port."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from processes import wait_for_port

from winkr.auth import mint_token
from winkr.config import load_settings

SECRET = "client-e2e-secret-0123456789abcdef0123456789"
START_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parent.parent


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env["WINKR_JWT_SECRET"] = SECRET
    return env


def token(user_id: str, ttl: float = 3600) -> str:
    settings = load_settings(None, {"jwt_secret": SECRET}, environ={})
    return mint_token(settings, SECRET, user_id, ttl=ttl, now=time.time(), username=user_id.capitalize())


class LiveServer:
    """``winkr serve`` on ``db``; ``start(port)`` (0: any free port) waits for its listening line."""

    def __init__(self, tmp_path: Path, db: Path) -> None:
        self.tmp_path, self.db = tmp_path, db
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.started: list[subprocess.Popen[str]] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, port: int = 0) -> float:
        """Start; returns the monotonic time at which it said it was listening."""
        stderr_path = self.tmp_path / f"serve{len(self.started)}.stderr"
        with open(stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "winkr", "serve", "--port", str(port), "--db", str(self.db)],
                cwd=self.tmp_path, env=environment(), stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.started.append(self.proc)
        self.port, _ = wait_for_port(self.proc, stderr_path, START_TIMEOUT)
        return time.monotonic()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def demo_page(tmp_path: Path, ws_url: str) -> tuple[subprocess.Popen[str], str]:
    """``scripts/demo.py`` serving the page for an already running server; (process, base URL)."""
    stderr_path = tmp_path / "demo.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "demo.py"), "--port", "0", "--ws-url", ws_url,
             "--mint-demo-tokens"], cwd=tmp_path, env=environment(), stdout=subprocess.PIPE,
            stderr=stderr, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "demo: open " in line:
            return proc, line.split("demo: open ", 1)[1].split("?user=")[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the demo did not start: {stderr_path.read_text()}")


def record(name: str, **values: Any) -> None:
    """Timings for the record (shown with ``pytest -s``)."""
    print(f"[measure] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)
