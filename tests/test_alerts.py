"""Alerts: thresholds fire once per episode and re-arm; a crossing reaches `alerts` subscribers."""

from __future__ import annotations

import logging

import pytest
import trio
from trio_websocket import connect_websocket_url

from kaldrix.alerts import AlertChecker, Readings, alert_event, rules_from_config
from kaldrix.metrics import Metrics
from kaldrix.protocol import AlertSeverity, ErrorCode

from .conftest import WireClient, make_config


def checker(**overrides: float) -> AlertChecker:
    return AlertChecker(rules_from_config(make_config(**overrides)))


def test_default_rules_are_the_seeds_thresholds() -> None:
    rules = {rule.name: rule for rule in rules_from_config(make_config())}
    assert rules["HIGH_DELIVERY_LATENCY"].threshold == 100.0
    assert rules["CONNECTION_FAILURES"].threshold == 10
    assert set(rules) == {"HIGH_DELIVERY_LATENCY", "CONNECTION_FAILURES", "SLOW_CONSUMERS", "ERROR_REPLIES", "HIGH_MEMORY"}


def test_zero_disables_a_rule() -> None:
    rules = rules_from_config(make_config(alert_delivery_latency_ms=0, alert_memory_mb=0))
    assert {rule.name for rule in rules} == {"CONNECTION_FAILURES", "SLOW_CONSUMERS", "ERROR_REPLIES"}


def test_fires_once_while_the_condition_holds_then_rearms() -> None:
    alerts = checker()
    assert alerts.check({"deliveryAvgMs": 100.0}) == []  # strictly above
    fired = alerts.check({"deliveryAvgMs": 150.0})
    assert [(a.rule.name, a.value) for a in fired] == [("HIGH_DELIVERY_LATENCY", 150.0)]
    assert fired[0].message == "average event delivery latency 150.00ms is above 100ms"
    assert alerts.check({"deliveryAvgMs": 300.0}) == []
    assert alerts.check({"deliveryAvgMs": 120.0}) == []
    assert alerts.firing == {"HIGH_DELIVERY_LATENCY"}
    assert alerts.check({"deliveryAvgMs": 20.0}) == []  # cleared: re-armed
    assert alerts.firing == set()
    again = alerts.check({"deliveryAvgMs": 101.0})
    assert [a.rule.name for a in again] == ["HIGH_DELIVERY_LATENCY"]


def test_a_missing_reading_clears_the_rule() -> None:
    alerts = checker()
    assert len(alerts.check({"deliveryAvgMs": 500.0})) == 1
    assert alerts.check({"deliveryAvgMs": None}) == []  # no deliveries in the interval
    assert len(alerts.check({"deliveryAvgMs": 500.0})) == 1


def test_rules_are_independent() -> None:
    alerts = checker()
    first = alerts.check({"connectionsFailed": 11, "errors": 5})
    assert [a.rule.name for a in first] == ["CONNECTION_FAILURES"]
    second = alerts.check({"connectionsFailed": 12, "errors": 101, "rssMb": 4096.0})
    assert [a.rule.name for a in second] == ["ERROR_REPLIES", "HIGH_MEMORY"]
    assert {a.rule.severity for a in second} == {AlertSeverity.INFO, AlertSeverity.CRITICAL}


def test_readings_are_deltas_of_one_interval() -> None:
    metrics = Metrics()
    readings = Readings(metrics, rss=lambda: 512 * 1024 * 1024)
    metrics.record_deliveries(0.010, 3)
    metrics.record_delivery(0.050)
    metrics.connection_failed()
    metrics.error(ErrorCode.INVALID_JSON)
    first = readings.read()
    assert first == {
        "deliveryAvgMs": pytest.approx(20.0),
        "connectionsFailed": 1.0,
        "slowConsumerCloses": 0.0,
        "errors": 1.0,
        "rssMb": 512.0,
    }
    metrics.slow_consumer_closes += 2
    second = readings.read()
    assert second["deliveryAvgMs"] is None
    assert second["connectionsFailed"] == 0.0
    assert second["slowConsumerCloses"] == 2.0
    metrics.record_delivery(0.001)
    metrics.reset_histograms()
    metrics.record_delivery(0.004)
    assert readings.read()["deliveryAvgMs"] == pytest.approx(4.0)


def test_alert_event_is_a_valid_alert_triggered() -> None:
    alerts = checker()
    [alert] = alerts.check({"slowConsumerCloses": 12})
    event = alert_event(alert, interval=5.0)
    assert event.type == "ALERT_TRIGGERED"
    assert event.payload.type == "SLOW_CONSUMERS"
    assert event.payload.severity is AlertSeverity.WARNING
    assert event.payload.source == "kaldrix"
    assert event.payload.metadata == {
        "reading": "slowConsumerCloses",
        "value": 12,
        "threshold": 10,
        "intervalSeconds": 5.0,
    }


async def test_alerts_subscriber_receives_alert_triggered_once(start_gateway, nursery, caplog):
    gateway = await start_gateway(sampling_interval=0.2, alert_failed_connections=1)
    ws = await connect_websocket_url(nursery, gateway.url)
    client = WireClient(ws)
    await client.expect("WELCOME")
    await client.subscribe("alerts")
    caplog.set_level(logging.WARNING, logger="kaldrix.alerts")
    # Connections that close before sending a request head fail: at least two of these
    # three land in one interval, above the threshold of one.
    for _ in range(3):
        stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
        await stream.aclose()
    [event] = await client.events(1)
    assert event["type"] == "ALERT_TRIGGERED" and event["channel"] == "alerts"
    assert event["payload"]["type"] == "CONNECTION_FAILURES"
    assert event["payload"]["severity"] == "warning"
    assert event["payload"]["metadata"]["value"] >= 2
    assert any("ALERT CONNECTION_FAILURES" in record.getMessage() for record in caplog.records)
    # The condition cleared with the next quiet interval; nothing else arrives meanwhile.
    with trio.move_on_after(0.7) as quiet:
        extra = await client.receive()
        raise AssertionError(f"unexpected frame {extra}")
    assert quiet.cancelled_caught
