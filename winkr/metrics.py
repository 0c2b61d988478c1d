"""Prometheus metrics (prometheus_client), one registry per server.

Counting is cheap and happens where the thing happens: events in (connection), frames
encoded by event (``Frames``), errors by code, refused handshakes by code, store commit
latency (writer), send→fan-out latency (room), open connections. Each registry also
carries prometheus_client's process collector (``process_resident_memory_bytes``,
``process_open_fds``, ``process_cpu_seconds_total``, ... from ``/proc``, Linux only), its
platform collector (``python_info``) and ``winkr_info{version}``. The ``*_created`` series
(one per counter and histogram, the creation timestamp) are switched off process-wide: they
are noise for dashboards. The HTTP endpoint (``--metrics-port``) is prometheus_client's own
server on a daemon thread, off the trio thread; ``deploy/grafana-winkr.json`` charts it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from winkr import __version__

disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide; prometheus_client has no per-registry switch

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The server's metrics; ``events`` are the client event names (label values known up front)."""

    def __init__(self, events: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("winkr", "The running winkr's version.", registry=r).info({"version": __version__})
        self.connections = Gauge("winkr_connections", "Open WebSocket connections.", registry=r)
        self.events_in = Counter("winkr_events_received_total", "Client events received, by event.",
                                 ["event"], registry=r)
        self.frames_out = Counter("winkr_frames_encoded_total",
                                  "Server frames encoded, by event (a broadcast is encoded once).",
                                  ["event"], registry=r)
        self.errors = Counter("winkr_errors_total", "error events sent, by code.", ["code"], registry=r)
        self.handshakes_refused = Counter("winkr_handshakes_refused_total",
                                          "Refused WebSocket handshakes, by error code.", ["code"], registry=r)
        self.handshakes_accepted = Counter("winkr_handshakes_accepted_total",
                                           "Accepted WebSocket handshakes.", registry=r)
        self.rate_limited = Counter("winkr_rate_limited_total",
                                    "Requests refused by a rate limit, by limit (e.g. 30/minute).",
                                    ["limit"], registry=r)
        self.closes = Counter("winkr_connections_closed_total",
                              "Closed connections, by reason (client_closed, slow_consumer, ...).",
                              ["reason"], registry=r)
        self.rooms = Gauge("winkr_rooms", "Awake conversation rooms.", registry=r)
        self.tasks = Gauge("winkr_trio_tasks", "Living trio tasks (sampled every few seconds).", registry=r)
        self.online_users = Gauge("winkr_online_users", "Users with at least one open connection.",
                                  registry=r)
        self.frames_per_write = Histogram("winkr_outbox_frames_per_write",
                                          "Frames waiting in a connection's outbox per socket write "
                                          "(its queue depth when the writer wakes).",
                                          buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.commit_seconds = Histogram("winkr_store_commit_seconds",
                                        "Time to run and commit one group of store requests.",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.commit_batch = Histogram("winkr_store_batch_requests", "Store requests per commit.",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r)
        self.fanout_seconds = Histogram("winkr_message_fanout_seconds",
                                        "From a message:send being read to its acknowledgement and its "
                                        "broadcast to the joined connections (both happen after the "
                                        "commit, in the same step): send->ack and send->peer.",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.webhook_deliveries = Counter(
            "winkr_webhook_deliveries_total",
            "Webhook delivery attempts by outcome: delivered (2xx), retry (failed, rescheduled), "
            "dropped (older than webhook_max_age_hours).", ["outcome"], registry=r)
        for outcome in ("delivered", "retry", "dropped"):
            self.webhook_deliveries.labels(outcome)
        self.webhook_waiting = Gauge("winkr_webhook_events_waiting",
                                     "Webhook events in the outbox, not yet delivered or dropped.", registry=r)
        self.webhook_oldest_age = Gauge("winkr_webhook_oldest_event_age_seconds",
                                        "Age of the oldest webhook event waiting (0 when none).", registry=r)
        self.webhook_delivery_seconds = Histogram(
            "winkr_webhook_delivery_seconds",
            "From the event (its commit) to the receiver's 2xx, retries included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0,
                     3600.0, 6 * 3600.0, 24 * 3600.0), registry=r)
        self.limiter_errors = Counter("winkr_limiter_errors_total",
                                      "Rate-limit calls the cluster's Redis did not answer (typing and "
                                      "status then allowed, new connections refused).", registry=r)
        self.proxy_headers_refused = Counter(
            "winkr_proxy_headers_refused_total",
            "Connections from a proxy_protocol_from address closed for a missing or malformed PROXY header.",
            registry=r)
        # Label children resolved once: the hot path only calls inc().
        self._in = {event: self.events_in.labels(event) for event in events}
        self._unknown_in = self.events_in.labels("unknown")
        self._out: dict[str, Any] = {}

    def event_in(self, event: str | None) -> None:
        self._in.get(event or "", self._unknown_in).inc()

    def frame_out(self, event: str) -> None:
        child = self._out.get(event)
        if child is None:
            child = self._out[event] = self.frames_out.labels(event)
        child.inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, port: int, host: str) -> int:
        """Start the scrape endpoint; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
