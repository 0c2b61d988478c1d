"""Logging setup: human-readable lines, or JSON lines with ``--log-format json``.

Structured fields travel in ``extra=``; never put a token, message content or PII there.
With JSON, everything winkr writes is JSON: log records (stderr), Python warnings (routed
through logging), and the lines for machines on stdout (``json_line``), so journald, which
collects both streams, never sees the formats mixed.
"""
from __future__ import annotations

import logging
import sys
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


def json_line(message: str, *, logger: str = "winkr", level: int = logging.INFO, **fields: object) -> str:
    """One JSON object shaped like a log record (``ts``, ``level``, ``logger``, ``msg`` and
    ``fields``), for a line written to stdout in JSON mode."""
    record = logging.LogRecord(logger, level, "", 0, message, (), None)
    record.__dict__.update(fields)
    return JsonFormatter().format(record)
