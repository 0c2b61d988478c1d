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

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

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
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from winkr import __version__

disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide; prometheus_client has no per-registry switch

_LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LabelledCount:
    """A counter by one label, counted in plain ints: what the hot path counts per frame or
    per event. prometheus_client's ``Counter.inc`` takes a lock per call (several per
    message); these are only touched on the trio thread and read by the scrape (any thread:
    a scrape sees a count at most one increment old)."""

    __slots__ = ("name", "documentation", "label", "counts")

    def __init__(self, name: str, documentation: str, label: str, values: Iterable[str] = ()) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.counts: dict[str, int] = dict.fromkeys(values, 0)

    def inc(self, value: str) -> None:
        counts = self.counts
        counts[value] = counts.get(value, 0) + 1

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in list(self.counts.items()):  # list(): one step under the GIL
            family.add_metric([value], count)
        return family


class FastHistogram:
    """A histogram counted in plain ints and a float sum (see :class:`LabelledCount`); the
    same exposition as prometheus_client's ``Histogram`` (``_bucket{le}``, ``_sum``,
    ``_count``). ``observe`` takes the value in the histogram's unit (seconds, counts)."""

    __slots__ = ("name", "documentation", "bounds", "counts", "total")

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: "le"
        self.total += value

    def family(self) -> Metric:
        counts, total = list(self.counts), self.total
        cumulative, running = [], 0
        for bound, count in zip((*(_le(b) for b in self.bounds), "+Inf"), counts):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, total)
        return family


def _le(bound: float) -> str:
    return repr(bound) if bound != int(bound) else f"{bound:.1f}"


class _Collector:
    """Hands the plain-int metrics to the registry at scrape time."""

    def __init__(self, metrics: Iterable[LabelledCount | FastHistogram]) -> None:
        self._metrics = tuple(metrics)

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield metric.family()


class Metrics:
    """The server's metrics; ``events`` are the client event names (label values known up front)."""

    def __init__(self, events: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("winkr", "The running winkr's version.", registry=r).info({"version": __version__})
        self.connections = Gauge("winkr_connections", "Open WebSocket connections.", registry=r)
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
        # Counted on the hot path (per frame, per write, per message, per commit): plain ints,
        # no lock per call (docs/performance.md, issue 10, proposal 7).
        self.events_in = LabelledCount("winkr_events_received", "Client events received, by event.", "event",
                                       (*events, "unknown"))
        self.frames_out = LabelledCount("winkr_frames_encoded",
                                        "Server frames encoded, by event (a broadcast is encoded once).", "event")
        self.frames_per_write = FastHistogram("winkr_outbox_frames_per_write",
                                              "Frames waiting in a connection's outbox per socket write "
                                              "(its queue depth when the writer wakes).", (1, 2, 4, 8, 16, 32, 64))
        self.commit_seconds = FastHistogram("winkr_store_commit_seconds",
                                            "Time to run and commit one group of store requests.", _LATENCY_BUCKETS)
        self.commit_batch = FastHistogram("winkr_store_batch_requests", "Store requests per commit.",
                                          (1, 2, 5, 10, 20, 50, 100, 200, 500))
        self.fanout_seconds = FastHistogram("winkr_message_fanout_seconds",
                                            "From a message:send being read to its acknowledgement and its "
                                            "broadcast to the joined connections (both happen after the "
                                            "commit, in the same step): send->ack and send->peer.",
                                            _LATENCY_BUCKETS)
        r.register(_Collector((self.events_in, self.frames_out, self.frames_per_write, self.commit_seconds,
                               self.commit_batch, self.fanout_seconds)))
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
        self.node = Info("winkr_node", "This node's id (node_id, or hostname-pid): join on it per node.",
                         registry=r)
        self.broker_up = Gauge("winkr_broker_up", "1 while the broker reaches its Redis (always 1 on one node).",
                               registry=r)
        self.broker_publish_failures = Counter(
            "winkr_broker_publish_failures_total",
            "Committed events the broker could not publish (other nodes fill them in from the database).",
            registry=r)
        self.broker_resyncs = Counter("winkr_broker_resyncs_total",
                                      "Rooms read again from the database after a gap, a broker reconnect or an "
                                      "overflow.", registry=r)
        self.proxy_headers_refused = Counter(
            "winkr_proxy_headers_refused_total",
            "Connections from a proxy_protocol_from address closed for a missing or malformed PROXY header.",
            registry=r)

    def event_in(self, event: str | None) -> None:
        counts = self.events_in.counts
        key = event if event in counts else "unknown"
        counts[key] += 1

    def frame_out(self, event: str) -> None:
        self.frames_out.inc(event)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, port: int, host: str) -> int:
        """Start the scrape endpoint; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
