"""The one-file build (contract §10, issue 5): build ``winkr.pyz`` into a temporary folder, run
it from another folder outside the checkout with an interpreter that cannot see the
virtualenv (``-I -S``), mint a token with it, serve with it, and send a message through it."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import reply_to, wait_for_port
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
SECRET = "pyz-test-secret-0123456789abcdef0123456789ab"
BUILD_TIMEOUT = 300.0
START_TIMEOUT = 30.0  # the first run unpacks the archive


def test_pyz_builds_and_serves_from_outside_the_checkout(tmp_path: Path) -> None:
    pytest.importorskip("shiv", reason="the pyz build needs shiv: pip install '.[build]'")
    pyz = tmp_path / "dist" / "winkr.pyz"
    build = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_pyz.py"), "--output", str(pyz)],
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert build.returncode == 0, build.stderr
    assert pyz.is_file()

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WINKR_", "PYTHON"))}
    env.update(WINKR_JWT_SECRET=SECRET, SHIV_ROOT=str(tmp_path / "shiv"))
    # -I -S: no site-packages, no PYTHONPATH, no checkout on the path: only what the pyz carries.
    python = [sys.executable, "-I", "-S", str(pyz)]

    token = subprocess.run([*python, "token", "alice"], cwd=run_dir, env=env, capture_output=True,
                           text=True, timeout=60)
    assert token.returncode == 0, token.stderr
    assert token.stdout.count(".") == 2, token.stdout  # a JWT

    with open(tmp_path / "serve.stderr", "w") as stderr:
        proc = subprocess.Popen([*python, "serve", "--port", "0", "--db", str(run_dir / "w.db")], cwd=run_dir,
                                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        port, _ = wait_for_port(proc, tmp_path / "serve.stderr", START_TIMEOUT)
        url = f"ws://127.0.0.1:{port}/ws"

        async def chat() -> None:
            async with connect(url, additional_headers={"Authorization": f"Bearer {token.stdout.strip()}"},
                               open_timeout=10) as ws:
                await ws.send(json.dumps({"event": "conversation:create", "data": {"participant_ids": ["bob"]},
                                          "ref": "c1"}))
                created = await reply_to(ws, "c1")
                assert created["event"] == "conversation:created", created
                await ws.send(json.dumps({"event": "message:send", "ref": "m1", "data": {
                    "conversation_id": created["data"]["conversation"]["id"], "content": "from the pyz",
                    "type": "text", "metadata": {}}}))
                ack = await reply_to(ws, "m1")
                assert ack["event"] == "message:new" and ack["data"]["message"]["content"] == "from the pyz", ack

        asyncio.run(chat())
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
