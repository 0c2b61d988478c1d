"""Issue 8 items 6 and 8 end to end through the server: invisible-only text is refused and
never broadcast; evasions of the block list and PII filters are masked in what the other
side receives and in history, with the sender's other characters kept.

The real server over in-memory streams under trio's MockClock (autojump).
"""
from __future__ import annotations

from typing import Any

import pytest
from conftest import URL, Harness, history_messages, joined_pair, send_ok, send_refused


@pytest.mark.parametrize("content", [
    "\u200b", "\u202e\u200d", "\u3164", "\u115f\u1160", "\uffa0", " \u200b\n\ufe0f ",
])
async def test_invisible_only_text_is_refused_and_not_broadcast(autojump_clock: Any, harness: Harness,
                                                                 content: str) -> None:
    alice, bob, conv = await joined_pair(harness)
    await send_refused(alice, bob, conv, {"type": "text", "content": content, "metadata": {}},
                       "VALIDATION_ERROR", "content")


async def test_invisible_only_caption_is_no_caption(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "photo", "content": "\u200b\u3164",
                                               "metadata": {"url": URL}})
    assert message["content"] == ""


@pytest.mark.parametrize(("content", "expected", "flag"), [
    ("what the f*ck", "what the ****", "filtered"),
    ("ｓｈｉｔ, really", "****, really", "filtered"),
    ("oh f\u200buck", "oh *****", "filtered"),
    ("call 415_555_2671 now", "call ************ now", "pii_masked"),
    ("call 415*555*2671", "call ************", "pii_masked"),
    ("card 4111.1111.1111.1111", "card *******************", "pii_masked"),
    ("mail jane＠example.com", "mail ****************", "pii_masked"),
])
async def test_evasions_are_masked_in_what_is_relayed_and_stored(
        autojump_clock: Any, harness: Harness, content: str, expected: str, flag: str) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content, "metadata": {}})
    assert message["content"] == expected
    assert message["metadata"].get(flag) is True
    stored = (await history_messages(bob, conv))[0]
    assert stored["content"] == expected


@pytest.mark.parametrize("content", [
    "we stay 12.05.2024 - 15.05.2024", "order number 123-456-7890", "spic and span", "Twatt",
])
async def test_ordinary_text_is_relayed_untouched(autojump_clock: Any, harness: Harness, content: str) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content, "metadata": {}})
    assert message["content"] == content
    assert "filtered" not in message["metadata"] and "pii_masked" not in message["metadata"]
