"""Server metrics: latency histograms, counters, periodic samples and the performance report.

The seed's createWebSocketBenchmark / getMetrics / getPerformanceReport, rebuilt on
HdrHistogram so that percentiles stay exact to three significant digits at any volume.
No I/O and no tasks: the server owns one `Metrics`, bumps its counters, records timings
on the hot path and calls `sample()` from its sampler task. Not thread-safe; it lives on
the server's trio thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hdrh.histogram import HdrHistogram

from ._resources import rss_bytes
from .protocol import ErrorCode

__all__ = ["KINDS", "LatencyRecorder", "Metrics", "verdict"]

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_DIGITS = 3

KINDS = ("all", "latency", "throughput", "connections", "resources", "errors")
"""The sections `Metrics.snapshot` can be asked for (REQUEST_METRICS `type`)."""

_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)

# (verdict, delivery below this many ms, throughput above this many msg/s), best first:
# the seed's performance thresholds.
_THRESHOLDS = (
    ("Excellent", 10.0, 1000.0),
    ("Good", 50.0, 500.0),
    ("Acceptable", 100.0, 100.0),
)

# attribute -> JSON name, in report order.
_COUNTERS = (
    ("messages_in", "messagesIn"),
    ("messages_out", "messagesOut"),
    ("bytes_in", "bytesIn"),
    ("bytes_out", "bytesOut"),
    ("events_published", "eventsPublished"),
    ("broadcasts", "broadcasts"),
    ("deliveries", "deliveries"),
    ("slow_consumer_closes", "slowConsumerCloses"),
    ("duplicates", "duplicates"),
    ("replayed", "replayed"),
)


def _new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def _layout() -> tuple[int, int]:
    """The bucket geometry `LatencyRecorder.record` indexes with, read off a real histogram."""
    probe = _new_histogram()
    if probe.unit_magnitude != 0:  # pragma: no cover - only if LOWEST_US changes
        raise RuntimeError("LatencyRecorder.record assumes a lowest trackable value of 1")
    half = probe.sub_bucket_half_count_magnitude
    return half, half + 1


_HALF_MAGNITUDE, _SUB_BUCKET_BITS = _layout()


def _ms(microseconds: float) -> float:
    return round(microseconds / 1000.0, 3)


class LatencyRecorder:
    """One HdrHistogram of durations, in microseconds, from 1 us to 60 s.

    Recording goes into a "live" histogram that `fold()` merges into the running total
    at each sample, so a sample can report the percentiles of its own interval while
    `summary()` covers everything since the start (or the last `reset()`).
    """

    __slots__ = ("_live", "_total", "sum_us")

    def __init__(self) -> None:
        self._live = _new_histogram()
        self._total = _new_histogram()
        self.sum_us = 0
        """Exact sum of everything recorded, for an exact average."""

    def record(self, seconds: float, count: int = 1) -> None:
        """Record one duration `count` times; out-of-range values are clamped, not lost.

        This is HdrHistogram.record_value with the bucket index computed from
        int.bit_length: ~0.7 us per call against ~2.3 us for record_value (CPython 3.11,
        x86-64, best of 5 timeit runs of 500k calls). tests/test_metrics.py checks that
        both fill the same buckets.
        """
        us = int(seconds * 1_000_000.0 + 0.5)
        if us > HIGHEST_US:
            us = HIGHEST_US
        elif us < 0:
            us = 0
        shift = us.bit_length() - _SUB_BUCKET_BITS
        index = us if shift < 0 else (shift << _HALF_MAGNITUDE) + (us >> shift)
        live = self._live
        live.counts[index] += count
        live.total_count += count
        if us > live.max_value:
            live.max_value = us
        if us < live.min_value:
            live.min_value = us
        self.sum_us += us * count

    @property
    def count(self) -> int:
        return self._total.total_count + self._live.total_count

    def fold(self) -> HdrHistogram:
        """Close the current interval: return its histogram and add it to the total."""
        interval = self._live
        if interval.total_count:
            self._total.add(interval)
            self._live = _new_histogram()
        return interval

    def histogram(self) -> HdrHistogram:
        """Everything recorded, as one HdrHistogram (e.g. to encode it for a benchmark).

        May be the recorder's own histogram: read it, do not record into it.
        """
        if not self._live.total_count:
            return self._total
        if not self._total.total_count:
            return self._live
        merged = _new_histogram()
        merged.add(self._total)
        merged.add(self._live)
        return merged

    def summary(self) -> dict[str, Any]:
        """avg, min, max, p50 .. p999 in milliseconds (3 decimals) and the count."""
        return summarize(self.histogram(), self.sum_us)

    def reset(self) -> None:
        self._live = _new_histogram()
        self._total = _new_histogram()
        self.sum_us = 0


class _Untimed(LatencyRecorder):
    """A recorder that records nothing: delivery timing switched off (Config.record_latency)."""

    __slots__ = ()

    def record(self, seconds: float, count: int = 1) -> None:
        pass


def verdict(avg_delivery_ms: float, messages_per_second: float) -> str:
    """The seed's performance verdict: both the latency and the throughput bar must be met."""
    for name, max_ms, min_rate in _THRESHOLDS:
        if avg_delivery_ms < max_ms and messages_per_second > min_rate:
            return f"{name}: delivery < {max_ms:g}ms, throughput > {min_rate:g} msg/sec"
    _, max_ms, min_rate = _THRESHOLDS[-1]
    return f"Poor: delivery >= {max_ms:g}ms or throughput <= {min_rate:g} msg/sec"


