"""The first thing ``winkr.pyz`` runs (shiv's preamble, written by ``scripts/build_pyz.py``):
is this the Python and platform the archive's compiled dependencies (orjson, cryptography,
cffi) were built for? If not, one line says what the file was built for and what to do,
instead of an ImportError or a SyntaxError from deep inside an import.

This module must parse and run on any Python 3.6+: no syntax newer than f-strings, no
``from __future__`` imports, quoted annotations only, and nothing imported from winkr.
"""
import platform
import sys

MINIMUM = (3, 11)


def this_machine() -> "dict[str, str]":
    """What ``build_pyz`` records about the building machine, and compares at run time."""
    return {"system": sys.platform, "machine": platform.machine().lower(), "libc": platform.libc_ver()[0]}


def describe(built_for: "dict[str, str]") -> str:
    """``built_for`` is ``{"pythons": "3.11 3.12", "system": "linux", "machine": "x86_64",
    "libc": "glibc"}`` (libc is empty where Python cannot tell, e.g. musl)."""
    versions = " or ".join(built_for.get("pythons", "?").split())
    libc = f" ({built_for['libc']})" if built_for.get("libc") else ""
    return f"CPython {versions} on {built_for.get('system')} {built_for.get('machine')}{libc}"


def problem(built_for: "dict[str, str]", version: "tuple[int, int, int]", implementation: str,
            machine: "dict[str, str]", executable: str) -> "str | None":
    """Why this interpreter cannot run an archive built for ``built_for``, or None."""
    running = f"{version[0]}.{version[1]}"
    pythons = built_for.get("pythons", "").split()
    same_machine = all(machine.get(key, "") == built_for.get(key, "") for key in ("system", "machine", "libc"))
    if implementation == "cpython" and running in pythons and same_machine:
        return None
    name = "CPython" if implementation == "cpython" else implementation
    this = f"{name} {version[0]}.{version[1]}.{version[2]} ({executable or 'python'})"
    run_with = " or ".join(f"python{p}" for p in pythons)
    if not same_machine:
        this += f" on {machine.get('system')} {machine.get('machine')}"
        if machine.get("libc"):
            this += f" ({machine.get('libc')})"
        advice = "build it on (or for a twin of) this machine: python3 scripts/build_pyz.py"
    elif implementation != "cpython" or tuple(version[:2]) < MINIMUM:
        advice = f"winkr needs CPython {MINIMUM[0]}.{MINIMUM[1]} or newer: run it with {run_with}"
    else:
        advice = (f"run it with {run_with}, or build one for this Python: python{running} scripts/build_pyz.py "
                  f"(or --for-python {running}; see docs/deploy.md)")
    return f"winkr: this winkr.pyz was built for {describe(built_for)}; this is {this}: {advice}"


def require(built_for: "dict[str, str]") -> None:
    """Exit with status 2 and one line on stderr unless this interpreter can run the archive."""
    version = (sys.version_info[0], sys.version_info[1], sys.version_info[2])
    message = problem(built_for, version, sys.implementation.name, this_machine(), sys.executable)
    if message is not None:
        sys.stderr.write(message + "\n")
        sys.exit(2)
