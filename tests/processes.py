"""Helpers for tests that run winkr as real processes over real loopback sockets. Starting
``winkr serve`` and waiting for its listening line is ``scripts/_common.py``'s (one home for
the scripts and the tests); this module adds the tests' environment and bookkeeping."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts._common import RunningServer, kill, start_server

# Re-exported for tests that build the server's command themselves (tests/test_cli_postgres.py starts nodes together).
from scripts._common import wait_for_port as wait_for_port

START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without its ``WINKR_*`` settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env.update(extra)
    return env


def winkr(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m winkr ARGS`` in ``cwd`` with ``environment(**env)``; bounded in time."""
    return subprocess.run([sys.executable, "-m", "winkr", *args], cwd=cwd, env=environment(**env),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


class Servers:
    """The ``winkr serve`` processes of one test (the ``servers`` fixture kills any left at its end)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[RunningServer] = []

    def start(self, db: Path | None, *, port: int = 0, args: Sequence[str] = (), **env: str) -> RunningServer:
        """``winkr serve --port PORT --db DB ARGS`` (no ``--db`` for None) in the test's folder with
        ``environment(**env)``; returns once it listens. Its stderr goes to ``serveN.stderr`` there
        (``log_text()``)."""
        db_args = [] if db is None else ["--db", str(db)]
        server = start_server([*db_args, *args], env=environment(**env), cwd=self.tmp_path,
                              log=self.tmp_path / f"serve{len(self.started)}.stderr", port=port,
                              timeout=START_TIMEOUT)
        self.started.append(server)
        return server

    def kill_all(self) -> None:
        for server in self.started:
            kill(server.proc)


async def recv_json(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The next event on a ``websockets`` client connection."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def reply_to(ws: Any, ref: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first event carrying ``ref`` on a ``websockets`` client connection."""
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event.get("ref") == ref:
                return event
