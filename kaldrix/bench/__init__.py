"""`kaldrix bench`: the load generator and benchmark harness.

A publisher connection publishes events at a steady rate through the server's real
PUBLISH path; subscribed clients, spread over worker processes that read many sockets
per wake-up, measure each event's delivery latency from its envelope timestamp and
check its offset for losses and duplicates. Results: the seed's report with
percentiles, JSON, an HdrHistogram `.hgrm` file and an optional percentile plot.
"""

from ._harness import run_bench
from ._options import BenchOptions, load_scenario
from ._result import format_text

__all__ = ["BenchOptions", "format_text", "load_scenario", "run_bench"]
