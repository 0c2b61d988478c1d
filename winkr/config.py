"""Settings: defaults < TOML file < ``WINKR_*`` environment < command-line flags.

Every number of the contract is a setting here, never a constant buried in code. Limits live
in the ``[limits]`` table of the TOML file; ``0`` switches a limit off.
"""
from __future__ import annotations

import base64
import binascii
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import cattrs

from winkr.proxy_protocol import parse_networks
from winkr.store.url import DatabaseUrl, DatabaseUrlError, parse_database_url, sqlite_url

WEBHOOK_EVENTS = ("message.created", "message.reported", "user.blocked", "conversation.closed")
"""Every webhook event type (contract §14); ``webhook_events`` defaults to all of them."""
WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_MIN_BYTES = 24


@attrs.frozen
class Limits:
    messages_per_minute: int = 30
    messages_per_hour: int = 500
    messages_per_day: int = 2000
    typing_per_minute: int = 20
    connections_per_minute: int = 10
    conversations_per_day: int = 50
    connections_per_user: int = 5
    failed_handshakes_per_minute_per_ip: int = 60
    max_frame_bytes: int = 32 * 1024
    # Outbound flow control (docs/architecture.md): a client is slow when more than
    # `outbound_queue` frames wait while its socket has not drained for
    # `slow_consumer_seconds`, or when its queued bytes pass `outbound_queue_bytes`.
    outbound_queue: int = 256
    outbound_queue_bytes: int = 4 * 1024 * 1024
    slow_consumer_seconds: int = 10
    # Inbound budget per connection for every event (weighted by cost): a burst, then a rate.
    inbound_events_per_second: int = 50
    inbound_burst: int = 500
    joined_per_connection: int = 200
    status_changes_per_minute: int = 30
    reports_per_day: int = 20  # message:report (contract §12)


@attrs.frozen
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "winkr.db"
    # sqlite:///PATH or postgresql://...; unset: sqlite:///<db> (winkr.store.url, contract §17.11)
    database_url: str | None = None
    jwt_secret: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_public_key: str | None = None  # PEM text or a path to it, for RS256/ES256
    jwt_private_key: str | None = None  # lets `winkr token` sign RS256/ES256 (tests, dev)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    allowed_origins: tuple[str, ...] = ()
    handshake_timeout: float = 30.0
    ping_interval: float = 30.0
    pong_timeout: float = 60.0
    typing_timeout: float = 6.0
    presence_grace: float = 5.0
    shutdown_timeout: float = 5.0
    max_participants: int = 10
    max_room_connections: int = 50
    pii_policy: str = "mask"
    max_text_chars: int = 2000
    max_encrypted_chars: int = 8000
    max_photo_bytes: int = 10 * 1024 * 1024
    max_url_chars: int = 2048
    blocked_words: tuple[str, ...] | None = None  # None: the list shipped with winkr
    sqlite_synchronous: str = "NORMAL"
    log_format: str = "text"
    log_level: str = "INFO"
    metrics_port: int | None = None  # off unless set
    metrics_host: str = "127.0.0.1"  # the scrape endpoint stays private unless asked otherwise
    webhook_url: str = ""  # off when empty (contract §14)
    webhook_secret: str | None = None  # whsec_ + base64 of >= 24 random bytes
    webhook_events: tuple[str, ...] = WEBHOOK_EVENTS
    webhook_timeout_seconds: float = 10.0
    webhook_max_age_hours: float = 24.0
    # The server API for the app's backend (contract §13; docs/server-api.md).
    api_port: int | None = None  # off unless set
    api_host: str = "127.0.0.1"
    api_keys: tuple[str, ...] = ()  # none: one is generated beside the database (api_key_path)
    api_max_body_bytes: int = 64 * 1024
    max_report_note_chars: int = 500
    # More than one node (contract §16, docs/architecture.md "More than one node"): empty or
    # "memory" is one node; redis://... joins the nodes that share it and the database.
    broker_url: str = ""
    node_id: str = ""  # empty: hostname-pid, chosen at start (winkr.cluster.node_name)
    # Starts every Redis key of the cluster: several deployments (or test runs) may share a Redis.
    redis_key_prefix: str = "winkr:"
    # Load balancers whose connections open with a PROXY header (v1/v2) naming the client
    # (addresses or CIDR networks; winkr/proxy_protocol.py). Empty: no PROXY protocol.
    proxy_protocol_from: tuple[str, ...] = ()
    limits: Limits = Limits()

    @property
    def clustered(self) -> bool:
        """Whether a broker joins this node to others (``broker_url`` names a Redis)."""
        return self.broker_url not in ("", "memory")

    @property
    def database(self) -> DatabaseUrl:
        """The database to use: ``database_url``, or the SQLite file ``db``."""
        return parse_database_url(self.database_url if self.database_url else sqlite_url(self.db))

    @property
    def db_path(self) -> str:
        """The SQLite file; with PostgreSQL, ``db`` (which then only names where the generated
        secret and the run file go)."""
        database = self.database
        return database.path if database.engine == "sqlite" else self.db

    @property
    def secret_path(self) -> Path:
        """Where a generated secret is kept: beside the database."""
        return Path(self.db_path).with_suffix(Path(self.db_path).suffix + ".secret")

    @property
    def api_key_path(self) -> Path:
        """Where a generated server-API key is kept: beside the database."""
        return Path(self.db_path).with_suffix(Path(self.db_path).suffix + ".api-key")