class Metrics:
    """Everything the server measures about itself; one per server.

    Counters are plain int attributes the server increments in place (the cheapest
    thing on a hot path); they never reset. `messages_out` counts every frame written,
    deliveries included, and "messages per second" is in + out. Recording a timing does
    not touch any counter: `deliveries` counts frames handed to outboxes, the
    `delivery_latency` histogram counts the frames whose write was timed.
    """

    __slots__ = (
        *(attribute for attribute, _ in _COUNTERS),
        "_clock",
        "_last_counters",
        "_last_time",
        "_samples",
        "broker_latency",
        "connect_time",
        "connections_active",
        "connections_failed",
        "connections_total",
        "delivery_latency",
        "errors",
        "fanout_time",
        "started",
    )

    def __init__(
        self, *, max_samples: int = 1000, clock: Callable[[], float] = time.monotonic, record_latency: bool = True
    ) -> None:
        self._clock = clock
        self.started = clock()
        self.delivery_latency = LatencyRecorder() if record_latency else _Untimed()
        """Event accepted -> its frame written to the subscriber's socket (`record_latency`
        False: nothing recorded, to measure what timing costs the hot path)."""
        self.fanout_time = LatencyRecorder()
        """Publish accepted -> frames handed to every subscriber's outbox."""
        self.connect_time = LatencyRecorder()
        """TCP accept -> WELCOME sent."""
        self.broker_latency = LatencyRecorder()
        """A shared broker's requests (publish, position, history): sent -> answered."""
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.events_published = 0
        self.broadcasts = 0
        self.deliveries = 0
        self.slow_consumer_closes = 0
        self.duplicates = 0
        self.replayed = 0
        self.connections_active = 0
        self.connections_total = 0
        self.connections_failed = 0
        self.errors: dict[ErrorCode, int] = dict.fromkeys(ErrorCode, 0)
        self._samples: deque[dict[str, Any]] = deque(maxlen=max_samples)
        self._last_time = self.started
        self._last_counters = self._rate_counters()

    # -- recording (hot path) ----------------------------------------------------

    def record_delivery(self, latency_s: float) -> None:
        # ~0.8 us per call, LatencyRecorder.record included (CPython 3.11, x86-64, best of
        # 5 timeit runs of 500k calls); record_deliveries costs the same for any count.
        self.delivery_latency.record(latency_s)

    def record_deliveries(self, latency_s: float, count: int) -> None:
        """One frame written to `count` sockets at once: one latency, `count` deliveries."""
        self.delivery_latency.record(latency_s, count)

    def record_fanout(self, seconds: float) -> None:
        self.fanout_time.record(seconds)

    def record_broker(self, operation: str, seconds: float) -> None:
        """A shared broker answered (or failed) a request after `seconds`."""
        self.broker_latency.record(seconds)

    def record_connect(self, seconds: float) -> None:
        self.connect_time.record(seconds)

    # -- compound counters ---------------------------------------------------------

    def connection_opened(self) -> None:
        """A connection completed its handshake (WELCOME sent)."""
        self.connections_active += 1
        self.connections_total += 1

    def connection_closed(self) -> None:
        """An opened connection ended, for whatever reason."""
        if self.connections_active > 0:
            self.connections_active -= 1

    def connection_failed(self) -> None:
        """An attempt that never reached WELCOME; it counts in the total, as in the seed."""
        self.connections_failed += 1
        self.connections_total += 1

    def error(self, code: ErrorCode | str) -> None:
        """Count an ERROR sent; an unknown code is a bug and raises ValueError."""
        self.errors[ErrorCode(code)] += 1

    def reset_histograms(self) -> None:
        """Forget recorded timings (between benchmark phases); counters keep counting."""
        self.delivery_latency.reset()
        self.fanout_time.reset()
        self.connect_time.reset()
        self.broker_latency.reset()

    # -- sampling --------------------------------------------------------------------

    @property
    def samples(self) -> deque[dict[str, Any]]:
        """The most recent samples, oldest first, at most `max_samples` of them."""
        return self._samples

    def sample(self, now: float | None = None) -> dict[str, Any]:
        """Close a sampling interval: rates and delivery percentiles since the previous one.

        The seed's samplingInterval is the caller's: the server's sampler task calls this
        every interval. `now` comes from the same clock as the constructor's.
        """
        if now is None:
            now = self._clock()
        counters = self._rate_counters()
        rates = _rates(self._last_counters, counters, now - self._last_time)
        interval = self.delivery_latency.fold()
        self.fanout_time.fold()
        self.connect_time.fold()
        self.broker_latency.fold()
        p50 = p99 = None
        if interval.total_count:
            values = interval.get_percentile_to_value_dict([50.0, 99.0])
            p50, p99 = _ms(values[50.0]), _ms(values[99.0])
        record = {
            "time": now,
            "intervalSeconds": round(now - self._last_time, 3),
            "counters": self._counters(),
            "rates": rates,
            "deliveryP50Ms": p50,
            "deliveryP99Ms": p99,
            "connectionsActive": self.connections_active,
            "rssBytes": rss_bytes(),
        }
        self._samples.append(record)
        self._last_time = now
        self._last_counters = counters
        return record

    # -- reading ---------------------------------------------------------------------

    def uptime(self) -> float:
        return self._clock() - self.started

    def snapshot(self, kind: str = "all") -> dict[str, Any]:
        """The seed's getMetrics: a JSON-ready dict of one section, or of all of them.

        Times are in milliseconds. Throughput is over the last sampling interval, or over
        the uptime until the first sample. Raises ValueError for an unknown `kind`.
        Costs a few milliseconds (percentile scans): for requests and samplers, not per message.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown metrics type {kind!r}: expected one of {', '.join(KINDS)}")
        out: dict[str, Any] = {}
        if kind in ("all", "latency"):
            out["eventDelivery"] = self.delivery_latency.summary()
            out["fanout"] = self.fanout_time.summary()
            if self.broker_latency.count:
                out["broker"] = self.broker_latency.summary()
        if kind in ("all", "connections"):
            out["connectionSetup"] = setup = self.connect_time.summary()
            out["connections"] = {
                "active": self.connections_active,
                "total": self.connections_total,
                "failed": self.connections_failed,
                "avgConnectTimeMs": setup["avg"],
            }
        if kind in ("all", "throughput"):
            out["throughput"] = self._throughput()
        if kind == "all":
            out["counters"] = self._counters()
        if kind in ("all", "errors"):
            out["errors"] = {code.value: n for code, n in self.errors.items()}
        if kind in ("all", "resources"):
            out["resources"] = {"rssBytes": rss_bytes(), "openConnections": self.connections_active}
        out["uptimeSeconds"] = round(self.uptime(), 3)
        return out

    def report(self) -> str:
        """The seed's getPerformanceReport, as text for a terminal or a log."""
        snap = self.snapshot()
        delivery, rates, conns = snap["eventDelivery"], snap["throughput"], snap["connections"]
        title = "kaldrix Performance Report"
        if delivery["count"]:
            judgement = verdict(delivery["avg"], rates["messagesPerSecond"])
        else:
            judgement = "n/a (no deliveries recorded)"
        lines = [
            title,
            "=" * len(title),
            f"Uptime: {_duration(snap['uptimeSeconds'])}",
            "",
            "Event Delivery Performance:",
            f"- Average Delivery Time: {delivery['avg']:.2f}ms",
            f"- Min Delivery Time: {delivery['min']:.2f}ms",
            f"- Max Delivery Time: {delivery['max']:.2f}ms",
            f"- 50th Percentile: {delivery['p50']:.2f}ms",
            f"- 90th Percentile: {delivery['p90']:.2f}ms",
            f"- 95th Percentile: {delivery['p95']:.2f}ms",
            f"- 99th Percentile: {delivery['p99']:.2f}ms",
            f"- 99.9th Percentile: {delivery['p999']:.2f}ms",
            f"- Total Events Tracked: {delivery['count']}",
            "",
            "Throughput:",
            f"- Messages/Second: {rates['messagesPerSecond']:.2f}",
            f"- Events/Second: {rates['eventsPerSecond']:.2f}",
            f"- Broadcasts/Second: {rates['broadcastsPerSecond']:.2f}",
            f"- Deliveries/Second: {rates['deliveriesPerSecond']:.2f}",
            "",
            "Connection Statistics:",
            f"- Active Connections: {conns['active']}",
            f"- Total Connections: {conns['total']}",
            f"- Failed Connections: {conns['failed']}",
            f"- Avg Connection Time: {conns['avgConnectTimeMs']:.2f}ms",
            "",
            "Resource Usage:",
            f"- Memory Usage: {snap['resources']['rssBytes'] / (1024 * 1024):.2f}MB",
            f"- Network Connections: {snap['resources']['openConnections']}",
            "",
            f"Verdict: {judgement}",
        ]
        return "\n".join(lines) + "\n"

    # -- internals -------------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        return {name: getattr(self, attribute) for attribute, name in _COUNTERS}

    def _rate_counters(self) -> tuple[int, int, int, int]:
        return (
            self.messages_in + self.messages_out,
            self.events_published,
            self.broadcasts,
            self.deliveries,
        )

    def _throughput(self) -> dict[str, float]:
        if self._samples:
            last = self._samples[-1]
            return {**last["rates"], "windowSeconds": last["intervalSeconds"]}
        uptime = self.uptime()
        zero = (0, 0, 0, 0)
        return {**_rates(zero, self._rate_counters(), uptime), "windowSeconds": round(uptime, 3)}


