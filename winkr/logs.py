"""Logging setup: human-readable lines, or JSON lines with ``--log-format json``.

Structured fields travel in ``extra=``; never put a token, message content or PII there.
With JSON, everything winkr writes is JSON: log records (stderr), Python warnings (routed
through logging), and the lines for machines on stdout (``json_line``), so journald, which
collects both streams, never sees the formats mixed.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
            **_extras(record)}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning is a log record too, in the same format


class _Throttle:
    """Per key, whether to log now: at most once per ``interval`` seconds; what was held back
    in between is counted. Bounded: the oldest keys are forgotten past 1,000."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[Hashable, tuple[float, int]] = {}  # key -> (logged at, suppressed since)

    def admit(self, key: Hashable, now: float) -> tuple[bool, int, float]:
        """``(log it, how many were held back, seconds since the last one logged)``."""
        logged_at, suppressed = self._last.get(key, (-math.inf, 0))
        if now - logged_at < self._interval:
            self._last[key] = (logged_at, suppressed + 1)
            return False, suppressed + 1, now - logged_at
        if len(self._last) > 1000:
            self._last = dict(sorted(self._last.items(), key=lambda item: item[1][0])[-500:])
        self._last[key] = (now, 0)
        return True, suppressed, now - logged_at


class ThrottledLog:
    """Tracebacks at most once per kind per ``interval`` seconds, so a flood of bad requests
    cannot flood the log: the first of a kind is logged with its traceback, the rest are
    counted and reported in one line when the next one of that kind is logged after the
    interval. A kind is the exception's type and the place it was raised.

    Owned by one module; used only from the trio thread (no locking needed)."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._log = logger
        self._throttle = _Throttle(interval)

    def exception(self, exc: BaseException, message: str, *args: object) -> None:
        """Log ``message`` with ``exc``'s traceback, unless this kind was logged recently."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        kind = (type(exc).__qualname__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
        log_it, suppressed, since = self._throttle.admit(kind, time.monotonic())
        if not log_it:
            return
        if suppressed:
            message += f" (and {suppressed} more like it in the last {since:.0f} s)"
        self._log.error(message, *args, exc_info=exc)


class ThrottledLines:
    """Log lines at most once per key per ``interval`` seconds, for lines a client can cause at
    will (a refused handshake): the first of a key is logged, the rest are counted and the
    count rides on the next line of that key (field ``suppressed``). ``clock`` is in seconds
    (trio time in the server, so tests can move it). Owned by one actor; used only from the
    trio thread."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float], interval: float = 60.0) -> None:
        self._log = logger
        self._clock = clock
        self._throttle = _Throttle(interval)

    def info(self, key: Hashable, message: str, **fields: object) -> None:
        log_it, suppressed, _ = self._throttle.admit(key, self._clock())
        if log_it:
            self._log.info(message, extra={**fields, "suppressed": suppressed} if suppressed else fields)


def json_line(message: str, *, logger: str = "winkr", level: int = logging.INFO, **fields: object) -> str:
    """One JSON object shaped like a log record (``ts``, ``level``, ``logger``, ``msg`` and
    ``fields``), for a line written to stdout in JSON mode."""
    record = logging.LogRecord(logger, level, "", 0, message, (), None)
    record.__dict__.update(fields)
    return JsonFormatter().format(record)
