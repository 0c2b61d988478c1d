"""Real ``winkr serve`` processes on loopback for the client end-to-end tests: start one on a
given database and port, ``kill -9`` it, start it again on the same port."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from processes import START_TIMEOUT, RunningServer, Servers, environment

from scripts._common import REPO
from winkr.auth import mint_token
from winkr.config import load_settings

SECRET = "client-e2e-secret-0123456789abcdef0123456789"


def token(user_id: str, ttl: float = 3600) -> str:
    settings = load_settings(None, {"jwt_secret": SECRET}, environ={})
    return mint_token(settings, SECRET, user_id, ttl=ttl, now=time.time(), username=user_id.capitalize())


class LiveServer:
    """``winkr serve`` on ``db``, started again on the same port after a kill (``servers``: the
    fixture that kills whatever is left at the test's end)."""

    def __init__(self, servers: Servers, db: Path) -> None:
        self.servers, self.db = servers, db
        self.current: RunningServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def proc(self) -> subprocess.Popen[str]:
        assert self.current is not None
        return self.current.proc

    def start(self, port: int = 0) -> float:
        """Start (0: any free port); returns the monotonic time at which it said it was listening."""
        self.current = self.servers.start(self.db, port=port, WINKR_JWT_SECRET=SECRET)
        self.port = self.current.port
        return time.monotonic()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0


def demo_page(tmp_path: Path, ws_url: str) -> tuple[subprocess.Popen[str], str]:
    """``scripts/demo.py`` serving the page for an already running server; (process, base URL)."""
    stderr_path = tmp_path / "demo.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "demo.py"), "--port", "0", "--ws-url", ws_url,
             "--mint-demo-tokens"], cwd=tmp_path, env=environment(WINKR_JWT_SECRET=SECRET), stdout=subprocess.PIPE,
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
