"""Checks before anything is created (issue 13): the listening ports are bound, the database
folder is writable, key files and the secret are readable — and when one is not, one line
says which port or path and what to do.

Every function here is synchronous and runs before the event loop starts (``winkr serve``,
``winkr token``, ``winkr check-config``); none of them creates a file.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import attrs
import jwt

from winkr.config import MIN_SECRET_BYTES, SECRET_HINT, Settings

LISTEN_BACKLOG = 0xFFFF  # what trio.open_tcp_listeners asks for; the kernel caps it at somaxconn


class StartupError(Exception):
    """winkr cannot start; the message is one line naming the port or path and what to do."""


def _user() -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (ImportError, KeyError):  # no pwd module, or a uid without a name (systemd DynamicUser)
        return f"uid {os.geteuid()}" if hasattr(os, "geteuid") else "this user"


def _can(path: Path, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


# --- the listening sockets ---------------------------------------------------------------------

def _bind_error(exc: OSError, host: str, port: int, flag: str) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"port {port} on {host} is already in use ({flag} 0 picks a free one)")
    if exc.errno == errno.EACCES:
        return StartupError(f"cannot listen on port {port} of {host}: permission denied (ports below 1024 "
                            f"need root; use a higher port behind the TLS proxy)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"cannot listen on {host}: this machine has no such address (set host to one "
                            f"of its addresses, 127.0.0.1 or 0.0.0.0)")
    return StartupError(f"cannot listen on port {port} of {host}: {exc.strerror or exc}")


def bind_tcp(host: str, port: int, *, flag: str = "--port") -> list[socket.socket]:
    """Bound, listening sockets for every address of ``host`` (as ``trio.open_tcp_listeners``
    makes them). Raises ``StartupError`` when the port is taken or the address is not ours;
    nothing stays bound then."""
    try:
        addresses = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:  # e.g. no IPv6 on this machine
                    continue
                raise
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for sock in bound:
            sock.close()
        raise _bind_error(exc, host, port, flag) from None
    return bound


def check_port_free(host: str, port: int, *, flag: str) -> None:
    """Raise ``StartupError`` when ``port`` cannot be bound on ``host`` right now (for ports
    bound later by a library, such as the metrics endpoint)."""
    for sock in bind_tcp(host, port, flag=flag):
        sock.close()


# --- files ---------------------------------------------------------------------------------------

def database_problem(db: str) -> str | None:
    """Why ``winkr serve`` could not open (or create) the database ``db``, or None.

    The folder must be writable even when the file exists: SQLite keeps its -wal and -shm files
    beside it, and a generated secret goes there too."""
    path = Path(db).absolute()
    folder = path.parent
    if not folder.exists():
        return (f"the database folder {folder} does not exist: create it (mkdir -p {folder}) or set db / "
                f"--db to a file in an existing folder")
    if not folder.is_dir():
        return f"the database folder {folder} is not a folder"
    if path.is_dir():
        return f"the database {path} is a folder: set db / --db to a file name"
    if path.exists() and not _can(path, os.R_OK | os.W_OK):
        return f"the database {path} is not readable and writable by {_user()}: fix its owner or mode"
    if not _can(folder, os.W_OK | os.X_OK):
        return (f"the database folder {folder} is not writable by {_user()} (SQLite writes its -wal and -shm "
                f"files there): fix its owner or mode")
    return None


def key_problem(setting: str, value: str, algorithm: str) -> str | None:
    """Why the PEM key in ``value`` (inline text or a path) is unusable for ``algorithm``, or None."""
    where = f"{setting} (inline PEM)" if "-----BEGIN" in value else f"{setting} {value}"
    if "-----BEGIN" in value:
        text = value
    else:
        try:
            text = Path(value).read_text()
        except OSError as exc:
            return f"cannot read {where}: {exc.strerror or exc} (readable by {_user()}?)"
    try:
        jwt.get_algorithm_by_name(algorithm).prepare_key(text)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        return f"{where} is not a usable {algorithm} key: {exc}"
    return None


def key_problems(settings: Settings) -> list[str]:
    """Problems with the key files the settings name (RS256/ES256)."""
    problems = []
    if settings.jwt_algorithm != "HS256":
        for name in ("jwt_public_key", "jwt_private_key"):
            value = getattr(settings, name)
            if value and (problem := key_problem(name, value, settings.jwt_algorithm)):
                problems.append(problem)
    return problems


# --- the HS256 secret ------------------------------------------------------------------------------

@attrs.frozen
class SecretLookup:
    """The configured or generated HS256 secret, if any, and where it was looked for."""

    secret: str | None
    source: str  # where it came from, or "" when not found
    looked: tuple[str, ...]  # "no WINKR_JWT_SECRET", ...: what was missing, for the error line


def find_secret(settings: Settings, config_file: str | None) -> SecretLookup:
    """The secret ``winkr serve`` would use, without ever creating one. Raises ``StartupError``
    when the secret file exists but cannot be read or is too short."""
    looked = (f"no jwt_secret in {config_file}" if config_file else "no --config file",
              "no WINKR_JWT_SECRET", f"no file {settings.secret_path.absolute()}")
    if settings.jwt_secret:
        return SecretLookup(settings.jwt_secret, "jwt_secret", looked)
    path = settings.secret_path.absolute()
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return SecretLookup(None, "", looked)
    except OSError as exc:
        raise StartupError(f"cannot read the secret file {path}: {exc.strerror or exc} "
                           f"(readable by {_user()}?)") from None
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise StartupError(f"the secret in {path} is {len(secret.encode())} bytes: an HS256 secret needs at "
                           f"least {MIN_SECRET_BYTES}; make one with {SECRET_HINT}")
    return SecretLookup(secret, str(path), looked)
