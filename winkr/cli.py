"""The operator interface (contract §1): ``winkr serve``, ``winkr token``,
``winkr conversation create``, ``winkr db backup|check``, ``winkr check-config`` and
``winkr --version``. Output for machines goes to stdout; logs go to stderr. Every failure an
operator can fix is one line that says what to do, with exit status 2 (issue 13)."""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
import trio

from winkr import __version__, preflight, sdnotify
from winkr.auth import load_or_create_secret, mint_token, principal_from_claims
from winkr.cluster import cluster_problems
from winkr.config import ConfigError, Settings, load_settings
from winkr.errors import ProtocolError
from winkr.logs import json_line, setup_logging
from winkr.store.engine import database_errors
from winkr.store.url import redact

log = logging.getLogger("winkr")

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML configuration file")
    common.add_argument("--db", help="SQLite database file (default ./winkr.db)")
    common.add_argument("--database-url", metavar="URL",
                        help="sqlite:///relative/path, sqlite:////absolute/path or postgresql://... "
                             "(default: sqlite:///<--db>; env WINKR_DATABASE_URL)")

    parser = argparse.ArgumentParser(prog="winkr", description="Winkr realtime chat service")
    parser.add_argument("--version", action="version",
                        version=f"winkr {__version__} (Python {'.'.join(map(str, sys.version_info[:3]))})")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the WebSocket server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="0 picks a free port")
    serve.add_argument("--log-format", choices=("text", "json"))
    serve.add_argument("--log-level")
    serve.add_argument("--metrics-port", type=int)
    serve.add_argument("--api-port", type=int, help="serve the server API (docs/server-api.md) on this port")
    serve.add_argument("--broker-url", metavar="URL",
                       help="redis://... joins the nodes sharing it and the database (default: one node; "
                            "env WINKR_BROKER_URL)")
    serve.add_argument("--node-id", help="this node's name among the others (default hostname-pid)")

    token = commands.add_parser("token", parents=[common], help="print a signed token for a user")
    token.add_argument("user_id")
    token.add_argument("--username")
    token.add_argument("--avatar-url")
    token.add_argument("--ttl", type=float, default=24 * 3600, help="seconds (default one day)")
    token.add_argument("--service", action="store_true", help="a service account token")

    conversation = commands.add_parser("conversation", help="manage conversations")
    conversation_commands = conversation.add_subparsers(dest="action", required=True)
    create = conversation_commands.add_parser("create", parents=[common], help="create a conversation")
    create.add_argument("user_ids", nargs="+", metavar="USER_ID")

    db = commands.add_parser("db", help="database tools: backup, check")
    db_commands = db.add_subparsers(dest="action", required=True)
    backup = db_commands.add_parser("backup", parents=[common],
                                    help="online, consistent copy of the database (safe while serving)")
    backup.add_argument("path", metavar="PATH", help="the copy to write")
    backup.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    db_commands.add_parser("check", parents=[common], help="integrity check and schema version")

    commands.add_parser("api-key", parents=[common],
                        help="print the server API key (the configured one, or the one serve generated)")

    commands.add_parser("check-config", parents=[common],
                        help="validate the settings and the files they name; exit 0 (usable) or 2")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {"db": args.db, "database_url": args.database_url}
    for name in ("host", "port", "log_format", "log_level", "metrics_port", "api_port", "broker_url", "node_id"):
        flags[name] = getattr(args, name, None)
    return load_settings(args.config, flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        if getattr(args, "log_format", None) == "json":  # as asked on the command line: every line JSON
            print(json_line(f"winkr: {exc}", level=logging.ERROR), file=sys.stderr, flush=True)
        else:
            print(f"winkr: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        return _check_config(settings, args.config)
    setup_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        return _serve(settings, args.config)
    if args.command == "token":
        return _token(settings, args)
    if args.command == "db":
        return _db(settings, args)
    if args.command == "api-key":
        return _api_key(settings)
    return _create_conversation(settings, args.user_ids, args.config)


def _fail(settings: Settings, message: str) -> int:
    """Report a failure the operator can fix, in the configured log format; exit status 2."""
    if settings.log_format == "json":
        print(json_line(message, level=logging.ERROR), file=sys.stderr, flush=True)
    else:
        print(f"winkr: {message}", file=sys.stderr, flush=True)
    return 2


def _leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# --- winkr serve ------------------------------------------------------------------------------------

def _database_problem(settings: Settings) -> str | None:
    """Why the configured database cannot be used by this process (SQLite: its folder;
    PostgreSQL: its client library), or None. PostgreSQL itself is contacted at start."""
    if settings.database.engine == "sqlite":
        return preflight.database_problem(settings.database.path)
    from winkr.store.engine import MissingExtra, require_cluster_extra

    try:
        require_cluster_extra()
    except MissingExtra as exc:
        return str(exc)
    return None


def _serve(settings: Settings, config_file: str | None) -> int:
    """Check, bind, then create: a port in use or a missing folder leaves nothing behind."""
    problems = [p for p in (*cluster_problems(settings), _database_problem(settings),
                            *preflight.key_problems(settings)) if p]
    ports = {"--port": settings.port, "--metrics-port": settings.metrics_port, "--api-port": settings.api_port}
    taken = [flag for flag, port in ports.items() if port and list(ports.values()).count(port) > 1]
    if taken:
        problems.insert(0, f"{' and '.join(taken)} are all {ports[taken[0]]}: give each its own port")
    if problems:
        return _fail(settings, problems[0])
    sockets: list[socket.socket] = []
    api_sockets: list[socket.socket] = []
    try:
        sockets = preflight.bind_tcp(settings.host, settings.port)
        if settings.metrics_port:
            preflight.check_port_free(settings.metrics_host, settings.metrics_port, flag="--metrics-port")
        if settings.api_port is not None:
            from winkr.api.server import bind_api

            api_sockets = bind_api(settings)
    except preflight.StartupError as exc:
        for sock in sockets:
            sock.close()
        return _fail(settings, str(exc))
    try:
        return _serve_on(settings, config_file, sockets, api_sockets)
    finally:
        for sock in sockets + api_sockets:
            sock.close()


def _serve_on(settings: Settings, config_file: str | None, sockets: list[socket.socket],
              api_sockets: list[socket.socket] | None = None) -> int:
    from winkr.runfile import remove_run_file, write_run_file
    from winkr.server import serve_forever
    from winkr.store.schema import SchemaTooNew

    secret = ""
    if settings.jwt_algorithm == "HS256":
        try:
            found = preflight.find_secret(settings, config_file)
        except preflight.StartupError as exc:
            return _fail(settings, str(exc))
        secret, created = (found.secret, False) if found.secret else load_or_create_secret(settings)
        if created:
            log.warning("no JWT secret configured: generated one and stored it in %s", settings.secret_path)
    if api_sockets and not settings.api_keys:
        from winkr.api.keys import load_or_create_api_key

        _, created = load_or_create_api_key(settings)
        if created:
            log.warning("no server API key configured: generated one in %s (print it with `winkr api-key`)",
                        settings.api_key_path)
    if settings.jwt_public_key and "-----BEGIN" not in settings.jwt_public_key:
        # Read the key file here, before the event loop: no file I/O on the trio thread.
        settings = attrs.evolve(settings, jwt_public_key=Path(settings.jwt_public_key).read_text())

    def on_listening(ports: list[int]) -> None:
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        url = f"ws://{host}:{ports[0]}/ws"
        write_run_file(settings, ports[0])
        api = ""
        if api_sockets:
            api_host = settings.api_host if ":" not in settings.api_host else f"[{settings.api_host}]"
            api = f"http://{api_host}:{api_sockets[0].getsockname()[1]}"
        if settings.log_format == "json":
            health = f"http://{host}:{ports[0]}/health"
            line = (json_line(f"listening on {url}", url=url, health=health, api=api) if api else
                    json_line(f"listening on {url}", url=url, health=health))
            print(line, flush=True)
        else:
            print(f"winkr: listening on {url}" + (f", server API on {api}" if api else ""), flush=True)
        sdnotify.notify(f"READY=1\nSTATUS=listening on {url}")  # one local datagram: no real blocking

    async def run() -> None:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]
        await serve_forever(settings, secret, on_listening=on_listening, listeners=listeners,
                            api_sockets=api_sockets or None)

    status = 0
    try:
        trio.run(run)
    except* SchemaTooNew as group:
        status = _fail(settings, f"{_database_name(settings)}: {_leaf(group)}; upgrade winkr or restore a backup")
    except* database_errors() as group:
        status = _fail(settings, f"cannot open the database {_database_name(settings)}: "
                                 f"{_one_line(_leaf(group))}")
    except* OSError as group:
        status = _fail(settings, f"cannot start: {_leaf(group)}")
    except* Exception as group:  # a bug: the traceback goes to the log, in the log's format (JSON too)
        log.critical("winkr stopped on an unexpected error", exc_info=group)
        status = 1
    finally:
        remove_run_file(settings)
    return status


def _database_name(settings: Settings) -> str:
    """The database for an error line: the SQLite file's absolute path, or the URL without its password."""
    database = settings.database
    return str(Path(database.path).absolute()) if database.engine == "sqlite" else database.redacted()


def _failures(*others: type[Exception]) -> tuple[type[Exception], ...]:
    """``others`` and the loaded database drivers' errors (evaluated when an exception is matched,
    so a driver imported meanwhile counts)."""
    return (*others, *database_errors())


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- winkr token ----------------------------------------------------------------------------------

def _signing_secret(settings: Settings, config_file: str | None, command: str) -> str | None:
    """The server's HMAC secret (``None`` for RS256/ES256); never generates one (a token signed
    with a new one would only be refused by the server). Raises ``StartupError`` saying where it
    looked."""
    if settings.jwt_algorithm != "HS256":
        if (problem := next(iter(preflight.key_problems(settings)), None)) is not None:
            raise preflight.StartupError(problem)
        return None
    found = preflight.find_secret(settings, config_file)
    if found.secret is None:
        raise preflight.StartupError(
            "no JWT secret found: " + ", ".join(found.looked) + " (winkr serve writes that file beside its "
            f"database when no secret is configured); run `winkr {command}` with the server's --config / --db, "
            "or set WINKR_JWT_SECRET")
    return found.secret


def _token(settings: Settings, args: argparse.Namespace) -> int:
    """Sign a token for a user with the server's secret or key."""
    try:
        secret = _signing_secret(settings, args.config, "token")
    except preflight.StartupError as exc:
        return _fail(settings, str(exc))
    now = time.time()
    try:
        token = mint_token(settings, secret, args.user_id, ttl=args.ttl, now=now,
                           username=args.username, avatar_url=args.avatar_url, service=args.service)
        # The server's own claim rules: never print a token it would answer with 401.
        principal_from_claims(jwt.decode(token, options={"verify_signature": False}), now)
    except ProtocolError as exc:
        return _fail(settings, f"the server would refuse this token ({exc.message}): check USER_ID, "
                               "--username, --avatar-url and --ttl")
    except (ValueError, OSError) as exc:
        return _fail(settings, str(exc))
    print(token)
    return 0


# --- winkr api-key ---------------------------------------------------------------------------------

def _api_key(settings: Settings) -> int:
    """Print the key the server API accepts: the first configured one, else the one stored beside
    the database. Generates it only when ``api_port`` is set here too (then ``serve`` would)."""
    from winkr.api.keys import api_keys

    try:
        keys = api_keys(settings, create=settings.api_port is not None)
    except OSError as exc:
        return _fail(settings, f"cannot read or write {settings.api_key_path}: {exc.strerror or exc}")
    if not keys:
        return _fail(settings, f"no server API key: none configured (api_keys, WINKR_API_KEYS) and none in "
                               f"{settings.api_key_path.absolute()}; `winkr serve --api-port PORT` generates it "
                               "there (run `winkr api-key` with the server's --config / --db)")
    print(keys[0])
    return 0


# --- winkr check-config --------------------------------------------------------------------------

def _check_config(settings: Settings, config_file: str | None) -> int:
    """``ok``/``error``/``note`` lines on stdout; 0 when ``winkr serve`` would start with these
    settings (as this user), 2 otherwise. Ports are not probed: the server may be running."""
    lines: list[tuple[str, str]] = []
    lines.append(("ok", f"settings from {config_file or 'defaults'}, WINKR_* and flags: "
                        f"ws://{settings.host}:{settings.port}/ws, {settings.jwt_algorithm}, "
                        f"metrics {'off' if settings.metrics_port is None else settings.metrics_port}, "
                        f"log {settings.log_format}"))
    problem = _database_problem(settings)
    if problem:
        lines.append(("error", problem))
    elif settings.database.engine == "sqlite":
        path = Path(settings.database.path)
        lines.append(("ok", f"database {path.absolute()} "
                            f"({'exists' if path.exists() else 'created at first start'}), folder writable"))
    else:
        lines.append(("ok", f"database {settings.database.redacted()} (PostgreSQL client installed; "
                            "the server is contacted at start, migrations run then)"))
    lines += [("error", problem) for problem in preflight.key_problems(settings)]
    cluster_lines = [("error", problem) for problem in cluster_problems(settings)]
    if settings.clustered and not cluster_lines:
        cluster_lines.append(("ok", f"more than one node: broker {redact(settings.broker_url)}, node_id "
                                    f"{settings.node_id or '(hostname-pid)'}, Redis keys under "
                                    f"{settings.redis_key_prefix}"))
    if settings.proxy_protocol_from:
        cluster_lines.append(("ok", "PROXY protocol required from " + ", ".join(settings.proxy_protocol_from)))
    lines += cluster_lines
    if settings.jwt_algorithm == "HS256":
        try:
            found = preflight.find_secret(settings, config_file)
        except preflight.StartupError as exc:
            lines.append(("error", str(exc)))
        else:
            lines.append(("ok", f"JWT secret from {found.source}") if found.secret else
                         ("note", f"no JWT secret configured: winkr serve will generate one in "
                                  f"{settings.secret_path.absolute()}; your API must sign with it"))
    if settings.api_port is None:
        lines.append(("ok", "server API off (set api_port / --api-port to serve it)"))
    else:
        keys = (f"{len(settings.api_keys)} configured key(s)" if settings.api_keys else
                f"its key in {settings.api_key_path.absolute()}" + (
                    "" if settings.api_key_path.exists() else " (generated at first start)"))
        lines.append(("ok", f"server API on http://{settings.api_host}:{settings.api_port}, {keys}"))
    for status, text in lines:
        print(f"{status:5} {text}")
    return 2 if any(status == "error" for status, _ in lines) else 0


def _create_conversation(settings: Settings, user_ids: list[str], config_file: str | None) -> int:
    """Through the running server when there is one (its participants online are told), else
    straight into the database (no server: nobody to go behind)."""
    from winkr.admin import create_conversation_directly, create_conversation_through_server
    from winkr.errors import ProtocolError
    from winkr.runfile import running_server_url

    url = running_server_url(settings)
    try:
        if url is not None:
            secret = _signing_secret(settings, config_file, "conversation create")
            token = mint_token(settings, secret, "winkr-cli", ttl=60, now=time.time(), service=True)
            conversation = trio.run(create_conversation_through_server, url, token, user_ids)
        elif (problem := _database_problem(settings)) is not None:
            return _fail(settings, problem)
        else:
            conversation = create_conversation_directly(settings, user_ids)
    except ProtocolError as exc:
        return _fail(settings, exc.message)
    except _failures(preflight.StartupError, OSError, ValueError) as exc:
        return _fail(settings, _one_line(exc))
    print(orjson.dumps(conversation).decode())
    return 0


def _db(settings: Settings, args: argparse.Namespace) -> int:
    """``winkr db backup|check``: one JSON object on stdout; 2 for a database newer than the
    code, for ``backup`` of PostgreSQL, or without the PostgreSQL client."""
    from winkr.store import maintenance
    from winkr.store.schema import SchemaTooNew

    database = settings.database
    if database.engine != "sqlite":
        if args.action == "backup":
            return _fail(settings, "winkr db backup copies a SQLite file; back up PostgreSQL with its own tools, "
                                   f"e.g. pg_dump --format=custom --file=winkr.dump '{database.redacted()}'")
        if (problem := _database_problem(settings)) is not None:
            return _fail(settings, problem)
    try:
        if args.action == "backup":
            result = maintenance.backup(database.path, args.path, force=args.force)
        else:
            result = maintenance.check_database(database)
    except SchemaTooNew as exc:
        print(f"winkr: {_database_name(settings) if database.engine != 'sqlite' else database.path}: {exc}",
              file=sys.stderr)
        return 2
    except _failures(OSError) as exc:
        print(f"winkr: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(orjson.dumps(result).decode())
    return 0 if result.get("ok", True) else 1
