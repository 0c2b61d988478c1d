#!/usr/bin/env python3
"""Build ``dist/winkr.pyz``: winkr and every dependency in one file (contract §10).

    python3 scripts/build_pyz.py                          # for this Python, from a fresh clone
    python3 scripts/build_pyz.py --for-python 3.11 --for-python 3.12 --for-python 3.13
    python3 dist/winkr.pyz serve --config /etc/winkr/winkr.toml

One command from a fresh clone: when shiv is not importable, the script makes a build
virtualenv (``build/pyz-venv``, once), installs shiv into it and runs itself again from there.

How: ``pip install --target BUILD`` of the project and its dependencies (from a copy of the
source, so the checkout stays clean), then ``shiv --site-packages BUILD -c winkr``. Some
dependencies (``cryptography``, ``cffi``, ``orjson``) contain compiled extension modules, which
cannot be imported from inside a zip: shiv's bootstrap therefore extracts the archive once, on
first run, to ``~/.shiv/`` (or ``$SHIV_ROOT``) and runs from there; later runs reuse it.

Compiled parts belong to one Python minor version and one platform (OS, CPU, libc). By default
the pyz is built for the Python running this script. ``--for-python X.Y`` (repeatable) fetches
the dependencies' wheels for other CPython versions of this platform from the package index
(pip's ``--python-version --only-binary=:all:``) and puts them side by side in one archive —
extension modules of different versions have different file names (``*.cpython-312-*.so``), so
one pyz can run on several Pythons. The build fails with a clear line when a dependency would
differ in pure-Python code between versions; then build one pyz per version.

Every pyz starts with a check (``winkr/pyz_check.py``, run as shiv's preamble before winkr is
imported): on a Python or platform it was not built for it prints what it was built for and
what to do, and exits 2.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "winkr")
BUILD_VENV = ROOT / "build" / "pyz-venv"
BOOTSTRAPPED = "WINKR_BUILD_PYZ_BOOTSTRAPPED"
MINIMUM = (3, 11)

sys.path.insert(0, str(ROOT))
from winkr.pyz_check import describe, this_machine  # noqa: E402 - from the checkout being built


def say(message: str) -> None:
    print(f"build_pyz: {message}", file=sys.stderr, flush=True)


def ensure_shiv() -> None:
    """Return when shiv is importable here; otherwise run this script again from a build
    virtualenv that has it (created once)."""
    try:
        import shiv  # noqa: F401
        return
    except ImportError:
        pass
    if os.environ.get(BOOTSTRAPPED):
        raise SystemExit(f"build_pyz: shiv is still missing in {BUILD_VENV}: remove that folder and run again")
    python = BUILD_VENV / "bin" / "python"
    if not python.exists():
        say(f"shiv is not installed for {sys.executable}: creating {BUILD_VENV.relative_to(ROOT)} (once)")
        made = subprocess.run([sys.executable, "-m", "venv", str(BUILD_VENV)])
        if made.returncode != 0:
            shutil.rmtree(BUILD_VENV, ignore_errors=True)
            raise SystemExit("build_pyz: cannot create a virtualenv (on Debian/Ubuntu: apt-get install "
                             "python3-venv), or install shiv yourself: pip install shiv")
    if subprocess.run([str(python), "-c", "import shiv"], capture_output=True).returncode != 0:
        say(f"installing shiv into {BUILD_VENV.relative_to(ROOT)}")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "shiv>=1.0"],
                       check=True)
    os.execve(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], {**os.environ, BOOTSTRAPPED: "1"})


def parse_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give a CPython minor version such as 3.12")
    if tuple(map(int, text.split("."))) < MINIMUM:
        raise argparse.ArgumentTypeError(f"winkr needs Python {MINIMUM[0]}.{MINIMUM[1]} or newer")
    return text


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], check=True)


def merge(source: Path, target: Path) -> None:
    """Copy the tree ``source`` into ``target``. Files present in both must be identical,
    except package metadata (``*.dist-info``), where the first copy wins."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        destination = target / relative
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif not destination.exists():
            shutil.copy2(path, destination)
        elif not filecmp.cmp(path, destination, shallow=False) and not relative.parts[0].endswith(".dist-info"):
            raise SystemExit(f"build_pyz: {relative} differs between the Python versions asked for: "
                             "build one pyz per version (--for-python once each)")


def install(source: Path, site: Path, pythons: list[str], work: Path) -> None:
    """The project and its dependencies into ``site``: for this Python straight from the source,
    for other versions from the index's wheels, merged side by side."""
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if pythons == [running]:
        _pip("install", "--no-compile", "--target", str(site), str(source))
        return
    wheels = work / "wheels"
    _pip("wheel", "--no-deps", "--wheel-dir", str(wheels), str(source))
    (wheel,) = wheels.glob("winkr-*.whl")
    site.mkdir()
    for python in pythons:
        say(f"fetching the dependencies for CPython {python}")
        part = work / f"site-{python}"
        _pip("install", "--no-compile", "--target", str(part), "--only-binary=:all:", "--python-version", python,
             "--implementation", "cp", str(wheel))
        merge(part, site)


def build(output: Path, python: str = "/usr/bin/env python3", pythons: list[str] | None = None) -> Path:
    ensure_shiv()
    pythons = sorted(set(pythons or [f"{sys.version_info[0]}.{sys.version_info[1]}"]),
                     key=lambda v: tuple(map(int, v.split("."))))
    built_for = {"pythons": " ".join(pythons), **this_machine()}
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="winkr-pyz-") as tmp:
        work = Path(tmp)
        source, site = work / "src", work / "site"
        source.mkdir()
        for name in SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, source / name)
        install(source, site, pythons, work)
        preamble = work / "winkr_pyz_preamble.py"
        preamble.write_text("# Written by scripts/build_pyz.py; shiv runs it before winkr is imported.\n"
                            "from winkr.pyz_check import require\n\n"
                            f"require({json.dumps(built_for)})\n")
        subprocess.run([sys.executable, "-m", "shiv", "--site-packages", str(site), "--console-script", "winkr",
                        "--output-file", str(output), "--python", python, "--preamble", str(preamble),
                        "--compressed", "--reproducible"], check=True)
    say(f"built for {describe(built_for)}")
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "winkr.pyz")
    parser.add_argument("--python", default="/usr/bin/env python3", help="the pyz's shebang line")
    parser.add_argument("--for-python", action="append", type=parse_version, metavar="X.Y",
                        help="a CPython version the pyz must run on (repeatable; default: this Python)")
    args = parser.parse_args()
    started = time.monotonic()
    output = build(args.output, args.python, args.for_python)
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
