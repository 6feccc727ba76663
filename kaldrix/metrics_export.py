"""`/metrics`: the server's metrics in the Prometheus text exposition format.

prometheus_client writes the text (its escaping, its type lines, its `_total` suffixes), so
the format is the library's, not ours. The numbers stay where they are measured, in
`kaldrix.metrics.Metrics`; a collector reads them at scrape time, so the hot path pays
nothing for this endpoint. Latencies are summaries with exact HdrHistogram quantiles over
everything since the start (seconds, as Prometheus expects).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from .metrics import LatencyRecorder, Metrics
from .security import AuthError, may_admin

if TYPE_CHECKING:
    from .server import Gateway
    from .server._http import RequestHead, Response

__all__ = ["CONTENT_TYPE", "QUANTILES", "metrics_response", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)

# Metrics attribute -> (family name without _total, help text).
_COUNTERS = (
    ("messages_in", "kaldrix_messages_received", "WebSocket messages received from clients."),
    ("messages_out", "kaldrix_messages_sent", "WebSocket frames written to clients, deliveries included."),
    ("bytes_in", "kaldrix_received_bytes", "Bytes of client messages received."),
    ("bytes_out", "kaldrix_sent_bytes", "Bytes of frames written to clients."),
    ("events_published", "kaldrix_events_published", "Events accepted for publishing (duplicates excluded)."),
    ("broadcasts", "kaldrix_broadcasts", "Event-to-channel fan-outs."),
    ("deliveries", "kaldrix_deliveries", "Event frames handed to subscribers."),
    ("slow_consumer_closes", "kaldrix_slow_consumer_closes", "Clients closed with 4008 because their outbox was full."),
    ("duplicates", "kaldrix_duplicate_events", "Published events recognised by id and not delivered again."),
    ("replayed", "kaldrix_replayed_events", "Events replayed from history to resuming subscribers."),
    ("connections_failed", "kaldrix_connections_failed", "Connection attempts that never reached WELCOME."),
)

_BROKER_COUNTERS = (
    ("publishErrors", "kaldrix_broker_publish_errors", "Events a shared broker could not take (publish failed)."),
    ("reconnects", "kaldrix_broker_reconnects", "Attempts to reconnect to a shared broker."),
    ("resyncs", "kaldrix_broker_resyncs", "Times live delivery came back and channels were checked for missed events."),
    ("overruns", "kaldrix_broker_overruns", "Times the node fell so far behind its live stream that it caught up from history."),
    ("gapsFilled", "kaldrix_broker_gaps_filled", "Missed live publications fetched from the broker's history."),
    ("gapsLost", "kaldrix_broker_gaps_lost", "Missed live publications the broker no longer had (subscribers were told)."),
    ("subscribeErrors", "kaldrix_broker_subscribe_errors", "SUBSCRIBEs refused with UNAVAILABLE because the broker did not answer."),
)

_LATENCIES = (
    ("delivery_latency", "kaldrix_delivery_latency_seconds", "Event accepted to its frame written to the subscriber's socket."),
    ("fanout_time", "kaldrix_fanout_duration_seconds", "Publish accepted to frames handed to every subscriber."),
    ("connect_time", "kaldrix_connect_duration_seconds", "TCP accept to WELCOME sent."),
    ("broker_latency", "kaldrix_broker_request_duration_seconds", "A shared broker's requests (publish, position, history), sent to answered."),
)


def _summary(name: str, documentation: str, recorder: LatencyRecorder) -> Metric:
    """A summary family with HdrHistogram quantiles (in seconds), _count and _sum."""
    family = Metric(name, documentation, "summary")
    histogram = recorder.histogram()
    count = histogram.total_count
    if count:
        values = histogram.get_percentile_to_value_dict([q * 100.0 for q in QUANTILES])
        for quantile in QUANTILES:
            family.add_sample(name, {"quantile": str(quantile)}, values[quantile * 100.0] / 1e6)
    family.add_sample(f"{name}_count", {}, float(count))
    family.add_sample(f"{name}_sum", {}, recorder.sum_us / 1e6)
    return family


class GatewayCollector(Collector):
    """Reads one gateway's metrics, router and broker at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self._gateway
        metrics: Metrics = gateway.metrics
        yield InfoMetricFamily("kaldrix_build", "The kaldrix version serving.", value={"version": __version__})
        for attribute, name, documentation in _LATENCIES:
            yield _summary(name, documentation, getattr(metrics, attribute))
        for attribute, name, documentation in _COUNTERS:
            yield CounterMetricFamily(name, documentation, value=getattr(metrics, attribute))
        opened = CounterMetricFamily("kaldrix_connections_opened", "Connections that completed the handshake.")
        opened.add_metric([], metrics.connections_total - metrics.connections_failed)
        yield opened
        errors = CounterMetricFamily("kaldrix_errors", "ERROR replies sent, by error code.", labels=["code"])
        for code, count in metrics.errors.items():
            errors.add_metric([code.value], count)
        yield errors
        yield GaugeMetricFamily("kaldrix_connections_active", "Open WebSocket connections.", value=metrics.connections_active)
        yield GaugeMetricFamily(
            "kaldrix_subscriptions", "Channel subscriptions over all connections.", value=gateway.router.subscriber_count()
        )
        yield GaugeMetricFamily(
            "kaldrix_subscribed_channels", "Channels with at least one subscriber.", value=gateway.router.channel_count
        )
        broker = gateway.broker_statistics()
        if "storedEvents" in broker:
            yield GaugeMetricFamily("kaldrix_stored_events", "Events kept in history for recovery.", value=broker["storedEvents"])
        yield GaugeMetricFamily("kaldrix_broker_ready", "1 when the broker answers (always, for memory).", value=int(broker["ready"]))
        if "liveLagSeconds" in broker:
            yield GaugeMetricFamily(
                "kaldrix_broker_live_lag_seconds",
                "How long the latest live event had waited (since the publishing node took it) when this node got it.",
                value=broker["liveLagSeconds"],
            )
        if "liveBacklog" in broker:
            yield GaugeMetricFamily(
                "kaldrix_broker_live_backlog", "Live messages from the broker read and not yet delivered.", value=broker["liveBacklog"]
            )
        for key, name, documentation in _BROKER_COUNTERS:
            if key in broker:
                yield CounterMetricFamily(name, documentation, value=broker[key])
        yield GaugeMetricFamily("kaldrix_uptime_seconds", "Seconds since the server started.", value=metrics.uptime())


def render(gateway: Gateway) -> bytes:
    """The whole exposition: the gateway's families plus the standard process_* ones (RSS, CPU, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    ProcessCollector(registry=registry)
    return generate_latest(registry)


def _refusal(gateway: Gateway, authorization: str) -> tuple[int, str] | None:
    """Why this scrape may not see the metrics (status, reason), or None when it may."""
    if gateway.open_mode:
        return None
    if authorization[:7].lower() != "bearer ":
        return 401, "this needs a bearer token with the admin role"
    try:
        principal = gateway.verifier.verify(authorization[7:].strip())
    except AuthError as exc:
        return 401, exc.reason
    if reason := may_admin(principal, open_mode=False):
        return 403, reason
    return None


def metrics_response(gateway: Gateway, head: RequestHead) -> Response:
    """The `/metrics` route: admin only when the server verifies tokens, open in open mode."""
    from .server._http import Response

    refusal = _refusal(gateway, head.headers.get("authorization", ""))
    if refusal is not None:
        status, reason = refusal
        challenge = (("WWW-Authenticate", 'Bearer realm="kaldrix"'),) if status == 401 else ()
        return Response.json(status, {"error": reason}, headers=challenge)
    return Response(200, render(gateway), content_type=CONTENT_TYPE)
