"""scripts/bench (issue 10): the runner stops at once without its extra, and its summary takes
each target's ratio against the relay of the same repeat, then the median."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


def test_the_runner_without_its_modules_names_the_bench_extra(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-S", str(BENCH / "run.py"), "--repeats", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("run.py: missing ") and "[bench]" in result.stderr
    assert list(tmp_path.iterdir()) == []


def _record(shape: str, target: str, repeat: int, **result: object) -> dict[str, object]:
    return {"shape": shape, "target": target, "repeat": repeat, "result": result}


def test_the_summary_gives_medians_and_ratios_to_the_relay_of_the_same_repeat(tmp_path: Path) -> None:
    records = [
        _record("saturation", "relay", 0, delivered_per_s=10000.0),
        _record("saturation", "winkr", 0, delivered_per_s=4000.0),
        _record("saturation", "relay", 1, delivered_per_s=20000.0),
        _record("saturation", "winkr", 1, delivered_per_s=6000.0),
        _record("idle", "relay", 0, bytes_per_conn=20000, connected=2000),
        _record("idle", "winkr", 0, bytes_per_conn=27000, connected=2000),
    ]
    out = tmp_path / "runs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = subprocess.run([sys.executable, "-S", str(BENCH / "run.py"), "--summarize", str(out)],
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    winkr_saturation = next(line for line in lines if line.startswith("| winkr") and "5,000" in line)
    assert winkr_saturation.endswith("| 0.35× |")  # median of 0.40 and 0.30, not 5,000 / 15,000
    assert any(line.startswith("| winkr | 27,000 |") and line.endswith("| 1.35× |") for line in lines)
