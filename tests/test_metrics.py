"""The Prometheus metrics move with the traffic, and the scrape endpoint serves them."""
from __future__ import annotations

import urllib.request
from typing import Any

import trio
from conftest import Harness, metric, send_text, until


async def test_counters_follow_the_traffic(harness: Harness) -> None:
    metrics = harness.server.metrics
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    assert metric(metrics.text(), "winkr_connections") == 2
    conv = await harness.conversation(alice, "bob")
    await bob.request("conversation:join", {"conversation_id": conv})
    for i in range(3):
        await send_text(alice, conv, f"hello {i}")
    await alice.request("message:send", {"conversation_id": conv, "type": "nope", "content": "x"})
    await alice.send_raw("not json")
    await alice.expect("error")
    text = metrics.text()
    assert metric(text, "winkr_events_received_total", event="message:send") == 4
    assert metric(text, "winkr_errors_total", code="INVALID_MESSAGE_TYPE") == 1
    assert metric(text, "winkr_errors_total", code="VALIDATION_ERROR") == 1
    assert metric(text, "winkr_frames_encoded_total", event="message:new") == 6  # ack + broadcast each
    assert metric(text, "winkr_message_fanout_seconds_count") == 3
    assert metric(text, "winkr_store_commit_seconds_count") >= 3
    await bob.close()
    await until(lambda: metric(metrics.text(), "winkr_connections") == 1)


async def test_refused_handshakes_are_counted(harness: Harness) -> None:
    from trio_websocket import ConnectionRejected

    try:
        async with trio.open_nursery() as nursery:
            harness.nursery = nursery
            await harness.open_ws(headers=[("Authorization", "Bearer not-a-token")])
    except* ConnectionRejected:
        pass
    assert metric(harness.server.metrics.text(), "winkr_handshakes_refused_total", code="UNAUTHORIZED") == 1


async def test_scrape_endpoint_serves_the_registry(harness: Harness) -> None:
    port = harness.server.metrics.serve_http(0, "127.0.0.1")
    await harness.connect("alice")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    text = await trio.to_thread.run_sync(scrape)
    assert metric(text, "winkr_connections") == 1
    assert "# TYPE winkr_store_commit_seconds histogram" in text


async def test_rooms_online_users_limits_and_closes_are_counted(tmp_path: Any, engine: Any) -> None:
    from conftest import make_settings, start_server

    settings = make_settings(tmp_path, limits={"typing_per_minute": 1})
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, settings)
        harness = Harness(server, nursery, settings)
        alice = await harness.connect("alice")
        bob = await harness.connect("bob")
        conv = await harness.conversation(alice, "bob")
        await alice.request("conversation:join", {"conversation_id": conv})
        await alice.send("typing:start", {"conversation_id": conv})
        await alice.send("typing:stop", {"conversation_id": conv})
        await alice.expect("error")
        text = server.metrics.text()
        assert metric(text, "winkr_online_users") == 2
        assert metric(text, "winkr_rooms") == 1
        assert metric(text, "winkr_rate_limited_total", limit="1/minute") == 1
        assert metric(text, "winkr_handshakes_accepted_total") == 2
        await bob.close()
        await alice.nothing_more(10)  # past the presence grace period
        text = server.metrics.text()
        assert metric(text, "winkr_online_users") == 1
        assert metric(text, "winkr_connections_closed_total", reason="client_closed") == 1
        server.request_shutdown()


async def test_process_metrics_are_served_and_created_series_are_not(harness: Harness) -> None:
    """Issue 13: memory, file descriptors and CPU from prometheus_client's process collector
    (Linux: /proc), the version, and none of the ``*_created`` timestamp series."""
    import sys

    from winkr import __version__

    await harness.connect("alice")
    text = harness.server.metrics.text()
    assert "_created" not in text
    assert metric(text, "winkr_info", version=__version__) == 1
    if sys.platform == "linux":
        assert metric(text, "process_resident_memory_bytes") > 10_000_000
        assert metric(text, "process_open_fds") >= 3
        assert metric(text, "process_cpu_seconds_total") > 0
        assert metric(text, "process_max_fds") > 0


def test_plain_int_histogram_exposes_what_prometheus_client_would() -> None:
    """The lock-free histogram (per frame/write/message on the hot path) renders the same
    buckets, count and sum as prometheus_client's own Histogram given the same values,
    including values on a bound, below the first and above the last."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from winkr.metrics import FastHistogram, _Collector

    bounds = (0.0005, 0.001, 0.5, 1.0, 5.0)
    values = [0.0, 0.0005, 0.0007, 0.001, 0.3, 1.0, 1.5, 5.0, 9.0, 0.0001]
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "doc", buckets=bounds, registry=theirs)
    fast = FastHistogram("h_seconds", "doc", bounds)
    ours.register(_Collector([fast]))
    for value in values:
        reference.observe(value)
        fast.observe(value)
    def lines(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]
    assert lines(ours) == lines(theirs)
