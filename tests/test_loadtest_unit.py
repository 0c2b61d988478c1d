"""Unit tests of scripts/loadtest.py's pure helpers: the letters-only codec (scripts/_common.py), percentiles,
reservoir sampling, the delivery ledger (loss, duplicates, seq order) and the run plan.
No server needed."""
from __future__ import annotations

import random

import pytest

from scripts import loadtest as lt
from scripts._common import decode_letters, encode_letters


# -- letters-only codec ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 255, 256, 10**9, 2**63 - 1,
                               1_700_000_000_123_456_789])
def test_letters_round_trip(n: int) -> None:
    s = encode_letters(n)
    assert decode_letters(s) == n
    assert s.isalpha() and s.islower()
    assert not any(c in "aeiouy0123456789" for c in s)


def test_letters_random_round_trip() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randrange(2**64)
        assert decode_letters(encode_letters(n)) == n


@pytest.mark.parametrize("bad", ["", "a", "b1", "B", "bc d", "*"])
def test_decode_letters_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_letters(bad)


def test_encode_letters_rejects_negative() -> None:
    with pytest.raises(ValueError):
        encode_letters(-1)


def test_content_round_trip_has_no_digits() -> None:
    t = 123_456_789_012_345
    text = lt.make_content(t, 17, 42, "see you later")
    assert not any(ch.isdigit() for ch in text)
    assert lt.parse_content(text) == (t, 17, 42)


@pytest.mark.parametrize("bad", ["", "hello", "******* bc df rest", "bc df"])
def test_parse_content_rejects_mangled_text(bad: str) -> None:
    with pytest.raises(ValueError):
        lt.parse_content(bad)


# -- percentiles and latency -----------------------------------------------------------------------
def test_percentile_nearest_rank() -> None:
    vals = list(range(1, 101))  # 1..100
    assert lt.percentile(vals, 50) == 50
    assert lt.percentile(vals, 95) == 95
    assert lt.percentile(vals, 99) == 99
    assert lt.percentile(vals, 100) == 100
    assert lt.percentile([5], 99) == 5
    assert lt.percentile([1, 2], 50) == 1
    assert lt.percentile([], 50) is None


def test_latency_summary_ms() -> None:
    s = lt.latency_summary_ms([3000, 1000, 2000, 4000], max_us=9000)
    assert s == {"p50": 2.0, "p95": 4.0, "p99": 4.0, "max": 9.0}
    assert lt.latency_summary_ms([], None) == {"p50": None, "p95": None, "p99": None, "max": None}
    assert lt.latency_summary_ms([1500], None)["max"] == 1.5


def test_reservoir_is_bounded_and_keeps_exact_max() -> None:
    r = lt.Reservoir(cap=100, rng=random.Random(1))
    for v in range(10_000):
        r.add(v)
    r.add(5)
    assert len(r.samples) == 100
    assert r.seen == 10_001
    assert r.max == 9_999
    # roughly uniform: the median of the sample is near the true median
    assert 3_000 < lt.percentile(sorted(r.samples), 50) < 7_000


def test_reservoir_below_cap_keeps_everything() -> None:
    r = lt.Reservoir(cap=100)
    for v in (5, 1, 3):
        r.add(v)
    assert sorted(r.samples) == [1, 3, 5] and r.max == 5


def test_merge_reservoirs_weights_parts_by_values_seen() -> None:
    # part A: 100 samples standing for 1,000 values; part B: 100 samples for 100 values
    a = [1000] * 100
    b = [1] * 100
    merged = lt.merge_reservoirs([(a, 1000), (b, 100)], random.Random(0))
    assert merged.count(1000) == 100
    assert merged.count(1) == 10  # thinned to the same values-per-sample ratio
    assert lt.merge_reservoirs([([], 0)]) == []
    assert sorted(lt.merge_reservoirs([([1, 2], 2), ([3], 1)])) == [1, 2, 3]


# -- the delivery ledger ---------------------------------------------------------------------------
def test_ledger_everything_delivered() -> None:
    led = lt.ConversationLedger(2, base_seq=10)
    assert led.on_ack(0, 11) == lt.OK  # member 0 sent seq 11
    assert led.on_peer(1, 11) == lt.OK  # member 1 got it
    assert led.on_ack(1, 12) == lt.OK
    assert led.on_peer(0, 12) == lt.OK
    assert led.missing([0, 1]) == (0, 0)
    assert led.unacknowledged_received() == 0


