"""Alerts: the seed's performance thresholds, checked every sampling interval.

A rule compares one reading of the last interval (average delivery latency, failed
connections, ...) with its threshold from Config. A crossing publishes ALERT_TRIGGERED
on `alerts` through the normal publish path, so subscribers, history and recovery treat
it like any other event, and logs a line. A rule that fired stays quiet until its
condition clears, then re-arms: one alert per episode, not one per interval.

`AlertChecker` and `Readings` are plain objects (no I/O, no clock); `run_alerts` is the
thin trio loop around them that the gateway starts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from ._resources import rss_bytes
from .config import Config
from .metrics import Metrics
from .protocol import AlertSeverity, Envelope, build_alert_triggered_message

__all__ = ["Alert", "AlertChecker", "Readings", "Rule", "rules_from_config", "run_alerts"]

log = logging.getLogger("kaldrix.alerts")

SOURCE = "kaldrix"


@attrs.frozen
class Rule:
    """One threshold: fires when `reading` is strictly above `threshold` (0 disables it)."""

    name: str
    reading: str
    threshold: float
    severity: AlertSeverity
    message: str
    """Formatted with `value` and `threshold`."""


@attrs.frozen
class Alert:
    """A rule that has just crossed its threshold."""

    rule: Rule
    value: float

    @property
    def message(self) -> str:
        return self.rule.message.format(value=self.value, threshold=self.rule.threshold)


def rules_from_config(config: Config) -> list[Rule]:
    """The enabled rules, with the thresholds the configuration gives them."""
    rules = [
        Rule(
            "HIGH_DELIVERY_LATENCY",
            "deliveryAvgMs",
            config.alert_delivery_latency_ms,
            AlertSeverity.WARNING,
            "average event delivery latency {value:.2f}ms is above {threshold:g}ms",
        ),
        Rule(
            "CONNECTION_FAILURES",
            "connectionsFailed",
            config.alert_failed_connections,
            AlertSeverity.WARNING,
            "{value:g} connections failed in one sampling interval (threshold {threshold:g})",
        ),
        Rule(
            "SLOW_CONSUMERS",
            "slowConsumerCloses",
            config.alert_slow_consumers,
            AlertSeverity.WARNING,
            "{value:g} slow consumers closed in one sampling interval (threshold {threshold:g})",
        ),
        Rule(
            "ERROR_REPLIES",
            "errors",
            config.alert_errors,
            AlertSeverity.INFO,
            "{value:g} ERROR replies sent in one sampling interval (threshold {threshold:g})",
        ),
        Rule(
            "HIGH_MEMORY",
            "rssMb",
            config.alert_memory_mb,
            AlertSeverity.CRITICAL,
            "resident memory {value:.1f}MiB is above {threshold:g}MiB",
        ),
    ]
    return [rule for rule in rules if rule.threshold > 0]


class AlertChecker:
    """Edge-triggered thresholds: `check` returns only the rules that start firing."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.firing: set[str] = set()

    def check(self, readings: Mapping[str, float | None]) -> list[Alert]:
        """Compare one interval's readings; a missing or None reading counts as clear."""
        fired = []
        for rule in self.rules:
            value = readings.get(rule.reading)
            if value is not None and value > rule.threshold:
                if rule.name not in self.firing:
                    self.firing.add(rule.name)
                    fired.append(Alert(rule, value))
            else:
                self.firing.discard(rule.name)
        return fired


class Readings:
    """What happened since the previous `read()`, from the server's own counters.

    Independent of the metrics sampler: it keeps its own previous values, so the
    average latency is exact (sum and count deltas) and nothing depends on which task
    runs first at the end of an interval.
    """

    def __init__(self, metrics: Metrics, rss: Callable[[], int] = rss_bytes) -> None:
        self._metrics = metrics
        self._rss = rss
        self._last = self._totals()

    def _totals(self) -> tuple[int, int, int, int, int]:
        m = self._metrics
        return (
            m.delivery_latency.sum_us,
            m.delivery_latency.count,
            m.connections_failed,
            m.slow_consumer_closes,
            sum(m.errors.values()),
        )

    def read(self) -> dict[str, float | None]:
        now = self._totals()
        # A histogram reset (between benchmark phases) makes a delta negative: start over.
        delta = [b - a if b >= a else b for a, b in zip(self._last, now, strict=True)]
        self._last = now
        sum_us, count, failed, slow, errors = delta
        return {
            "deliveryAvgMs": sum_us / count / 1000.0 if count > 0 else None,
            "connectionsFailed": float(failed),
            "slowConsumerCloses": float(slow),
            "errors": float(errors),
            "rssMb": self._rss() / (1024 * 1024),
        }


def alert_event(alert: Alert, *, interval: float) -> Envelope:
    """The ALERT_TRIGGERED event for one crossing."""
    return build_alert_triggered_message(
        type=alert.rule.name,
        severity=alert.rule.severity,
        message=alert.message,
        source=SOURCE,
        metadata={
            "reading": alert.rule.reading,
            "value": round(alert.value, 3),
            "threshold": alert.rule.threshold,
            "intervalSeconds": interval,
        },
    )


async def run_alerts(
    metrics: Metrics,
    config: Config,
    publish: Callable[[list[Envelope]], Awaitable[None]],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check the rules every `config.sampling_interval` and publish what crosses."""
    checker = AlertChecker(rules_from_config(config))
    readings = Readings(metrics)
    task_status.started()
    if not checker.rules:
        return
    interval = config.sampling_interval
    while True:
        await trio.sleep(interval)
        alerts = checker.check(readings.read())
        for alert in alerts:
            log.warning("ALERT %s (%s): %s", alert.rule.name, alert.rule.severity.value, alert.message)
        if alerts:
            await publish([alert_event(alert, interval=interval) for alert in alerts])
