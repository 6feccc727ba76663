"""The `kaldrix` command: one subcommand per tool, each in its own module of kaldrix.cli."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

COMMANDS = {
    "serve": "run the gateway (WebSocket + ops HTTP on one port)",
    "listen": "print the events of channels as JSON lines",
    "publish": "publish events given as arguments or JSON lines on stdin",
    "token": "print a signed JWT for a client",
    "schema": "write the JSON Schemas and the AsyncAPI document into spec/schema",
    "conformance": "run the protocol's conformance scenarios against a server",
    "bench": "benchmark a server: fan-out throughput, delivery latency percentiles, losses",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaldrix",
        description="kaldrix: the real-time event gateway of the KALDRIX chain.",
    )
    parser.add_argument("--version", action="version", version=f"kaldrix {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"kaldrix.cli.{name}")
        sub = subparsers.add_parser(name, help=summary, description=module.__doc__)
        module.configure(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
