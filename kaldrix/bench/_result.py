"""Turning what the workers measured into the benchmark's outputs.

Histograms travel from the workers as HdrHistogram's compressed encoding and are merged
here, so every percentile is over all deliveries of the run, not an average of
per-worker percentiles. Outputs: the seed's text report, a JSON document, an `.hgrm`
percentile distribution (HdrHistogram's own text format, milliseconds) and, with
matplotlib installed, a latency-by-percentile PNG.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from ..metrics import HIGHEST_US, LOWEST_US, SIGNIFICANT_DIGITS, summarize

__all__ = ["format_text", "merge", "summary", "write_hgrm", "write_plot"]



def merge(encoded: Iterable[bytes]) -> HdrHistogram:
    merged = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
    for blob in encoded:
        merged.add(HdrHistogram.decode(blob))
    return merged



def summary(histogram: HdrHistogram, sum_us: int) -> dict[str, Any]:
    """avg/min/max/p50/p90/p95/p99/p99.9 in milliseconds and the count."""
    return summarize(histogram, sum_us)


def hgrm_text(histogram: HdrHistogram) -> str:
    out = io.BytesIO()
    histogram.output_percentile_distribution(out, 1000.0)  # recorded in us, written in ms
    return out.getvalue().decode()


def write_hgrm(histogram: HdrHistogram, path: str | Path) -> None:
    Path(path).write_text(hgrm_text(histogram))


def write_plot(curves: Mapping[str, HdrHistogram], path: str | Path, title: str) -> None:
    """Latency by percentile on the usual log "nines" axis; needs the `bench` extra (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'kaldrix[bench]'") from None
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for label, histogram in curves.items():
        if not histogram.total_count:
            continue
        xs, ys = [], []
        for item in histogram.get_percentile_iterator(5):
            percentile = min(item.percentile_level_iterated_to, 99.9999)
            xs.append(1.0 / (1.0 - percentile / 100.0))
            ys.append(item.value_iterated_to / 1000.0)
        axes.plot(xs, ys, label=label)
    axes.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    axes.set_xticks(ticks)
    axes.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
    axes.set_xlim(1, 10000)
    axes.set_xlabel("percentile")
    axes.set_ylabel("delivery latency (ms)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_text(result: Mapping[str, Any]) -> str:
    """The seed's "Stress Test Results" block, with the percentiles and the checks added."""
    d = result["eventDelivery"]
    t = result["throughput"]
    c = result["connections"]
    r = result["resources"]
    title = f"Benchmark Results ({result['label']})" if result.get("label") else "Benchmark Results"
    lines = [
        title,
        "=" * len(title),
        f"Scenario: {result['clients']} clients, {result['duration']:g}s, {result['messageRate']:g} msg/s on {result['channel']!r}"
        f" ({result['server']})",
        "",
        "Event Delivery:",
        f"- Average: {d['avg']:.2f}ms",
        f"- Min: {d['min']:.2f}ms",
        f"- Max: {d['max']:.2f}ms",
        f"- 50th percentile: {d['p50']:.2f}ms",
        f"- 90th percentile: {d['p90']:.2f}ms",
        f"- 95th percentile: {d['p95']:.2f}ms",
        f"- 99th percentile: {d['p99']:.2f}ms",
        f"- 99.9th percentile: {d['p999']:.2f}ms",
        f"- Total events: {d['count']}",
        "",
        "Throughput:",
        f"- Events/sec published (acknowledged): {t['eventsPerSecond']:.2f}",
        f"- Deliveries/sec: {t['deliveriesPerSecond']:.2f}",
        "",
        "Connections:",
        f"- Active: {c['active']}",
        f"- Total: {c['total']}",
        f"- Failed: {c['failed']}",
        f"- Avg connection time: {c['avgConnectTimeMs']:.2f}ms",
        f"- Disconnected during the run: {c['disconnected']}",
    ]
    if c.get("churned") or c.get("churnFailed"):
        lines.append(f"- Churn: {c['churned']} opened and closed, {c['churnFailed']} failed")
    lines += [
        "",
        "Delivery Integrity:",
        f"- Lost events: {result['lost']}",
        f"- Duplicated events: {result['duplicates']}",
        f"- Publishes never acknowledged: {result['unacknowledgedPublishes']}",
        "",
        "Resource Usage:",
        f"- Server memory: {r['serverRssBytes'] / (1024 * 1024):.2f}MB"
        + (f" ({r['rssPerConnectionBytes'] / 1024:.1f}KB per connection)" if r.get("rssPerConnectionBytes") else ""),
        f"- Server CPU: {_percent(r.get('serverCpu'))}",
        *[f"- {name} CPU: {_percent(share)}" for name, share in (r.get("watchedCpu") or {}).items()],
        f"- Load generator CPU: {_percent(r['generatorCpu'])} ({r['generatorProcesses']} processes)"
        + (" -- SATURATED: figures are bounded by the generator" if r.get("generatorSaturated") else ""),
        f"- Connections: {c['active']}",
    ]
    if result.get("steps"):
        lines += [
            "",
            "Stress Test (rate sweep):",
            "  msg/s  accepted/s   deliveries/s     p50 ms     p99 ms   lost  clean  kept up",
        ]
        for step in result["steps"]:
            lines.append(
                f"  {step['messageRate']:>5g} {step['acceptedEventsPerSecond']:>11.1f} {step['deliveriesPerSecond']:>14.0f}"
                f" {step['p50']:>10.2f} {step['p99']:>10.2f} {step['lost']:>6} {'yes' if step['clean'] else 'no':>6}"
                f" {'yes' if step['keptUp'] else 'no':>8}"
            )
        lines.append(f"- Max clean fan-out: {result['maxCleanDeliveriesPerSecond']:.0f} deliveries/s")
        lines.append(f"- Max clean fan-out keeping up with the publisher: {result['maxKeptUpDeliveriesPerSecond']:.0f} deliveries/s")
    lines += ["", f"Verdict: {result['verdict']}"]
    return "\n".join(lines) + "\n"


def _percent(share: float | None) -> str:
    if share is None:
        return "unknown"
    return f"{share * 100:.0f}% of one core"
