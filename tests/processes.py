"""Helpers for tests that run winkr as a real process over real loopback sockets."""
from __future__ import annotations

import asyncio
import json
import queue
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws")


def wait_for_port(proc: subprocess.Popen[str], stderr: Path, timeout: float) -> tuple[int, queue.Queue[str]]:
    """The port from the server's ``listening on`` line, and a queue of its later stdout lines.
    Fails with the server's stderr if the line does not come within ``timeout`` seconds."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            if time.monotonic() >= deadline or proc.poll() is not None:
                raise AssertionError(f"no listening line; stderr:\n{stderr.read_text(errors='replace')}") from None
            continue
        if match := LISTENING.search(line):
            return int(match.group(1)), lines


async def reply_to(ws: Any, ref: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first event carrying ``ref`` on a ``websockets`` client connection."""
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event.get("ref") == ref:
                return event
