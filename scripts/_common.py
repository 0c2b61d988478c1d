"""What the scripts share (issue 9), one home each: the letters-only number code of message
content, tokens, the config that switches every limit off, and ``winkr serve`` as a child
process on loopback (start it and wait for its listening line, stop it, read its memory).

Only the standard library is imported at the top: a script must reach its dependency check
(``scripts._deps.require``) before anything it needs can fail to import. The tests start their
``winkr serve`` processes with it too (``tests/processes.py``, and ``wait_for_port`` where a
test builds the command itself).
"""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
# Only a loopback address counts: the scripts and the tests talk to 127.0.0.1 and nothing else.
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws")

# -------------------------------------------------------------------------------------------------
# Message content: numbers written with letters only (the server masks digit runs that look like
# phone or card numbers), no vowels (so no code word is a word a block list could match).
# -------------------------------------------------------------------------------------------------
LETTERS = "bcdfghjklmnpqrst"  # 16 consonants standing for the hex digits 0-f
_HEX_TO_LETTERS = str.maketrans("0123456789abcdef", LETTERS)
_LETTERS_TO_HEX = str.maketrans(LETTERS, "0123456789abcdef")
_CODE_WORD = re.compile(f"[{LETTERS}]+")
SMALL_TALK = ("hey whats up", "see you later", "sounds good", "talk soon", "ok")


def encode_letters(n: int) -> str:
    """A non-negative integer in hexadecimal written with consonants (0 -> 'b')."""
    if n < 0:
        raise ValueError("negative")
    return format(n, "x").translate(_HEX_TO_LETTERS)


def decode_letters(s: str) -> int:
    """Inverse of encode_letters; ValueError for anything it did not produce."""
    if not _CODE_WORD.fullmatch(s):
        raise ValueError(f"not a code word: {s[:20]!r}")
    return int(s.translate(_LETTERS_TO_HEX), 16)


# -------------------------------------------------------------------------------------------------
# Tokens and config
# -------------------------------------------------------------------------------------------------
def mint(secret: str, user_id: str, ttl_s: float, *, issuer: str | None = None, audience: str | None = None,
         service: bool = False) -> str:
    """An HS256 token for ``user_id`` (its username the same) that expires ``ttl_s`` seconds from
    now, signed as the server signs them (``winkr.auth.mint_token``). Needs winkr importable."""
    import warnings

    from winkr.auth import mint_token
    from winkr.config import Settings

    # The secret is the server's; a short one is its operator's business, not a failed run.
    warnings.filterwarnings("ignore", message="The HMAC key is")
    settings = Settings(jwt_secret=secret, jwt_issuer=issuer, jwt_audience=audience)
    return mint_token(settings, secret, user_id, ttl=ttl_s, now=time.time(), username=user_id, service=service)


def limits_off_toml() -> str:
    """A ``[limits]`` table that sets every field of ``winkr.config.Limits`` to 0 (off)."""
    import attrs

    from winkr.config import Limits

    return "[limits]\n" + "".join(f"{field.name} = 0\n" for field in attrs.fields(Limits))


def server_environment(secret: str) -> dict[str, str]:
    """This process's environment without its ``WINKR_*`` settings, with ``secret`` as the
    server's JWT secret and the checkout first on ``PYTHONPATH`` (the winkr it serves)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINKR_")}
    env["WINKR_JWT_SECRET"] = secret
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -------------------------------------------------------------------------------------------------
# winkr serve as a child process
# -------------------------------------------------------------------------------------------------
class ServerDidNotStart(RuntimeError):
    """No ``listening on ws://127.0.0.1:PORT/ws`` line in time; the message carries its log's tail."""


@dataclass
class RunningServer:
    """A started ``winkr serve``: its process, port, the stdout lines after the listening line
    (a thread reads them, so the pipe never fills) and its stderr's file, if any."""

    proc: subprocess.Popen[str]
    port: int
    lines: queue.Queue[str]
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""


def wait_for_port(proc: subprocess.Popen[str], log: Path | None, timeout: float) -> tuple[int, queue.Queue[str]]:
    """The port of the server's ``listening on`` line, and a queue of its later stdout lines.
    Raises ServerDidNotStart (with the tail of ``log``, its stderr) when the line does not come
    within ``timeout`` seconds or the process ends; the process is left to the caller."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        proc.stdout.close()  # the server ended

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            if time.monotonic() >= deadline or proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-50:]) if log else "(on stderr)"
                raise ServerDidNotStart(f"winkr serve did not say it was listening on 127.0.0.1 within {timeout:g} s"
                                        f" (exit status {proc.poll()}); its log:\n{tail}") from None
            continue
        if match := LISTENING.search(line):
            return int(match.group(1)), lines


def start_server(args: Sequence[str], *, env: Mapping[str, str], cwd: Path = REPO, log: Path | None = None,
                 port: int = 0, timeout: float = START_TIMEOUT_S,
                 command: Sequence[str] = (sys.executable, "-m", "winkr")) -> RunningServer:
    """``COMMAND serve --host 127.0.0.1 --port PORT ARGS`` (port 0: any free one), waiting for its
    listening line. Its stderr is appended to ``log`` or, without one, goes where this process's
    goes. Raises ServerDidNotStart after killing the process."""
    argv = [*command, "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    if log is None:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                text=True)
    else:
        with open(log, "a") as stderr:
            proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=stderr, text=True)
    try:
        bound, lines = wait_for_port(proc, log, timeout)
    except BaseException:
        kill(proc)
        raise
    return RunningServer(proc, bound, lines, log)


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process (by its PID) unless it has ended, and reap it."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> int | None:
    """SIGTERM (graceful shutdown), SIGKILL after ``timeout`` seconds; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
    return proc.returncode


def process_usage(pid: int) -> dict[str, int]:
    """Resident memory (``rss_kb``, KiB), OS threads and open file descriptors of a process,
    from /proc (Linux). OSError when the process is gone."""
    status = Path(f"/proc/{pid}/status").read_text()
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kb": int(fields.get("VmRSS", "0 kB").split()[0]), "threads": int(fields.get("Threads", "0")),
            "fds": fds}
