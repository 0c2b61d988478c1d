"""The README's load test, as documented (issue 13, item 9): a server started on the shipped
deploy/loadtest.toml (every limit off, its own database and generated secret), and
scripts/loadtest.py with ``--secret-file loadtest.db.secret`` — a short, bounded run on
loopback that sends each user more messages than the default per-minute limit allows."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from processes import Servers, environment

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_commands_run_a_clean_load_test(tmp_path: Path, servers: Servers) -> None:
    readme = ROOT / "README.md"
    commands = re.search(r"(\./scripts/serve --config deploy/loadtest\.toml)[^\n]*\n(.*scripts/loadtest\.py[^\n]*)",
                         readme.read_text())
    assert commands, "README.md shows the two load test commands"
    assert "pip install -q -e '.[load]'" in commands.group(2)
    assert "--secret-file loadtest.db.secret" in commands.group(2)

    # What ./scripts/serve runs after its install, on a free port.
    server = servers.start(None, args=["--config", str(ROOT / "deploy" / "loadtest.toml")])
    assert (tmp_path / "loadtest.db.secret").exists()
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--secret-file",
                          "loadtest.db.secret", "--url", server.url, "--users", "2",
                          "--rate", "40", "--duration", "2", "--drain", "2", "--no-mix", "--json-only"],
                         cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, (run.stdout, run.stderr[-2000:])
    summary = json.loads(run.stdout.splitlines()[-1])
    assert summary["errors"] == {}, summary  # no RATE_LIMITED: 40 messages per user in 2 s, limits off
    assert summary["acknowledged"] >= 60 and summary["lost"] == 0, summary
