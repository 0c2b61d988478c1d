#!/usr/bin/env python3
"""Content-policy benchmark: µs per message through ``check_message`` (block list + PII).

usage: python scripts/bench_policy.py [--rounds 5] [--json]

The policy runs per message on the event loop, so its cost is latency for everyone in the
process. Four mixes are timed separately, each the best of ``--rounds`` passes over its
messages (robust against a noisy shared machine):

- chat:        short ordinary texts (greetings, emoji, a little punctuation)
- numbers:     ordinary texts with times, dates, prices, versions, and some real PII
- unicode:     ordinary texts in other scripts, emoji-heavy, full-width and accented text
- adversarial: 2000-character worst cases (symbol runs, digit stuffing, homoglyph and
               invisible-character floods, long near-miss words)

The adversarial rows are also printed one by one (max µs), so a super-linear input shows up
as an outlier rather than disappearing into a mean, with the ratio of its cost at 2000 and
at 500 characters: about 4 is linear, less is a budget cutting in, clearly more than 4
would be super-linear (the filters themselves are called directly for this, since the
policy refuses text over 2000 characters).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from winkr.errors import ProtocolError
from winkr.policy import PolicySettings, check_message, default_blocked_words, find_pii, mask_blocked

CHAT = [
    "hey!", "how are you?", "lol", "see you tonight 😊", "that's so cool", "good morning ☀️",
    "What are you up to this weekend?", "I love hiking and bad puns", "haha same",
    "ok", "Where did you grow up?", "coffee or tea?", "👍", "sounds great, let's do it",
    "I'm a bit shy at first but I warm up quickly", "do you have any pets?",
    "my cat is called Dickens", "we went to Scunthorpe for the weekend", "classic move",
    "I assume you like cocktails?", "just finished my shift, so tired",
] * 5

NUMBERS = [
    "see you at 10:30", "The party is on 2025-01-01, are you coming?", "dinner was $25.99 each",
    "update to version 2.14.3 fixed it", "I'm 5'11\" if that matters", "ok 5 minutes",
    "we stay 12.05.2024 - 15.05.2024 in Rome", "order number 123-456-7890 arrived",
    "I ran 10000 steps today and 12000 yesterday", "the match ended 110-98 in overtime",
    "call me 415-555-2671", "my number is 415_555_2671", "mail jane.doe@example.com",
    "card 4111.1111.1111.1111", "born 1998-07-23, 27 years old", "flight UA 1234 lands 6:45",
] * 5

UNICODE = [
    "привет, как дела?", "Γειά σου, τι κάνεις;", "今日はいい天気ですね", "¿Qué tal tu día?",
    "😂😂😂 no way", "ｈｅｌｌｏ ｔｈｅｒｅ", "Crème brûlée at the café?", "שלום מה שלומך",
    "मैं ठीक हूँ, धन्यवाद", "👨‍👩‍👧 family trip!", "naïve coöperation",
    "call ４１５ ５５５ ２６７１", "ｆｕｃｋ this", "ѕһіт happens",
] * 5

ADVERSARIAL = {
    "symbols $": "$" * 2000,
    "s.s.s.": "s." * 1000,
    "a.s.": "a.s." * 500,
    "f*": "f*" * 1000,
    "near-miss fuc ": "fuc " * 500,
    "fuckfuck glued": "fuck" * 500,
    "stars": "*" * 2000,
    "digits 1-": "1-" * 1000,
    "digits 1_": "1_" * 1000,
    "digits run": "1" * 2000,
    "phones": "415 555 2671 " * 150,
    "phones _": "415_555_2671 " * 150,
    "uk phones": "020 7946 0958, " * 133,
    "dates": "12.05.2024 - 15.05.2024 " * 83,
    "emails": "a@b.co " * 285,
    "at at": "a at " * 400,
    "a@a.": "a@" + "a." * 999,
    "zwsp (blank, refused)": "\u200b" * 2000,
    "zwsp words": "f\u200bu\u200bc\u200bk " * 222,
    "cyrillic": "ѕһіт " * 400,
    "fullwidth": "ｆｕｃｋ " * 400,
    "zalgo": ("s\u0301\u0302\u0303h\u0301i\u0301t\u0301 ") * 166,
    "emoji": "🙂" * 2000,
    "mixed": ("ok 12:30 f*ck 4111 1111 1111 1111 mail a@b.co call 415.555.2671 " * 40)[:2000],
}


def best_us(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = parser.parse_args()
    settings = PolicySettings(blocked_words=default_blocked_words())

    def run(texts: list[str]) -> Callable[[], None]:
        def go() -> None:
            for text in texts:
                try:
                    check_message("text", text, None, is_service=False, settings=settings)
                except ProtocolError:
                    pass  # refused (a blank message): still timed

        return go

    for text in CHAT + NUMBERS + UNICODE + list(ADVERSARIAL.values()):
        run([text])()  # warm up: compiled patterns, phonenumbers metadata, fold tables
    results: dict[str, float] = {}
    for name, texts in (("chat", CHAT), ("numbers", NUMBERS), ("unicode", UNICODE)):
        results[name] = best_us(run(texts), args.rounds) / len(texts)
    per_input = {name: best_us(run([text]), args.rounds) for name, text in ADVERSARIAL.items()}
    words = settings.blocked_words

    def filters(text: str) -> Callable[[], None]:
        def go() -> None:
            mask_blocked(text, words)
            find_pii(text)
        return go

    scaling = {
        name: best_us(filters(text), args.rounds) / max(best_us(filters(text[:500]), args.rounds), 1e-3)
        for name, text in ADVERSARIAL.items()
    }
    results["adversarial_mean"] = statistics.fmean(per_input.values())
    results["adversarial_max"] = max(per_input.values())
    results["worst_scaling_2000_vs_500"] = max(scaling.values())
    if args.json:
        print(json.dumps({k: round(v, 1) for k, v in results.items()}))
        return
    print(f"{'mix':<22} {'µs/message':>11}")
    for name, value in results.items():
        print(f"{name:<22} {value:>11.1f}")
    print()
    print(f"{'adversarial input (2000 chars)':<32} {'µs':>9} {'x(2000/500)':>12}")
    for name, value in sorted(per_input.items(), key=lambda kv: -kv[1]):
        print(f"{name:<32} {value:>9.1f} {scaling[name]:>12.1f}")


if __name__ == "__main__":
    main()
