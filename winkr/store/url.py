"""Database URLs (contract §16, §17.11): which engine, and where.

``sqlite:///relative/path`` and ``sqlite:////absolute/path`` (three or four slashes, as
SQLAlchemy reads them) name a SQLite file; ``postgresql://…`` (or ``postgres://…``) is handed
to libpq as it is. Pure functions, no database client imported.
"""
from __future__ import annotations

import re
from typing import Final, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import attrs

SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"
EngineName = Literal["sqlite", "postgresql"]

_EXAMPLES = "sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user@host:5432/dbname"


class DatabaseUrlError(ValueError):
    """The URL is unusable; the message says why (never with a password in it)."""


@attrs.frozen
class DatabaseUrl:
    engine: EngineName
    path: str = ""  # the SQLite file, as given (relative to the working directory or absolute)
    conninfo: str = ""  # the PostgreSQL URL, for libpq

    def redacted(self) -> str:
        """The URL for logs and errors: a password replaced by ``***``."""
        return sqlite_url(self.path) if self.engine == SQLITE else redact(self.conninfo)


def sqlite_url(path: str) -> str:
    """``winkr.db`` → ``sqlite:///winkr.db``; ``/var/lib/w.db`` → ``sqlite:////var/lib/w.db``."""
    return "sqlite:///" + path


def redact(url: str) -> str:
    """``url`` with any password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, host = netloc.rpartition("@")
        if ":" in credentials:
            credentials = credentials.partition(":")[0] + ":***"
        netloc = f"{credentials}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def parse_database_url(url: str) -> DatabaseUrl:
    """Raise :class:`DatabaseUrlError` saying what is wrong with ``url``."""
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep:
        raise DatabaseUrlError(f"{redact(url)!r} is not a database URL: write {_EXAMPLES}")
    if scheme == SQLITE:
        if not rest.startswith("/"):
            raise DatabaseUrlError(
                f"{url!r}: a SQLite URL has three slashes before a relative path or four before an absolute "
                f"one ({_EXAMPLES}); a host is not allowed")
        path = rest[1:]
        if "?" in path or "#" in path:
            raise DatabaseUrlError(f"{url!r}: a SQLite URL takes no query or fragment; winkr sets its own options")
        if not path or path.endswith("/"):
            raise DatabaseUrlError(f"{url!r}: no file name (write sqlite:///winkr.db or sqlite:////var/lib/winkr/winkr.db)")
        if path == ":memory:":
            raise DatabaseUrlError(f"{url!r}: winkr keeps its messages in a file; name one")
        return DatabaseUrl(SQLITE, path=path)
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url.strip())
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise DatabaseUrlError(f"{redact(url)!r}: the port is not a number") from None
        for key, _ in parse_qsl(parts.query, keep_blank_values=True):
            if not re.fullmatch(r"[a-z_]+", key):
                raise DatabaseUrlError(f"{redact(url)!r}: {key!r} is not a libpq connection parameter")
        return DatabaseUrl(POSTGRESQL, conninfo=url.strip())
    if scheme.startswith("postgresql+") or scheme.startswith("sqlite+"):
        raise DatabaseUrlError(f"{redact(url)!r}: drop the driver name ({scheme.partition('+')[0]}://…); "
                               "winkr chooses its own driver")
    raise DatabaseUrlError(f"{redact(url)!r}: unknown database {scheme!r}; write {_EXAMPLES}")
