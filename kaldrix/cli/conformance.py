"""Run the protocol v1 conformance scenarios against a server, over the wire alone.

Each scenario prints one line, PASS name, FAIL name: reason or SKIP name: reason,
then a summary `N passed, N failed, N skipped`; the exit code is 0 only when
nothing failed. The vectors of spec/vectors/*.json run as one scenario each.
Scenarios that PUBLISH use --token (a publisher token); without it they publish
anonymously and are skipped if the server refuses that.

Example: kaldrix conformance ws://127.0.0.1:3000/ws --token "$(kaldrix token --sub ci --role publisher)"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from ..conformance import DEFAULT_TIMEOUT, Outcome, Target, plan, run_conformance


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("url", metavar="URL", help="the WebSocket endpoint, e.g. ws://127.0.0.1:3000/ws")
    parser.add_argument("--token", metavar="JWT", help="a token with the publisher role, for the scenarios that PUBLISH")
    parser.add_argument("--admin-token", metavar="JWT", help="a token with the admin role, for REQUEST_METRICS")
    parser.add_argument("--vectors", type=Path, metavar="DIR", help="vector files to run (default: spec/vectors)")
    parser.add_argument(
        "--only", action="append", metavar="PATTERN", help="run only scenarios matching this fnmatch pattern (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of lines")
    parser.add_argument(
        "--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=f"seconds per scenario (default {DEFAULT_TIMEOUT:g})"
    )


def _print_line(outcome: Outcome) -> None:
    print(outcome.line(), flush=True)


def run(args: argparse.Namespace) -> int:
    if not args.url.startswith(("ws://", "wss://")):
        print(f"kaldrix conformance: expected a ws:// or wss:// URL, got {args.url!r}", file=sys.stderr)
        return 2
    target = Target(args.url, token=args.token, admin_token=args.admin_token, timeout=args.timeout, vectors=args.vectors)
    if not plan(target, args.only):
        print(f"kaldrix conformance: no scenario matches {' '.join(args.only or [])}", file=sys.stderr)
        return 2
    report = trio.run(lambda: run_conformance(target, only=args.only, on_outcome=None if args.json else _print_line))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.summary())
    return 0 if report.ok else 1