def test_ledger_counts_lost_messages_once_per_message() -> None:
    led = lt.ConversationLedger(3)
    led.on_ack(0, 1)  # received by nobody
    led.on_ack(0, 2)
    led.on_peer(1, 2)  # member 2 misses it
    led.on_ack(1, 3)
    led.on_peer(0, 3)
    led.on_peer(2, 3)
    assert led.missing([0, 1, 2]) == (2, 3)  # seqs 1 and 2; three missing deliveries
    assert led.missing([0, 1]) == (1, 1)  # member 2 not accountable: only seq 1 (to member 1)
    assert led.missing([]) == (0, 0)


def test_ledger_sender_is_not_expected_to_receive_its_own_message() -> None:
    led = lt.ConversationLedger(2)
    led.on_ack(0, 1)
    assert led.missing([0]) == (0, 0)
    assert led.missing([1]) == (1, 1)


def test_ledger_history_counts_as_received_and_is_not_a_duplicate() -> None:
    led = lt.ConversationLedger(2)
    led.on_ack(0, 1)
    led.on_ack(0, 2)
    assert led.on_peer(1, 1) == lt.OK
    assert led.on_history(1, 1) is False  # already had it
    assert led.on_history(1, 2) is True  # caught up
    assert led.missing([0, 1]) == (0, 0)
    assert led.max_peer_seq[1] == 2


def test_ledger_live_duplicate_on_one_connection() -> None:
    led = lt.ConversationLedger(2)
    led.on_ack(0, 1)
    assert led.on_peer(1, 1) == lt.OK
    assert led.on_peer(1, 1) == lt.DUPLICATE
    led.new_connection(1)  # a new connection may see it again (e.g. never, but no dup)
    assert led.on_peer(1, 1) == lt.OK


def test_ledger_double_ack_and_ack_plus_echo_are_duplicates() -> None:
    led = lt.ConversationLedger(2)
    assert led.on_ack(0, 1) == lt.OK
    assert led.on_ack(0, 1) == lt.DUPLICATE
    assert led.on_own_echo(0, 1) == lt.DUPLICATE
    assert led.on_own_echo(0, 2) == lt.OK
    assert led.on_ack(0, 2) == lt.DUPLICATE  # echo then ack of a message sent once


def test_ledger_resent_message_may_meet_its_first_copy_once() -> None:
    led = lt.ConversationLedger(2)
    # first copy (from the previous connection) echoed, then the re-send acknowledged
    assert led.on_own_echo(0, 1) == lt.OK
    assert led.on_ack(0, 1, resent=True) == lt.OK
    assert led.on_own_echo(0, 1) == lt.DUPLICATE
    # the other order
    assert led.on_ack(0, 2, resent=True) == lt.OK
    assert led.on_own_echo(0, 2) == lt.OK
    assert led.on_ack(0, 2, resent=True) == lt.DUPLICATE


def test_ledger_seq_order_and_conflicts() -> None:
    led = lt.ConversationLedger(3)
    assert led.on_peer(2, 2) == lt.OK
    assert led.on_peer(2, 1) == lt.OUT_OF_ORDER  # received, but after a higher seq
    assert led.got[2][0] == 1
    assert led.on_ack(0, 5) == lt.OK
    assert led.on_ack(1, 5) == lt.SEQ_CONFLICT  # two acknowledged messages with one seq
    assert led.on_peer(0, 0) == lt.BAD_SEQ  # at or below the base
    assert led.on_peer(0, "3") == lt.BAD_SEQ
    assert led.on_peer(0, 3.0) == lt.BAD_SEQ
    assert led.on_history(0, None) is False


def test_ledger_unacknowledged_received_finds_second_copies() -> None:
    led = lt.ConversationLedger(2)
    led.on_peer(1, 1)  # first copy of a message, stored but its ack was lost
    led.on_ack(0, 2, resent=True)  # the re-send stored again under a new seq
    led.on_peer(1, 2)
    assert led.unacknowledged_received() == 1


def test_ledger_grows_for_large_seqs() -> None:
    led = lt.ConversationLedger(2)
    assert led.on_ack(0, 100_000) == lt.OK
    assert led.missing([1]) == (1, 1)
    assert led.on_history(1, 100_000) is True
    assert led.missing([1]) == (0, 0)


# -- plan, mix, verdict, target ------------------------------------------------------------------
@pytest.mark.parametrize("users,size,share", [
    (2, 2, 0.2), (3, 2, 0.2), (5, 2, 0.0), (100, 2, 0.2), (101, 2, 0.2), (1000, 3, 0.5),
    (11, 10, 0.0), (17, 2, 1.0), (20000, 2, 0.2),
])
def test_plan_conversations_covers_every_user_once(users: int, size: int, share: float) -> None:
    convs = lt.plan_conversations(users, size, share, seed=3)
    flat = [u for c in convs for u in c]
    assert sorted(flat) == list(range(1, users + 1))
    assert all(2 <= len(c) <= lt.MAX_GROUP for c in convs)