def _integer(value: Any, _: type) -> int:
    """An integer setting: a TOML integer or digits (environment variables, flags). A boolean
    or a fraction is refused rather than read as 1 or truncated (``port = 80.9``)."""
    if isinstance(value, (bool, float)):
        raise ValueError(value)
    return int(value)


def _number(value: Any, _: type) -> float:
    """A number setting (seconds, hours): a TOML number or its text; never a boolean."""
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(int, _integer)
_converter.register_structure_hook(float, _number)
_converter.register_structure_hook_func(
    lambda t: t == tuple[str, ...],
    # A comma-separated string (environment variables) or a TOML array.
    lambda v, _: tuple(s.strip() for s in v.split(",") if s.strip()) if isinstance(v, str) else tuple(map(str, v)),
)

# Durations a server waits on: a deadline of 0 (ping_interval) made a connection's writer spin,
# and NaN crashed the server at its first use. presence_grace and shutdown_timeout may be 0.
_POSITIVE_SECONDS = ("handshake_timeout", "ping_interval", "pong_timeout", "typing_timeout")
_SECONDS_OR_ZERO = ("presence_grace", "shutdown_timeout")


class ConfigError(Exception):
    """The configuration is unusable; the message says which setting, where it came from
    (``port in FILE``, ``WINKR_PORT``, ``--port``) and why."""


MIN_SECRET_BYTES = 32
SECRET_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
_PRIVATE = frozenset({"jwt_secret", "jwt_private_key", "api_keys"})  # never echoed in an error
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "tuple": "a list of strings"}

Origins = dict[tuple[str, ...], tuple[str, str]]
"""Where each given setting came from, by key path (``("limits", "messages_per_minute")``):
its name as written there and where that was (``("port", " (in FILE)")``, ``("WINKR_PORT", "")``)."""


