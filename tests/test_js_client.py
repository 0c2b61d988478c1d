"""The JavaScript client's own checks, run by pytest so that ./scripts/test (and CI) runs them:
its unit tests under Node's test runner (fake WebSocket, injected timers) and the TypeScript
check of the JSDoc-typed source and of the .d.ts against an app's use of it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "clients" / "js"
NODE = shutil.which("node")
TSC = JS / "node_modules" / ".bin" / "tsc"

# CI has Node.js (and ./scripts/test installs TypeScript with npm ci): there nothing is skipped.
if NODE is None and not os.environ.get("CI"):
    pytest.skip("node is not installed", allow_module_level=True)


def test_node_unit_tests_pass() -> None:
    assert NODE is not None
    files = sorted(str(p) for p in (JS / "test").glob("*.test.js"))
    assert files, "no JavaScript test files"
    result = subprocess.run([NODE, "--test", *files], cwd=JS, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout[-2000:]


def test_typescript_accepts_the_source_and_the_declarations() -> None:
    if not TSC.exists():
        if os.environ.get("CI"):
            pytest.fail("clients/js/node_modules is missing: ./scripts/test runs npm ci")
        pytest.skip("TypeScript is not installed (npm ci --prefix clients/js)")
    result = subprocess.run([str(TSC), "-p", "tsconfig.json"], cwd=JS, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
