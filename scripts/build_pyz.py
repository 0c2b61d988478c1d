#!/usr/bin/env python3
"""Build ``dist/winkr.pyz``: winkr and every dependency in one file (contract §10).

    python scripts/build_pyz.py [--output dist/winkr.pyz] [--python "/usr/bin/env python3"]
    python3 dist/winkr.pyz serve --config /etc/winkr/winkr.toml

How: ``pip install --target BUILD .`` (the project and its dependencies, from a copy of the
source so the checkout stays clean), then ``shiv --site-packages BUILD -c winkr`` (``pip
install shiv``, or ``pip install .[build]``). Some dependencies (``cryptography``, ``cffi``,
``orjson``) contain compiled extension modules, which cannot be imported from inside a zip:
shiv's bootstrap therefore extracts the archive once, on first run, to ``~/.shiv/`` (or
``$SHIV_ROOT``) and runs from there; later runs reuse the extracted copy.

The compiled parts are those of the building machine: the pyz runs only on the same Python
minor version (here 3.11) and the same platform (OS, CPU architecture, libc) as the Python
that built it. Build it on (or for a twin of) the machine that will run it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "winkr")


def build(output: Path, python: str = "/usr/bin/env python3") -> Path:
    try:
        import shiv  # noqa: F401
    except ImportError:
        raise SystemExit("build_pyz: shiv is missing: pip install shiv (or pip install '.[build]')") from None
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="winkr-pyz-") as tmp:
        source, site = Path(tmp) / "src", Path(tmp) / "site"
        source.mkdir()
        for name in SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, source / name)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-compile", "--target", str(site), str(source)], check=True)
        subprocess.run([sys.executable, "-m", "shiv", "--site-packages", str(site), "--console-script", "winkr",
                        "--output-file", str(output), "--python", python, "--compressed", "--reproducible"],
                       check=True)
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "winkr.pyz")
    parser.add_argument("--python", default="/usr/bin/env python3", help="the pyz's shebang line")
    args = parser.parse_args()
    started = time.monotonic()
    output = build(args.output, args.python)
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