def env_name(key: str) -> str:
    return f"WINKR_{key.upper()}"


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64, padding optional).
    Raises ``ValueError`` for anything else, or for fewer than 24 bytes."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"must start with {WEBHOOK_SECRET_PREFIX}")
    encoded = secret[len(WEBHOOK_SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {WEBHOOK_SECRET_PREFIX} followed by base64") from None
    if len(key) < WEBHOOK_SECRET_MIN_BYTES:
        raise ValueError(f"must encode at least {WEBHOOK_SECRET_MIN_BYTES} random bytes")
    return key


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for field in attrs.fields(Settings):
        if field.name != "limits" and (value := environ.get(env_name(field.name))) is not None:
            found[field.name] = value
    for field in attrs.fields(Limits):
        if (value := environ.get(env_name(field.name))) is not None:
            limits[field.name] = value
    if limits:
        found["limits"] = limits
    return found


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        elif value is not None:
            merged[key] = value
    return merged


def _record(origins: Origins, layer: Mapping[str, Any], describe: Any, prefix: tuple[str, ...] = ()) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping):
            _record(origins, value, describe, (*prefix, key))
        elif value is not None:
            origins[(*prefix, key)] = describe((*prefix, key))


def load_settings(
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from a TOML file, the environment and flags (in that order).

    Raises ``ConfigError`` naming the offending setting as the operator wrote it."""
    raw: dict[str, Any] = {}
    if config_file:
        try:
            raw = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    env = _from_env(os.environ if environ is None else environ)
    origins: Origins = {}
    _record(origins, raw, lambda path: (".".join(path), f" (in {config_file})"))
    _record(origins, env, lambda path: (env_name(path[-1]), ""))
    _record(origins, flags or {}, lambda path: ("--" + path[-1].replace("_", "-") if len(path) == 1
                                                else ".".join(path), ""))
    raw = _merge(_merge(raw, env), flags or {})
    try:
        settings = _converter.structure(raw, Settings)
    except cattrs.BaseValidationError as exc:
        raise ConfigError("; ".join(_describe(line, raw, origins, config_file)
                                    for line in cattrs.transform_error(exc))) from exc
    _check(settings, lambda *path: "".join(origins.get(path, (".".join(path), ""))))
    return settings


def _describe(line: str, raw: Mapping[str, Any], origins: Origins, config_file: str | None) -> str:
    """One cattrs error line (``invalid value for type, expected int @ $.port``) in the
    operator's terms: ``WINKR_PORT='abc' is not an integer``."""
    message, _, where = line.rpartition(" @ ")
    path = tuple(part for part in where.removeprefix("$").split(".") if part)
    if message.startswith("extra fields found"):
        names = message.partition("(")[2].rstrip(")").split(", ")
        section = f"[{'.'.join(path)}] " if path else ""
        source = f" in {config_file}" if config_file else ""
        return (f"unknown setting {section}{', '.join(names)}{source}: "
                "deploy/winkr.example.toml lists every setting")
    name, where = origins.get(path, (".".join(path), ""))
    expected = message.rpartition("expected ")[2]
    value: Any = raw
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    shown = "" if path and path[-1] in _PRIVATE else f"={value!r}"
    return f"invalid setting {name}{shown}{where}: expected {_TYPE_WORDS.get(expected, expected)}"


def _check(settings: Settings, name: Any) -> None:
    """Rules on the values; ``name(*path)`` says where a setting came from."""
    if settings.jwt_algorithm not in ("HS256", "RS256", "ES256"):
        raise ConfigError(f"{name('jwt_algorithm')} must be HS256, RS256 or ES256")
    if settings.jwt_algorithm != "HS256" and not settings.jwt_public_key:
        raise ConfigError(f"jwt_algorithm {settings.jwt_algorithm} needs jwt_public_key (PEM text or a file)")
    if settings.jwt_algorithm == "HS256" and settings.jwt_secret is not None:
        size = len(settings.jwt_secret.encode())
        if size < MIN_SECRET_BYTES:
            raise ConfigError(f"{name('jwt_secret')} is {size} bytes: an HS256 secret needs at least "
                              f"{MIN_SECRET_BYTES} random bytes; make one with {SECRET_HINT}")
    if not settings.db.strip():
        raise ConfigError(f"{name('db')} must name the SQLite database file (default winkr.db)")
    for duration in _POSITIVE_SECONDS + _SECONDS_OR_ZERO:
        value = getattr(settings, duration)
        bound = "> 0" if duration in _POSITIVE_SECONDS else ">= 0"
        if not math.isfinite(value) or value < 0 or (value == 0 and duration in _POSITIVE_SECONDS):
            raise ConfigError(f"{name(duration)} must be a finite number {bound}")
    for port in ("port", "metrics_port", "api_port"):
        value = getattr(settings, port)
        if value is not None and not 0 <= value <= 65535:
            raise ConfigError(f"{name(port)} must be between 0 and 65535 (0 picks a free port)")
    if any(not key.strip() or key != key.strip() for key in settings.api_keys):
        raise ConfigError(f"{name('api_keys')} must not hold an empty key or one with spaces around it")
    if settings.pii_policy not in ("mask", "reject", "allow"):
        raise ConfigError(f"{name('pii_policy')} must be mask, reject or allow")
    if settings.database_url is not None:
        try:
            parse_database_url(settings.database_url)
        except DatabaseUrlError as exc:
            raise ConfigError(f"{name('database_url')}: {exc}") from None
    else:  # the SQLite file `db` is the database: a name it cannot be is refused here, not at start
        try:
            parse_database_url(sqlite_url(settings.db))
        except DatabaseUrlError as exc:
            raise ConfigError(f"{name('db')}: {exc}") from None
    if settings.clustered and urlsplit(settings.broker_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name('broker_url')} must be empty (one node), memory, or a redis://, rediss:// "
                          "or unix:// URL")
    try:
        parse_networks(settings.proxy_protocol_from)
    except ValueError as exc:
        raise ConfigError(f"{name('proxy_protocol_from')}: {exc}") from None
    if not settings.redis_key_prefix or any(c.isspace() for c in settings.redis_key_prefix):
        raise ConfigError(f"{name('redis_key_prefix')} must be non-empty, without spaces (e.g. winkr:)")
    if settings.node_id and (settings.node_id != settings.node_id.strip() or "|" in settings.node_id
                             or len(settings.node_id) > 100):
        raise ConfigError(f"{name('node_id')} must be at most 100 characters without spaces around it or '|'")
    if settings.sqlite_synchronous.upper() not in ("NORMAL", "FULL"):
        raise ConfigError(f"{name('sqlite_synchronous')} must be NORMAL or FULL")
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"{name('log_format')} must be text or json")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{name('log_level')} must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    for field in attrs.fields(Limits):
        if getattr(settings.limits, field.name) < 0:
            raise ConfigError(f"{name('limits', field.name)} must be >= 0 (0 switches the limit off)")
    _check_webhooks(settings)


def _check_webhooks(settings: Settings) -> None:
    # Messages name the setting, never echo the secret.
    if settings.webhook_secret is not None:
        try:
            webhook_key(settings.webhook_secret)
        except ValueError as exc:
            raise ConfigError(f"webhook_secret {exc} (Standard Webhooks form, e.g. whsec_ + "
                              "base64 of 32 random bytes)") from None
    if unknown := sorted(set(settings.webhook_events) - set(WEBHOOK_EVENTS)):
        raise ConfigError(f"webhook_events: unknown {', '.join(unknown)}; known: {', '.join(WEBHOOK_EVENTS)}")
    for hours_or_seconds in ("webhook_timeout_seconds", "webhook_max_age_hours"):
        value = getattr(settings, hours_or_seconds)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{hours_or_seconds} must be a finite number > 0")
    if not settings.webhook_url:
        return
    url = urlsplit(settings.webhook_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("webhook_url must be an http:// or https:// URL with a host")
    if settings.webhook_secret is None:
        raise ConfigError("webhook_url is set but webhook_secret is not: set webhook_secret "
                          "(or WINKR_WEBHOOK_SECRET) to whsec_ + base64 of at least 24 random bytes")
