"""One ``winkr.pyz`` build per test session, shared by tests/test_pyz.py and
tests/test_deploy.py (a build takes several seconds)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300.0
_built: dict[str, Path] = {}


def built_pyz(factory: pytest.TempPathFactory) -> Path:
    """``scripts/build_pyz.py`` run once with this interpreter; skips without shiv."""
    pytest.importorskip("shiv", reason="the pyz build needs shiv: pip install '.[build]'")
    if "pyz" not in _built:
        pyz = factory.mktemp("pyz") / "dist" / "winkr.pyz"
        build = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_pyz.py"), "--output", str(pyz)],
                               capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        assert build.returncode == 0, build.stderr
        assert pyz.is_file()
        _built["pyz"] = pyz
    return _built["pyz"]
