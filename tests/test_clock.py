"""winkr.clock.iso: RFC 3339 with milliseconds, the same string whichever seconds interleave
(its cache holds the last two seconds' formatting)."""
from __future__ import annotations

from datetime import UTC, datetime

from winkr.clock import iso


def _expected(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def test_iso_agrees_with_datetime_across_interleaved_seconds() -> None:
    stamps = [1_767_225_600.25, 1_767_225_601.5, 1_767_225_600.999, 1_767_225_602.0, 1_767_225_600.001,
              1_767_225_601.0, 0.0, 1.5, 86_399.9994, 951_782_400.123]  # 951782400: 2000-02-29
    for _ in range(2):  # again, now that each second is cached
        assert [iso(ts) for ts in stamps] == [_expected(ts) for ts in stamps]


def test_iso_pads_every_field() -> None:
    assert iso(1_767_225_600.007) == "2026-01-01T00:00:00.007Z"
    assert iso(3_661.05) == "1970-01-01T01:01:01.050Z"
