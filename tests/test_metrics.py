"""kaldrix.metrics: histograms, counters, samples, snapshot sections and the report."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hdrh.histogram import HdrHistogram
from hypothesis import given
from hypothesis import strategies as st

from kaldrix._resources import peak_rss_bytes, rss_bytes
from kaldrix.metrics import HIGHEST_US, KINDS, LatencyRecorder, Metrics, verdict
from kaldrix.protocol import ErrorCode

# HdrHistogram with 3 significant digits: a reported value is within 0.1% of the
# recorded one; snapshots round to 1 us (0.001 ms).
PRECISION = {"rel": 1e-3, "abs": 1e-3}


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def uniform_1_to_10ms(metrics: Metrics) -> None:
    """10 000 deliveries of 1 us .. 10 000 us, one each."""
    for us in range(1, 10_001):
        metrics.record_delivery(us / 1e6)


# -- histograms -------------------------------------------------------------------------


def test_percentiles_of_a_known_distribution() -> None:
    metrics = Metrics()
    uniform_1_to_10ms(metrics)
    delivery = metrics.snapshot("latency")["eventDelivery"]
    assert delivery["count"] == 10_000
    assert delivery["avg"] == pytest.approx(5.0005, abs=1e-3)  # exact sum, not bucketed
    assert delivery["min"] == pytest.approx(0.001, **PRECISION)
    assert delivery["max"] == pytest.approx(10.0, **PRECISION)
    assert delivery["p50"] == pytest.approx(5.0, **PRECISION)
    assert delivery["p90"] == pytest.approx(9.0, **PRECISION)
    assert delivery["p95"] == pytest.approx(9.5, **PRECISION)
    assert delivery["p99"] == pytest.approx(9.9, **PRECISION)
    assert delivery["p999"] == pytest.approx(9.99, **PRECISION)


def test_bimodal_tail_shows_in_the_high_percentiles_only() -> None:
    metrics = Metrics()
    for _ in range(980):
        metrics.record_delivery(0.002)
    for _ in range(20):
        metrics.record_delivery(0.250)
    delivery = metrics.snapshot("latency")["eventDelivery"]
    assert delivery["p50"] == pytest.approx(2.0, **PRECISION)
    assert delivery["p95"] == pytest.approx(2.0, **PRECISION)
    assert delivery["p99"] == pytest.approx(250.0, **PRECISION)
    assert delivery["max"] == pytest.approx(250.0, **PRECISION)
    assert delivery["avg"] == pytest.approx((980 * 2 + 20 * 250) / 1000, abs=1e-3)


@given(st.lists(st.integers(min_value=0, max_value=HIGHEST_US), min_size=1, max_size=200))
def test_fast_record_fills_the_same_buckets_as_record_value(values: list[int]) -> None:
    recorder = LatencyRecorder()
    reference = HdrHistogram(1, HIGHEST_US, 3)
    for us in values:
        recorder.record(us / 1e6)
        reference.record_value(us)
    ours = recorder.histogram()
    assert list(ours.counts) == list(reference.counts)
    assert ours.get_total_count() == reference.get_total_count() == len(values)
    assert ours.get_min_value() == reference.get_min_value()
    assert ours.get_max_value() == reference.get_max_value()
    assert recorder.sum_us == sum(values)


def test_out_of_range_values_are_clamped_not_lost() -> None:
    recorder = LatencyRecorder()
    recorder.record(-0.5)  # clocks that disagree
    recorder.record(120.0)  # beyond the 60 s range
    summary = recorder.summary()
    assert summary["count"] == 2
    assert summary["min"] == 0.0
    assert summary["max"] == pytest.approx(60_000.0, **PRECISION)


def test_record_deliveries_records_one_latency_count_times() -> None:
    metrics = Metrics()
    metrics.record_deliveries(0.004, 500)
    metrics.record_delivery(0.004)
    delivery = metrics.snapshot("latency")["eventDelivery"]
    assert delivery["count"] == 501
    for key in ("avg", "min", "max", "p50", "p99", "p999"):
        assert delivery[key] == pytest.approx(4.0, **PRECISION)
    assert metrics.deliveries == 0  # counters are the server's, recording leaves them alone


def test_fanout_and_connect_have_their_own_histograms() -> None:
    metrics = Metrics()
    metrics.record_fanout(0.0005)
    metrics.record_fanout(0.0015)
    metrics.record_connect(0.120)
    snap = metrics.snapshot()
    assert snap["fanout"]["count"] == 2
    assert snap["fanout"]["avg"] == pytest.approx(1.0, **PRECISION)
    assert snap["connectionSetup"]["count"] == 1
    assert snap["connectionSetup"]["p50"] == pytest.approx(120.0, **PRECISION)
    assert snap["connections"]["avgConnectTimeMs"] == pytest.approx(120.0, **PRECISION)
    assert snap["eventDelivery"]["count"] == 0


def test_empty_histograms_summarise_as_zeros() -> None:
    summary = LatencyRecorder().summary()
    assert summary == {
        "avg": 0.0,
        "min": 0.0,
        "max": 0.0,
        "p50": 0.0,
        "p90": 0.0,
        "p95": 0.0,
        "p99": 0.0,
        "p999": 0.0,
        "count": 0,
    }


def test_cumulative_histogram_spans_sampling_intervals() -> None:
    recorder = LatencyRecorder()
    recorder.record(0.001, 10)
    first = recorder.fold()
    recorder.record(0.003, 10)
    assert first.get_total_count() == 10
    whole = recorder.histogram()
    assert whole.get_total_count() == recorder.count == 20
    assert whole.get_value_at_percentile(25) == pytest.approx(1000, rel=1e-3)
    assert whole.get_value_at_percentile(75) == pytest.approx(3000, rel=1e-3)
    assert recorder.summary()["avg"] == pytest.approx(2.0, abs=1e-3)


def test_reset_histograms_keeps_counters() -> None:
    metrics = Metrics()
    metrics.record_delivery(0.01)
    metrics.record_fanout(0.01)
    metrics.record_connect(0.01)
    metrics.sample(metrics.started + 1)
    metrics.record_delivery(0.02)
    metrics.messages_in = 7
    metrics.reset_histograms()
    snap = metrics.snapshot()
    assert snap["eventDelivery"]["count"] == snap["fanout"]["count"] == snap["connectionSetup"]["count"] == 0
    assert snap["eventDelivery"]["avg"] == 0.0
    assert snap["counters"]["messagesIn"] == 7
    metrics.record_delivery(0.005)
    assert metrics.snapshot("latency")["eventDelivery"]["max"] == pytest.approx(5.0, **PRECISION)


# -- counters ---------------------------------------------------------------------------


def test_connection_counters() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.connection_opened()
    metrics.connection_closed()
    metrics.connection_failed()
    assert metrics.snapshot("connections")["connections"] == {
        "active": 2,
        "total": 4,
        "failed": 1,
        "avgConnectTimeMs": 0.0,
    }
    assert metrics.snapshot("resources")["resources"]["openConnections"] == 2


def test_connection_closed_never_goes_below_zero() -> None:
    metrics = Metrics()
    metrics.connection_closed()
    assert metrics.connections_active == 0


def test_errors_by_code() -> None:
    metrics = Metrics()
    metrics.error(ErrorCode.RATE_LIMITED)
    metrics.error(ErrorCode.RATE_LIMITED)
    metrics.error("TOO_LARGE")
    errors = metrics.snapshot("errors")["errors"]
    assert set(errors) == {code.value for code in ErrorCode}
    assert errors["RATE_LIMITED"] == 2
    assert errors["TOO_LARGE"] == 1
    assert errors["INTERNAL"] == 0
    with pytest.raises(ValueError):
        metrics.error("NOT_A_CODE")


def test_counters_are_plain_attributes_and_typos_fail() -> None:
    metrics = Metrics()
    metrics.messages_in += 3
    metrics.bytes_out += 1024
    metrics.duplicates += 1
    counters = metrics.snapshot()["counters"]
    assert counters["messagesIn"] == 3
    assert counters["bytesOut"] == 1024
    assert counters["duplicates"] == 1
    assert set(counters) == {
        "messagesIn",
        "messagesOut",
        "bytesIn",
        "bytesOut",
        "eventsPublished",
        "broadcasts",
        "deliveries",
        "slowConsumerCloses",
        "duplicates",
        "replayed",
    }
    with pytest.raises(AttributeError):
        metrics.delivries = 1  # type: ignore[attr-defined]


# -- snapshot ---------------------------------------------------------------------------

SECTIONS = {
    "all": {
        "eventDelivery",
        "fanout",
        "connectionSetup",
        "throughput",
        "connections",
        "counters",
        "errors",
        "resources",
        "uptimeSeconds",
    },
    "latency": {"eventDelivery", "fanout", "uptimeSeconds"},
    "throughput": {"throughput", "uptimeSeconds"},
    "connections": {"connections", "connectionSetup", "uptimeSeconds"},
    "resources": {"resources", "uptimeSeconds"},
    "errors": {"errors", "uptimeSeconds"},
}


def test_every_kind_has_a_section_set() -> None:
    assert set(SECTIONS) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_sections_per_kind(kind: str) -> None:
    metrics = Metrics()
    metrics.record_delivery(0.0012345)
    snap = metrics.snapshot(kind)
    assert set(snap) == SECTIONS[kind]
    assert json.loads(orjson.dumps(snap)) == snap  # JSON-ready, nothing lost on the way


def test_snapshot_shape_and_rounding() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.record_delivery(0.0012345)
    clock.now += 2.5
    snap = metrics.snapshot()
    summary_keys = {"avg", "min", "max", "p50", "p90", "p95", "p99", "p999", "count"}
    for section in ("eventDelivery", "fanout", "connectionSetup"):
        assert set(snap[section]) == summary_keys
    assert snap["eventDelivery"]["avg"] == 1.235  # 1234.5 us rounds to 1235 us, shown to 3 decimals
    assert set(snap["throughput"]) == {
        "messagesPerSecond",
        "eventsPerSecond",
        "broadcastsPerSecond",
        "deliveriesPerSecond",
        "windowSeconds",
    }
    assert set(snap["connections"]) == {"active", "total", "failed", "avgConnectTimeMs"}
    assert set(snap["resources"]) == {"rssBytes", "openConnections"}
    assert snap["resources"]["rssBytes"] > 0
    assert snap["uptimeSeconds"] == 2.5


def test_unknown_kind_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as caught:
        Metrics().snapshot("latencies")
    for kind in KINDS:
        assert kind in str(caught.value)


# -- sampling and rates -----------------------------------------------------------------


def test_rates_over_uptime_until_the_first_sample() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.messages_in, metrics.messages_out = 300, 700
    metrics.events_published = 50
    clock.now += 4.0
    assert metrics.snapshot("throughput")["throughput"] == {
        "messagesPerSecond": 250.0,
        "eventsPerSecond": 12.5,
        "broadcastsPerSecond": 0.0,
        "deliveriesPerSecond": 0.0,
        "windowSeconds": 4.0,
    }


def test_rates_from_two_samples() -> None:
    clock = FakeClock(1000.0)
    metrics = Metrics(clock=clock)
    metrics.messages_in = 100
    metrics.events_published, metrics.broadcasts, metrics.deliveries = 20, 40, 400
    first = metrics.sample(1010.0)
    assert first["rates"] == {
        "messagesPerSecond": 10.0,
        "eventsPerSecond": 2.0,
        "broadcastsPerSecond": 4.0,
        "deliveriesPerSecond": 40.0,
    }
    metrics.messages_in += 50
    metrics.messages_out += 450
    metrics.events_published += 10
    metrics.deliveries += 1000
    second = metrics.sample(1015.0)
    assert second["intervalSeconds"] == 5.0
    assert second["rates"] == {
        "messagesPerSecond": 100.0,
        "eventsPerSecond": 2.0,
        "broadcastsPerSecond": 0.0,
        "deliveriesPerSecond": 200.0,
    }
    assert second["counters"]["deliveries"] == 1400
    # the snapshot reports the last interval, not the average since the start
    clock.now = 1100.0
    throughput = metrics.snapshot("throughput")["throughput"]
    assert throughput == {**second["rates"], "windowSeconds": 5.0}


def test_sample_without_time_passing_has_zero_rates() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.messages_in = 10
    assert set(metrics.sample()["rates"].values()) == {0.0}


def test_sample_percentiles_cover_their_own_interval() -> None:
    clock = FakeClock(0.0)
    metrics = Metrics(clock=clock)
    metrics.record_deliveries(0.001, 100)
    first = metrics.sample(1.0)
    metrics.record_deliveries(0.010, 100)
    second = metrics.sample(2.0)
    quiet = metrics.sample(3.0)
    assert first["deliveryP50Ms"] == pytest.approx(1.0, **PRECISION)
    assert second["deliveryP50Ms"] == pytest.approx(10.0, **PRECISION)
    assert second["deliveryP99Ms"] == pytest.approx(10.0, **PRECISION)
    assert quiet["deliveryP50Ms"] is None and quiet["deliveryP99Ms"] is None
    # the snapshot still covers everything
    delivery = metrics.snapshot("latency")["eventDelivery"]
    assert delivery["count"] == 200
    assert delivery["avg"] == pytest.approx(5.5, abs=1e-3)


def test_sample_is_compact_and_json_ready() -> None:
    metrics = Metrics(clock=FakeClock(0.0))
    metrics.connection_opened()
    record = metrics.sample(5.0)
    assert set(record) == {
        "time",
        "intervalSeconds",
        "counters",
        "rates",
        "deliveryP50Ms",
        "deliveryP99Ms",
        "connectionsActive",
        "rssBytes",
    }
    assert record["time"] == 5.0
    assert record["connectionsActive"] == 1
    assert record["rssBytes"] > 0
    assert json.loads(orjson.dumps(record)) == record


def test_sample_ring_is_bounded() -> None:
    metrics = Metrics(max_samples=3, clock=FakeClock(0.0))
    for now in range(1, 6):
        metrics.sample(float(now))
    assert [record["time"] for record in metrics.samples] == [3.0, 4.0, 5.0]


# -- report and verdict -----------------------------------------------------------------


def test_report_has_every_section_and_the_verdict() -> None:
    clock = FakeClock(0.0)
    metrics = Metrics(clock=clock)
    metrics.record_deliveries(0.005, 1000)
    metrics.messages_out = 2000
    metrics.events_published = 1000
    metrics.connection_opened()
    metrics.connection_failed()
    metrics.record_connect(0.125)
    clock.now = 1.0
    metrics.sample()
    clock.now = 312.0
    text = metrics.report()
    for line in (
        "kaldrix Performance Report",
        "Uptime: 5.2 minutes",
        "Event Delivery Performance:",
        "- Average Delivery Time: 5.00ms",
        "- 99.9th Percentile: 5.00ms",
        "- Total Events Tracked: 1000",
        "Throughput:",
        "- Messages/Second: 2000.00",
        "- Events/Second: 1000.00",
        "Connection Statistics:",
        "- Active Connections: 1",
        "- Total Connections: 2",
        "- Failed Connections: 1",
        "- Avg Connection Time: 125.00ms",
        "Resource Usage:",
        "- Memory Usage: ",
        "- Network Connections: 1",
        "Verdict: Excellent: delivery < 10ms, throughput > 1000 msg/sec",
    ):
        assert line in text


def test_report_without_deliveries_gives_no_verdict() -> None:
    text = Metrics().report()
    assert "Verdict: n/a (no deliveries recorded)" in text
    assert "- Total Events Tracked: 0" in text


@pytest.mark.parametrize(
    ("avg_ms", "rate", "expected"),
    [
        (1.0, 5000.0, "Excellent"),
        (9.999, 1000.1, "Excellent"),
        (10.0, 5000.0, "Good"),  # latency bar is strict
        (5.0, 1000.0, "Good"),  # so is the throughput bar
        (49.99, 500.1, "Good"),
        (50.0, 5000.0, "Acceptable"),
        (5.0, 500.0, "Acceptable"),
        (99.99, 100.1, "Acceptable"),
        (100.0, 5000.0, "Poor"),
        (1.0, 100.0, "Poor"),
        (0.0, 0.0, "Poor"),
        (250.0, 10.0, "Poor"),
    ],
)
def test_verdict_boundaries(avg_ms: float, rate: float, expected: str) -> None:
    assert verdict(avg_ms, rate).split(":")[0] == expected


def test_verdict_lines_quote_the_seed_thresholds() -> None:
    assert verdict(1, 2000) == "Excellent: delivery < 10ms, throughput > 1000 msg/sec"
    assert verdict(20, 600) == "Good: delivery < 50ms, throughput > 500 msg/sec"
    assert verdict(70, 200) == "Acceptable: delivery < 100ms, throughput > 100 msg/sec"
    assert verdict(200, 200) == "Poor: delivery >= 100ms or throughput <= 100 msg/sec"


# -- resources --------------------------------------------------------------------------


def test_rss_is_positive() -> None:
    assert rss_bytes() > 0


def test_rss_falls_back_to_peak_rss_without_proc(tmp_path: Path) -> None:
    missing = tmp_path / "no-statm"
    assert rss_bytes(str(missing)) == peak_rss_bytes() > 0
