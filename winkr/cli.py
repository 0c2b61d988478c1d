"""The operator interface (contract §1): ``winkr serve``, ``winkr token``,
``winkr conversation create``, ``winkr db backup|check``. Output for machines goes to stdout;
logs go to stderr."""
from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from winkr.auth import load_or_create_secret, mint_token
from winkr.config import ConfigError, Settings, load_settings
from winkr.logs import setup_logging

log = logging.getLogger("winkr")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML configuration file")
    common.add_argument("--db", help="SQLite database file (default ./winkr.db)")

    parser = argparse.ArgumentParser(prog="winkr", description="Winkr realtime chat service")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the WebSocket server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="0 picks a free port")
    serve.add_argument("--log-format", choices=("text", "json"))
    serve.add_argument("--log-level")
    serve.add_argument("--metrics-port", type=int)

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
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {"db": args.db}
    for name in ("host", "port", "log_format", "log_level", "metrics_port"):
        flags[name] = getattr(args, name, None)
    return load_settings(args.config, flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"winkr: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        return _serve(settings)
    if args.command == "token":
        return _token(settings, args)
    if args.command == "db":
        return _db(settings, args)
    return _create_conversation(settings, args.user_ids)


def _secret(settings: Settings) -> str | None:
    if settings.jwt_algorithm != "HS256":
        return None
    secret, created = load_or_create_secret(settings)
    if created:
        log.warning("no JWT secret configured: generated one and stored it in %s", settings.secret_path)
    return secret


def _serve(settings: Settings) -> int:
    from winkr.runfile import remove_run_file, write_run_file
    from winkr.server import serve_forever
    from winkr.store.schema import SchemaTooNew

    secret = _secret(settings)
    if settings.jwt_public_key and "-----BEGIN" not in settings.jwt_public_key:
        # Read the key file here, before the event loop: no file I/O on the trio thread.
        settings = attrs.evolve(settings, jwt_public_key=Path(settings.jwt_public_key).read_text())

    def on_listening(ports: list[int]) -> None:
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        write_run_file(settings, ports[0])
        print(f"winkr: listening on ws://{host}:{ports[0]}/ws", flush=True)

    status = 0
    try:
        trio.run(lambda: serve_forever(settings, secret or "", on_listening=on_listening))
    except* SchemaTooNew as group:
        print(f"winkr: {group.exceptions[0]}; upgrade winkr or restore a backup", file=sys.stderr)
        status = 2
    except* OSError as group:  # the port is taken, the database folder is missing, ...
        print(f"winkr: cannot start: {group.exceptions[0]}", file=sys.stderr)
        status = 2
    finally:
        remove_run_file(settings)
    return status


def _token(settings: Settings, args: argparse.Namespace) -> int:
    try:
        token = mint_token(settings, _secret(settings), args.user_id, ttl=args.ttl, now=time.time(),
                           username=args.username, avatar_url=args.avatar_url, service=args.service)
    except (ValueError, OSError) as exc:
        print(f"winkr: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _create_conversation(settings: Settings, user_ids: list[str]) -> int:
    """Through the running server when there is one (its participants online are told), else
    straight into the database (no server: nobody to go behind)."""
    from winkr.admin import create_conversation_directly, create_conversation_through_server
    from winkr.errors import ProtocolError
    from winkr.runfile import running_server_url

    url = running_server_url(settings)
    try:
        if url is not None:
            token = mint_token(settings, _secret(settings), "winkr-cli", ttl=60, now=time.time(), service=True)
            conversation = trio.run(create_conversation_through_server, url, token, user_ids)
        else:
            conversation = create_conversation_directly(settings, user_ids)
    except ProtocolError as exc:
        print(f"winkr: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"winkr: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(conversation).decode())
    return 0


def _db(settings: Settings, args: argparse.Namespace) -> int:
    """``winkr db backup|check``: one JSON object on stdout; 2 for a database newer than the code."""
    from winkr.store import maintenance
    from winkr.store.schema import SchemaTooNew

    try:
        if args.action == "backup":
            result = maintenance.backup(settings.db, args.path, force=args.force)
        else:
            result = maintenance.check(settings.db)
    except SchemaTooNew as exc:
        print(f"winkr: {settings.db}: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"winkr: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(result).decode())
    return 0 if result.get("ok", True) else 1
