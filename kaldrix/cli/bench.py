"""Benchmark a kaldrix server: fan-out throughput, delivery latency percentiles, losses.

Without --url the harness starts its own `kaldrix serve` (simulator off, anonymous
publishing on), pinned to CPU 0 with the load generator on the other CPUs. A publisher
publishes --message-rate events/s on --channel through PUBLISH; every client subscribes
to it and measures each event's latency from its envelope timestamp. --stress-test
sweeps the rate upwards until delivery is no longer clean (p99 >= 50 ms or a loss).

Examples:
  kaldrix bench --clients 500 --duration 60 --message-rate 1000
  kaldrix bench --scenario bench/scenarios/seed.toml --output json --save result.json
  kaldrix bench --url ws://127.0.0.1:3000/ws --clients 100 --plot latency.png
  kaldrix bench --url ws://127.0.0.1:3001/ws --publish-url ws://127.0.0.1:3000/ws --server-pid 4242
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson
import trio

from ..config import LOG_LEVELS

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _flag(text: str) -> bool:
    """The seed writes `--stress-test true`; a bare `--stress-test` means true as well."""
    lowered = text.lower()
    if lowered not in _TRUE | _FALSE:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in _TRUE


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--scenario", metavar="FILE", help="TOML scenario file (flags given here win)")
    parser.add_argument("--clients", type=int, help="subscribed clients (default 100)")
    parser.add_argument("--duration", type=float, help="seconds of publishing (default 10)")
    parser.add_argument("--message-rate", type=float, help="events published per second (default 100)")
    parser.add_argument("--stress-test", type=_flag, nargs="?", const=True, help="sweep the rate up to the limit")
    parser.add_argument("--output", choices=("text", "json"), help="result format on stdout (default text)")
    parser.add_argument("--log-level", choices=sorted(LOG_LEVELS), help="basic shows progress; warning hides it")
    parser.add_argument("--url", help="bench a running server instead of starting one")
    parser.add_argument("--publish-url", help="publish through this server (another node on the same broker) instead of --url")
    parser.add_argument("--channel", help="channel to publish on and subscribe to (default blocks)")
    parser.add_argument("--token", help="bearer token for --url servers that require one")
    parser.add_argument("--workers", type=int, help="load-generator processes (default: 1 per 2,500 clients, at least 2)")
    parser.add_argument("--no-pin", dest="pin", action="store_const", const=False, help="do not pin server and generator to CPUs")
    parser.add_argument("--warmup", type=float, help="seconds of publishing before measuring")
    parser.add_argument("--churn-rate", type=float, help="extra connections/s opened and closed during the run")
    parser.add_argument("--step-duration", type=float, help="seconds per rate step of --stress-test (default 5)")
    parser.add_argument("--dialect", choices=("kaldrix", "socketio"), help="protocol of the server under test")
    parser.add_argument("--server-pid", type=int, help="with --url: read this process's memory and CPU from /proc")
    parser.add_argument(
        "--watch-pid", dest="watch_pids", action="append", metavar="NAME=PID",
        help="also report the CPU share of this server-side process (a second node, Redis)",
    )  # fmt: skip
    parser.add_argument("--server-arg", dest="server_args", action="append", help="extra flag for the started server")
    parser.add_argument("--hgrm", metavar="FILE", help="write the HdrHistogram percentile distribution here")
    parser.add_argument("--plot", metavar="FILE", help="write a latency-percentile PNG here (needs matplotlib)")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON result here")
    parser.add_argument("--label", help="name of this run in outputs")


_OPTIONS = (
    "clients", "duration", "message_rate", "stress_test", "output", "log_level", "url", "channel", "token",
    "workers", "pin", "warmup", "churn_rate", "step_duration", "dialect", "server_pid", "server_args",
    "hgrm", "plot", "save", "label", "publish_url", "watch_pids",
)  # fmt: skip


def _say(level: str) -> Any:
    if level in ("warning", "error"):
        return lambda line: None
    return lambda line: print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchOptions, format_text, load_scenario, run_bench

    values: dict[str, Any] = {}
    if args.scenario:
        try:
            values.update(load_scenario(args.scenario))
        except (OSError, ValueError) as exc:
            print(f"kaldrix bench: {exc}", file=sys.stderr)
            return 2
    values.update({name: getattr(args, name) for name in _OPTIONS if getattr(args, name, None) is not None})
    for key in ("server_args", "watch_pids"):
        if key in values:
            values[key] = tuple(values[key])
    options = BenchOptions(**values)
    if options.clients < 1 or options.duration <= 0 or options.message_rate <= 0:
        print("kaldrix bench: --clients, --duration and --message-rate must be positive", file=sys.stderr)
        return 2
    try:
        result = trio.run(run_bench, options, _say(options.log_level))
    except (OSError, RuntimeError) as exc:
        print(f"kaldrix bench: {exc}", file=sys.stderr)
        return 1
    document = orjson.dumps(result, option=orjson.OPT_INDENT_2)
    if options.save:
        with open(options.save, "wb") as handle:
            handle.write(document + b"\n")
    if options.output == "json":
        sys.stdout.write(document.decode() + "\n")
    else:
        sys.stdout.write(format_text(result))
    return 0