def _rates(before: tuple[int, ...], after: tuple[int, ...], seconds: float) -> dict[str, float]:
    names = ("messagesPerSecond", "eventsPerSecond", "broadcastsPerSecond", "deliveriesPerSecond")
    if seconds <= 0:
        return dict.fromkeys(names, 0.0)
    return {name: round((b - a) / seconds, 3) for name, a, b in zip(names, before, after, strict=True)}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} seconds"
    if seconds < 3600:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds / 3600:.1f} hours"


def summarize(histogram: HdrHistogram, sum_us: float) -> dict[str, Any]:
    """A latency histogram as avg, min, max, p50 .. p999 in milliseconds and the count.

    `sum_us` gives an exact average; the histogram gives the rest within its precision.
    """
    count = histogram.total_count
    if not count:
        return dict.fromkeys(("avg", "min", "max", "p50", "p90", "p95", "p99", "p999"), 0.0) | {"count": 0}
    values = histogram.get_percentile_to_value_dict(list(_PERCENTILES))
    return {
        "avg": _ms(sum_us / count),
        "min": _ms(histogram.get_min_value()),
        "max": _ms(histogram.get_max_value()),
        "p50": _ms(values[50.0]),
        "p90": _ms(values[90.0]),
        "p95": _ms(values[95.0]),
        "p99": _ms(values[99.0]),
        "p999": _ms(values[99.9]),
        "count": count,
    }
