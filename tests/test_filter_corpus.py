"""Filter corpora (tests/corpus/): every evasion is caught, every ordinary sentence untouched.

Each line goes through ``check_message``, the policy entry point the server calls, with the
shipped block list and ``pii_policy = "mask"``. Format: tests/corpus/README.md.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from winkr.errors import VALIDATION_ERROR, ProtocolError
from winkr.policy import PolicySettings, check_message, default_blocked_words

CORPUS = Path(__file__).parent / "corpus"
SETTINGS = PolicySettings(blocked_words=default_blocked_words())
REJECT = PolicySettings(blocked_words=default_blocked_words(), pii_policy="reject")
KINDS = ("blocked", "phone", "email", "card")
FLAG = {"blocked": "filtered", "phone": "pii_masked", "email": "pii_masked", "card": "pii_masked"}
MIN_LINES = 40
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})")


def _unescape(line: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), line)


def read_corpus(name: str) -> list[str]:
    lines = (CORPUS / name).read_text(encoding="utf-8").splitlines()
    return [_unescape(line) for line in lines if line.strip() and not line.startswith("#")]


def targets(line: str) -> tuple[str, list[tuple[int, int]]]:
    """The line without ``⟦ ⟧`` markers, and the spans they enclosed (all of it if none)."""
    text, spans, pos = "", [], 0
    for m in re.finditer(r"⟦(.*?)⟧", line):
        text += line[pos:m.start()]
        spans.append((len(text), len(text) + len(m.group(1))))
        text += m.group(1)
        pos = m.end()
    text += line[pos:]
    return text, spans or [(0, len(text))]


def cases(prefix: str) -> list[tuple[str, str]]:
    return [(kind, line) for kind in KINDS for line in read_corpus(f"{prefix}_{kind}.txt")]


@pytest.mark.parametrize("name", [f"{p}_{k}.txt" for p in ("evasions", "ordinary") for k in KINDS])
def test_corpus_files_are_big_enough(name: str) -> None:
    assert len(read_corpus(name)) >= MIN_LINES


@pytest.mark.parametrize(("kind", "line"), cases("evasions"))
def test_evasion_is_masked(kind: str, line: str) -> None:
    text, spans = targets(line)
    result = check_message("text", text, None, is_service=False, settings=SETTINGS)
    masked = result.content
    assert result.metadata.get(FLAG[kind]) is True, masked
    assert len(masked) == len(text)
    inside = {i for s, e in spans for i in range(s, e)}
    for i, (before, after) in enumerate(zip(text, masked)):
        if i in inside:
            assert after == "*", f"{text!r} -> {masked!r}: {before!r} at {i} not masked"
        else:
            assert after == before, f"{text!r} -> {masked!r}: {before!r} at {i} changed"


@pytest.mark.parametrize(("kind", "line"), [c for c in cases("evasions") if c[0] != "blocked"])
def test_pii_evasion_is_refused_under_reject(kind: str, line: str) -> None:
    text, _ = targets(line)
    with pytest.raises(ProtocolError) as info:
        check_message("text", text, None, is_service=False, settings=REJECT)
    assert (info.value.code, info.value.field) == (VALIDATION_ERROR, "content")


@pytest.mark.parametrize(("kind", "line"), cases("ordinary"))
def test_ordinary_text_is_untouched(kind: str, line: str) -> None:
    result = check_message("text", line, None, is_service=False, settings=SETTINGS)
    assert result.content == line
    assert "filtered" not in result.metadata and "pii_masked" not in result.metadata


def test_every_ordinary_line_together_is_untouched() -> None:
    # Neighbouring lines must not combine into a match either (numbers across lines, words).
    for kind in KINDS:
        text = "\n".join(read_corpus(f"ordinary_{kind}.txt"))[:2000]
        result = check_message("text", text, None, is_service=False, settings=SETTINGS)
        assert result.content == text, kind
