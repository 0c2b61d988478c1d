"""The engine seam: SQLite (the default, embedded) or PostgreSQL (``pip install 'winkr[cluster]'``).

An engine opens connections and hands them out behind one thin adapter, :class:`Database`,
so that every :class:`~winkr.store.store.Store` method (and anything else that writes
``store.db.execute(sql, params)``) runs unchanged on both. SQL is written once, with ``?``
placeholders; the PostgreSQL adapter turns them into psycopg's ``%s``. What differs between
the engines lives here and in :class:`Dialect`; the rules for new SQL are in
docs/architecture.md ("Dialect rules").

psycopg and psycopg-pool are imported only when a ``postgresql://`` URL is configured
(:func:`open_engine`); without them that raises :class:`MissingExtra`.

Everything here is synchronous: connections are opened, used and closed on worker threads
(``trio.to_thread.run_sync``), never on the trio thread.
"""
from __future__ import annotations

import functools
import queue
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs

from winkr.store.schema import migrate_postgres, open_database
from winkr.store.url import POSTGRESQL, SQLITE, DatabaseUrl

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

T = TypeVar("T")

CLUSTER_EXTRA = "pip install 'winkr[cluster]'"
CONNECT_TIMEOUT_SECONDS = 10


class MissingExtra(Exception):
    """A configured engine needs a client library that is not installed; the message names the extra."""


class Cursor(Protocol):
    """What ``Database.execute`` returns (an sqlite3 or psycopg cursor): rows are tuples."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


@attrs.frozen
class Dialect:
    """The SQL that differs between the engines, as fragments to append to portable SQL."""

    name: str
    for_update: str  # row lock until COMMIT: " FOR UPDATE" (SQLite: the writer holds the database lock)
    skip_locked: str  # " FOR UPDATE SKIP LOCKED": rows another node is working on are passed over
    # Whether an UPDATE … RETURNING is the cheaper way to read and move a counter: one round trip
    # instead of two on PostgreSQL; SQLite builds an ephemeral table for RETURNING, and a SELECT
    # then a plain UPDATE costs fewer instructions (~8 k per send).
    update_returning: bool


SQLITE_DIALECT = Dialect(SQLITE, for_update="", skip_locked="", update_returning=False)
POSTGRES_DIALECT = Dialect(POSTGRESQL, for_update=" FOR UPDATE", skip_locked=" FOR UPDATE SKIP LOCKED",
                           update_returning=True)


class Database(Protocol):
    """One connection, in autocommit mode with explicit transactions, used by one thread at a time."""

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement with ``?`` placeholders."""
        ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...

    def begin(self) -> None:
        """Start the writer's transaction (SQLite: ``BEGIN IMMEDIATE``, taking the write lock)."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    @property
    def in_transaction(self) -> bool: ...

    def is_transient(self, error: BaseException) -> bool:
        """True for a failure that running the same transaction again may cure (a deadlock)."""
        ...

    def close(self) -> None: ...


class SqliteDatabase:
    """:class:`Database` over an ``sqlite3`` connection (``isolation_level=None``)."""

    dialect = SQLITE_DIALECT

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        # BEGIN, COMMIT and ROLLBACK return no rows: one cursor of their own for every
        # transaction instead of a new one per statement (connection.execute makes one).
        self._control = connection.cursor()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.connection.execute(sql, params)

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.connection.executemany(sql, params)

    def begin(self) -> None:
        self._control.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._control.execute("COMMIT")

    def rollback(self) -> None:
        self._control.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        return self.connection.in_transaction

    def is_transient(self, error: BaseException) -> bool:
        return False  # one writer: nothing to deadlock with

    def close(self) -> None:
        self.connection.close()


_LEXEMES = re.compile(r"('(?:[^']|'')*'|\"[^\"]*\"|--[^\n]*|\?)")


_SQLITE_HINT = re.compile(r"\bINDEXED\s+BY\s+\w+", re.I)  # SQLite's index hint; PostgreSQL plans alone


@functools.lru_cache(maxsize=4096)
def to_psycopg(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` and a literal ``%`` as ``%%``, outside string
    literals, quoted names and comments (where ``?`` stays itself); SQLite's ``INDEXED BY``
    hints dropped."""
    return "".join("%s" if piece == "?" else _SQLITE_HINT.sub("", piece.replace("%", "%%"))
                   for piece in _LEXEMES.split(sql))