def test_plan_conversations_share_of_groups() -> None:
    convs = lt.plan_conversations(1000, 2, 0.2, seed=1)
    grouped = sum(len(c) for c in convs if len(c) >= 3)
    assert 190 <= grouped <= 210
    assert all(len(c) <= 5 for c in convs)
    assert lt.plan_conversations(1000, 2, 0.2, seed=1) == convs  # deterministic


def test_plan_conversations_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        lt.plan_conversations(1)
    with pytest.raises(ValueError):
        lt.plan_conversations(10, group_size=11)


def test_split_among_workers_balances_users() -> None:
    convs = lt.plan_conversations(1001, 2, 0.2, seed=2)
    buckets = lt.split_among_workers(convs, 4)
    loads = [sum(len(c) for c in b) for b in buckets]
    assert sum(loads) == 1001 and max(loads) - min(loads) <= 5
    assert len(lt.split_among_workers([[1, 2]], 8)) == 1  # no empty workers


def test_parse_mix() -> None:
    assert lt.parse_mix("") == lt.DEFAULT_MIX
    mix = lt.parse_mix("send=1, reconnect=0")
    assert mix["send"] == 1.0 and mix["reconnect"] == 0.0
    assert mix["typing"] == lt.DEFAULT_MIX["typing"]
    for bad in ("foo=1", "send", "send=x", "send=-1"):
        with pytest.raises(ValueError):
            lt.parse_mix(bad)
    with pytest.raises(ValueError):
        lt.parse_mix("send=0,typing=0,read=0,rejoin=0,reconnect=0")


def _summary(**kw: int) -> dict[str, int]:
    base = {"lost": 0, "duplicated": 0, "resend_duplicates": 0, "seq_errors": 0,
            "unacknowledged": 0, "users_unavailable": 0, "acknowledged": 10}
    base.update(kw)
    return base


def test_exit_code() -> None:
    assert lt.exit_code(_summary()) == 0
    for key in ("lost", "duplicated", "resend_duplicates", "seq_errors", "unacknowledged",
                "users_unavailable"):
        assert lt.exit_code(_summary(**{key: 1})) == 1
        assert lt.failures(_summary(**{key: 2})) == [f"{key} 2"]
    assert lt.exit_code(_summary(acknowledged=0)) == 1


def test_check_target() -> None:
    lt.check_target("ws://127.0.0.1:8080/ws", allow_remote=False)
    lt.check_target("ws://[::1]:8080/ws", allow_remote=False)
    lt.check_target("ws://localhost:8080/ws", allow_remote=False)
    with pytest.raises(ValueError):
        lt.check_target("ws://8.8.8.8/ws", allow_remote=False)
    lt.check_target("wss://8.8.8.8/ws", allow_remote=True)
    with pytest.raises(ValueError):
        lt.check_target("http://127.0.0.1/ws", allow_remote=True)


def test_cli_bounds() -> None:
    ap = lt.build_parser()
    args = ap.parse_args([])
    assert (lt.node_urls(args.url), args.users, args.group_size, args.duration, args.window) == (
        ["ws://127.0.0.1:8080/ws"], 100, 2, 30.0, 32)
    two = ap.parse_args(["--url", "ws://127.0.0.1:1/ws", "--url", "ws://127.0.0.1:2/ws,ws://127.0.0.1:3/ws"])
    assert lt.node_urls(two.url) == ["ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws", "ws://127.0.0.1:3/ws"]
    for bad in (["--users", "20001"], ["--duration", "601"], ["--rate", "1", "--max"],
                ["--window", "0"], ["--group-share", "2"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)


def test_the_members_of_a_conversation_go_to_different_nodes() -> None:
    for nodes in (2, 3):
        for conv in lt.plan_conversations(200, 2, 0.2, seed=3):
            placed = [lt.node_of_member(conv[0], slot, nodes) for slot in range(len(conv))]
            assert placed[0] != placed[1]  # the two sides of every conversation (and groups' first two)
            assert all(0 <= node < nodes for node in placed)
    assert {lt.node_of_member(first, 0, 3) for first in range(9)} == {0, 1, 2}  # creators spread too
    assert lt.node_of_member(7, 1, 1) == 0  # one node: everyone there
