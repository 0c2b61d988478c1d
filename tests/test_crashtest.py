"""Short real runs of scripts/crashtest.py (kill -9 / restart, nothing acknowledged lost) and
scripts/soak.py (steady load, RSS and fd samples), each as a subprocess against a real
server process on loopback; plus the crash harness's verifier on a database it must reject."""
from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import POSTGRES_URL

from scripts import crashtest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(args: list[str], timeout: float) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=SCRIPTS.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line; stdout={proc.stdout[-2000:]!r} stderr={proc.stderr[-2000:]!r}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


def test_crashtest_short_run_loses_nothing(engine: Any) -> None:
    """On SQLite (a file of its own) and on PostgreSQL (a schema of its own, dropped after)."""
    database = ["--database-url", POSTGRES_URL] if engine.name == "postgresql" else []
    code, summary, err = _run([str(SCRIPTS / "crashtest.py"), "--cycles", "3", "--users", "6",
                               "--max-seconds", "60", "--max-delay", "1.5", *database], timeout=90)
    assert code == 0, (summary, err[-2000:])
    assert summary["db_opened"] in (("postgresql",) if database else ("read-only", "copy"))
    assert "schema" not in summary  # dropped after a passing run
    assert summary["cycles"] == 3
    assert summary["acknowledged"] > 0
    assert summary["lost"] == 0
    assert summary["duplicated"] == 0 and summary["gaps"] == 0
    assert summary["integrity"] == "ok"


def test_soak_smoke_reports_samples() -> None:
    code, summary, err = _run([str(SCRIPTS / "soak.py"), "--duration", "10", "--interval", "1",
                               "--users", "6"], timeout=60)
    assert code == 0, (summary, err[-2000:])
    assert len(summary["samples"]) >= 5
    assert all(s["rss_kb"] > 0 and s["fds"] > 0 for s in summary["samples"])
    assert summary["acknowledged"] > 0


def test_verifier_reports_loss_duplicates_and_gaps(tmp_path: Path) -> None:
    db = tmp_path / "winkr.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE participants (conversation_id TEXT, user_id TEXT, last_read_seq INTEGER);
        CREATE TABLE messages (conversation_id TEXT, seq INTEGER, sender_id TEXT,
                               client_message_id TEXT, content TEXT);
        INSERT INTO participants VALUES ('c', 'a', 9), ('c', 'b', 1);
        INSERT INTO messages VALUES ('c', 1, 'a', 'x1', 'hi'), ('c', 3, 'a', 'x1', 'hi'),
                                    ('c', 4, 'b', 'y1', 'yo');
    """)
    con.commit()
    con.close()
    args = argparse.Namespace(users=2, max_seconds=10, seed=1, max_messages=10)
    run = crashtest.Run(args, "secret-for-the-verifier-test-0123456789")
    run.acks = [("c", 1, "x1", "a", "hi"), ("c", 2, "x2", "a", "lost"), ("c", 4, "y1", "b", "yo")]
    result = crashtest.verify(run, db, tmp_path)
    assert result["lost"] == 1
    assert result["duplicated"] == 1
    assert result["gaps"] == 1
    assert result["read_beyond_max"] == 1
    assert result["integrity"] == "ok"
