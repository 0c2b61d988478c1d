"""Every script stops at once when a module it needs is missing, and names the extra that
installs it (issue 13, item 9) — instead of running five crash cycles and reporting
``nothing acknowledged`` with the ImportError hidden. The scripts run with ``python -S``: no
site-packages, so websockets, pyjwt, rich and winkr are all missing."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize(("script", "args", "needs"), [
    ("loadtest.py", ["--secret", "x" * 40, "--users", "4", "--duration", "1"],
     ["websockets", "pyjwt", "rich", "winkr"]),
    ("crashtest.py", ["--cycles", "5"], ["websockets", "pyjwt", "winkr"]),
    ("soak.py", ["--duration", "5"], ["websockets", "pyjwt", "winkr"]),
    ("connect_storm.py", ["--secret", "x" * 40, "--users", "2"], ["websockets", "pyjwt", "winkr"]),
    ("bench_bigdb.py", ["--messages", "10"], ["websockets", "pyjwt", "winkr"]),
    ("bench_api.py", ["--requests", "10"], ["winkr"]),
    ("flood.py", ["--flood", "10"], ["winkr"]),
])
def test_a_script_without_its_modules_names_the_extra_at_once(tmp_path: Path, script: str, args: list[str],
                                                              needs: list[str]) -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-S", str(SCRIPTS / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 10, "it failed at once, before any work"
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: missing "), lines[0]
    for name in needs:
        assert name in lines[0], lines[0]
    assert f"{sys.executable} -m pip install -e '{SCRIPTS.parent}[load]'" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing created (bench_bigdb would fill a database)


def test_help_works_without_the_modules() -> None:
    result = subprocess.run([sys.executable, "-S", str(SCRIPTS / "crashtest.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "kill -9" in result.stdout