def _pg_name(conninfo: str, name: str) -> dict[str, Any]:
    """Connection keywords: ``application_name`` (shown in pg_stat_activity) unless the URL
    sets one, and a connect timeout."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(conninfo)
    return {"connect_timeout": CONNECT_TIMEOUT_SECONDS,
            **({} if "application_name" in given else {"application_name": name})}


def _pg_session(connection: psycopg.Connection[Any]) -> None:
    # Acknowledge only what is flushed to disk (and to a synchronous standby, where configured).
    connection.execute("SET synchronous_commit = on")


class PostgresDatabase:
    """:class:`Database` over a psycopg connection in autocommit mode (transactions are
    explicit SQL, as on SQLite). A writer's connection that broke (the server restarted) is
    opened again at the next ``begin``: the failed batch was answered ``INTERNAL_ERROR`` and
    its requests can be retried."""

    dialect = POSTGRES_DIALECT

    def __init__(self, connection: psycopg.Connection[Any],
                 reconnect: Callable[[], psycopg.Connection[Any]] | None = None) -> None:
        import psycopg

        self.connection = connection
        self._reconnect = reconnect
        self._errors = psycopg.errors
        self._idle = psycopg.pq.TransactionStatus.IDLE

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.connection.execute(to_psycopg(sql), tuple(params))

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(to_psycopg(sql), params)

    def begin(self) -> None:
        if self._reconnect is not None and (self.connection.closed or self.connection.broken):
            self.connection.close()
            self.connection = self._reconnect()
        self.connection.execute("BEGIN")

    def commit(self) -> None:
        self.connection.execute("COMMIT")

    def rollback(self) -> None:
        if not (self.connection.closed or self.connection.broken):
            self.connection.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        return not self.connection.closed and self.connection.info.transaction_status != self._idle

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, (self._errors.DeadlockDetected, self._errors.SerializationFailure,
                                  self._errors.LockNotAvailable))

    def close(self) -> None:
        self.connection.close()


class Readers(Protocol):
    """Connections for reads beside the writer (SQLite: WAL readers; PostgreSQL: a pool)."""

    size: int

    def run(self, work: Callable[[Database], T]) -> T:
        """Run ``work`` on a free connection inside a read-only transaction (one snapshot);
        blocks while all ``size`` are busy."""
        ...

    def close(self) -> None: ...


class SqliteReaders:
    def __init__(self, path: str, size: int) -> None:
        self.size = size
        self._free: queue.LifoQueue[SqliteDatabase] = queue.LifoQueue()
        for _ in range(size):
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA busy_timeout = 5000")
            connection.execute("PRAGMA query_only = ON")
            self._free.put(SqliteDatabase(connection))

    def run(self, work: Callable[[Database], T]) -> T:
        db = self._free.get()
        try:
            db.connection.execute("BEGIN")
            try:
                return work(db)
            finally:
                db.connection.execute("ROLLBACK")
        finally:
            self._free.put(db)

    def close(self) -> None:
        for _ in range(self.size):
            self._free.get().close()


class PostgresReaders:
    def __init__(self, conninfo: str, size: int) -> None:
        from psycopg_pool import ConnectionPool

        def configure(connection: psycopg.Connection[Any]) -> None:
            connection.execute("SET default_transaction_read_only = on")

        self.size = size
        self._pool: psycopg_pool.ConnectionPool[Any] = ConnectionPool(
            conninfo, min_size=1, max_size=size, open=True, configure=configure, name="winkr-readers",
            timeout=CONNECT_TIMEOUT_SECONDS,  # a read waits this long for a connection, then fails
            kwargs={"autocommit": True, **_pg_name(conninfo, "winkr-reader")})

    def run(self, work: Callable[[Database], T]) -> T:
        with self._pool.connection() as connection:
            db = PostgresDatabase(connection)
            connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                return work(db)
            finally:
                db.rollback()

    def close(self) -> None:
        self._pool.close()


class Engine(Protocol):
    """Opens the writer's connection (migrated) and the readers; names its database safely."""

    name: str

    @property
    def sqlite_path(self) -> str | None:
        """The file for the WAL checkpointer; None on PostgreSQL."""
        ...

    def open_writer(self) -> Database:
        """Connect and migrate (waiting for another node's migration); raises ``SchemaTooNew``
        for a database newer than the code, the driver's error when it cannot connect."""
        ...

    def open_readers(self, size: int) -> Readers: ...

    def describe(self) -> str:
        """The database for logs and errors (no password)."""
        ...


@attrs.frozen
class SqliteEngine:
    path: str
    synchronous: str = "NORMAL"
    name = SQLITE

    @property
    def sqlite_path(self) -> str | None:
        return self.path

    def open_writer(self) -> Database:
        return SqliteDatabase(open_database(self.path, self.synchronous))

    def open_readers(self, size: int) -> Readers:
        return SqliteReaders(self.path, size)

    def describe(self) -> str:
        return self.path


@attrs.frozen
class PostgresEngine:
    url: DatabaseUrl
    name = POSTGRESQL

    @property
    def sqlite_path(self) -> str | None:
        return None

    def connect(self) -> psycopg.Connection[Any]:
        import psycopg

        connection = psycopg.connect(self.url.conninfo, autocommit=True, **_pg_name(self.url.conninfo, "winkr-writer"))
        _pg_session(connection)
        return connection

    def open_writer(self) -> Database:
        connection = self.connect()
        try:
            migrate_postgres(connection)
        except BaseException:
            connection.close()
            raise
        return PostgresDatabase(connection, reconnect=self.connect)

    def open_readers(self, size: int) -> Readers:
        return PostgresReaders(self.url.conninfo, size)

    def describe(self) -> str:
        return self.url.redacted()


def open_engine(url: DatabaseUrl, *, sqlite_synchronous: str = "NORMAL") -> Engine:
    """The engine for ``url``. Raises :class:`MissingExtra` for PostgreSQL without psycopg."""
    if url.engine == SQLITE:
        return SqliteEngine(url.path, sqlite_synchronous)
    require_cluster_extra()
    return PostgresEngine(url)


def require_cluster_extra() -> None:
    """Raise :class:`MissingExtra` unless psycopg and psycopg-pool can be imported."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(f"a postgresql:// database needs the PostgreSQL client ({exc.name} is not "
                           f"installed): {CLUSTER_EXTRA}") from None


def one_at_a_time(db: Database, key: str) -> None:
    """Until this transaction ends, another node's transaction that asks for ``key`` waits: for
    a limit counted from rows (conversations or reports a day), which two nodes must not count
    at once (each would see the other's row missing and both would write one). PostgreSQL: a
    transaction-scoped advisory lock on a hash of ``key``; SQLite's one writer already is."""
    if db.dialect.name == POSTGRESQL:
        db.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))


def database_errors() -> tuple[type[Exception], ...]:
    """The exception classes of the drivers loaded so far (for "cannot open the database")."""
    errors: list[type[Exception]] = [sqlite3.Error]
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        errors.append(psycopg.Error)  # psycopg_pool's PoolTimeout is one too
    return tuple(errors)
