"""The one-file build (contract §10, issues 5 and 13): build ``winkr.pyz`` into a temporary
folder, run it from another folder outside the checkout with an interpreter that cannot see
the virtualenv (``-I -S``), mint a token with it, serve with it, and send a message through
it; on a Python it was not built for it stops at once with one line saying what to do."""
from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from processes import reply_to
from pyz_build import built_pyz
from websockets.asyncio.client import connect

from scripts._common import start_server
from winkr import __version__
from winkr.pyz_check import problem, this_machine

ROOT = Path(__file__).resolve().parent.parent
SECRET = "pyz-test-secret-0123456789abcdef0123456789ab"
START_TIMEOUT = 30.0  # the first run unpacks the archive
RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_pyz(tmp_path_factory)


def test_pyz_builds_and_serves_from_outside_the_checkout(tmp_path: Path, pyz: Path) -> None:

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

    server = start_server(["--db", str(run_dir / "w.db")], env=env, cwd=run_dir, log=tmp_path / "serve.stderr",
                          timeout=START_TIMEOUT, command=python)
    proc, url = server.proc, server.url
    try:
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


# --- issue 13, item 3: the Python the pyz was built for is checked first -------------------------

def other_pythons() -> list[Path]:
    """Interpreters on this machine of another minor version than the running one."""
    candidates = {Path(p) for p in glob.glob("/usr/bin/python3.*") + glob.glob("/usr/local/bin/python3.*")}
    candidates |= {Path(p) for p in glob.glob(os.path.expanduser("~/.pyenv/versions/*/bin/python3"))}
    candidates |= {Path(found) for n in range(6, 16) if (found := shutil.which(f"python3.{n}"))}
    others: dict[str, Path] = {}
    for path in sorted(candidates):
        if not path.name.replace("python", "").replace(".", "").isdigit() or not os.access(path, os.X_OK):
            continue
        probe = subprocess.run([str(path), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30)
        version = probe.stdout.strip()
        if probe.returncode == 0 and version != RUNNING:
            others.setdefault(version, path)
    return list(others.values())


def test_the_pyz_runs_on_the_python_it_was_built_for(tmp_path: Path, pyz: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WINKR_", "PYTHON"))}
    env["SHIV_ROOT"] = str(tmp_path / "shiv")
    result = subprocess.run([sys.executable, "-I", "-S", str(pyz), "--version"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"winkr {__version__} ")


def test_another_python_gets_one_line_saying_what_the_pyz_was_built_for(tmp_path: Path, pyz: Path) -> None:
    others = other_pythons()
    if not others:
        pytest.skip(f"no Python other than {RUNNING} on this machine (the message is tested below without one)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WINKR_", "PYTHON"))}
    env["SHIV_ROOT"] = str(tmp_path / "shiv")
    for python in others:
        result = subprocess.run([str(python), str(pyz), "token", "alice"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2, (python, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, (python, result.stderr)  # no ImportError, no SyntaxError traceback
        assert lines[0].startswith(f"winkr: this winkr.pyz was built for CPython {RUNNING} on "), lines[0]
        assert f"this is CPython {python.name.replace('python', '')}" in lines[0] or str(python) in lines[0]


MACHINE = {"system": "linux", "machine": "x86_64", "libc": "glibc"}


@pytest.mark.parametrize(("version", "implementation", "machine", "expected"), [
    ((3, 11, 7), "cpython", MACHINE, None),
    ((3, 12, 1), "cpython", MACHINE, None),
    ((3, 13, 0), "cpython", MACHINE,
     "run it with python3.11 or python3.12, or build one for this Python: python3.13 scripts/build_pyz.py "
     "(or --for-python 3.13"),
    ((3, 10, 13), "cpython", MACHINE, "winkr needs CPython 3.11 or newer: run it with python3.11 or python3.12"),
    ((3, 11, 7), "pypy", MACHINE, "winkr needs CPython 3.11 or newer"),
    ((3, 11, 7), "cpython", {"system": "linux", "machine": "aarch64", "libc": "glibc"},
     "build it on (or for a twin of) this machine"),
    ((3, 11, 7), "cpython", {"system": "linux", "machine": "x86_64", "libc": ""},
     "build it on (or for a twin of) this machine"),
])
def test_the_check_says_what_to_do(version: tuple[int, int, int], implementation: str, machine: dict[str, str],
                                   expected: str | None) -> None:
    built_for = {"pythons": "3.11 3.12", **MACHINE}
    message = problem(built_for, version, implementation, machine, "/usr/bin/python3")
    if expected is None:
        assert message is None
    else:
        assert message is not None
        assert message.startswith("winkr: this winkr.pyz was built for CPython 3.11 or 3.12 on linux x86_64 (glibc); ")
        assert expected in message, message


def test_this_machine_is_described() -> None:
    machine = this_machine()
    assert machine["system"] == sys.platform and machine["machine"]
