"""The scripts' dependency check (issue 13): a script whose modules are missing stops at once,
naming them and the command that installs the extra they come with — instead of running and
reporting ``nothing acknowledged`` with the ImportError hidden in a worker.

    from scripts._deps import require
    require("loadtest.py", ["websockets", "jwt", "rich"])        # exits 2 when one is missing

A module is named by what it imports; it is reported by the distribution of its top-level
package. ``winkr.auth`` (not ``winkr``) is how a script says it needs winkr: the checkout's
bare package imports even where winkr's own dependencies are missing.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# top-level package -> (distribution, the setup.cfg extra that installs it)
KNOWN = {
    "websockets": ("websockets>=13", "load"),
    "rich": ("rich", "load"),
    "jwt": ("pyjwt", "load"),  # a dependency of winkr itself, so of every extra
    "winkr": ("winkr", "load"),
    "trio": ("winkr", "load"),  # winkr's own dependencies come with it
    "trio_websocket": ("winkr", "load"),
    "orjson": ("winkr", "load"),
    "psycopg": ("psycopg[binary]", "cluster"),
    "picows": ("picows", "bench"),
    "uvloop": ("uvloop", "bench"),
    "socketio": ("python-socketio", "bench"),
    "uvicorn": ("uvicorn[standard]", "bench"),
}


def _source(name: str) -> tuple[str, str]:
    top = name.partition(".")[0]
    return KNOWN.get(top, (top, "load"))


def missing(modules: list[str]) -> list[tuple[str, str]]:
    """The modules that cannot be imported here, each with the reason."""
    found = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            found.append((name, str(exc)))
    return found


def require(script: str, modules: list[str], extra: str | None = None) -> None:
    """Return when every module imports; otherwise one line on stderr and exit status 2.
    ``extra`` names the one extra to install when the script has its own (``bench``)."""
    absent = missing(modules)
    if not absent:
        return
    distributions = sorted({_source(name)[0] for name, _ in absent})
    extras = [extra] if extra else sorted({_source(name)[1] for name, _ in absent})
    # "No module named 'x'" says nothing the list does not; anything else (a broken install) is shown.
    odd = [reason for _, reason in absent if not reason.startswith("No module named")]
    spec = f"{ROOT}[{','.join(extras)}]"
    sys.stderr.write(f"{script}: missing {', '.join(distributions)}{' (' + '; '.join(odd) + ')' if odd else ''}: "
                     f"install the [{','.join(extras)}] extra into this Python: "
                     f"{sys.executable} -m pip install -e '{spec}'\n")
    raise SystemExit(2)
