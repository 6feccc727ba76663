"""Publish events given as arguments, or as JSON lines on stdin when there are none.

Each EVENT is a JSON object {"type": ..., "payload": {...}, "id": ...} ("id" is
optional), as a producer sends it inside PUBLISH; every event is its own PUBLISH.
The server's answer to each is printed as one JSON line, {"type": "ACK", "payload":
{"ref", "results": [{"id", "offsets", "duplicate"}]}} or {"type": "ERROR", "payload":
{"code", "message", "path"}}. An event without an id is given one, so a publish cut
off by a reconnect is not applied twice.

Exit status: 0 when every event was acknowledged, 1 when any was refused or the
server could not be reached, 2 when an EVENT argument is not a JSON object (then
nothing is sent) or a stdin line is not (lines before it were already published,
nothing after it is sent).

Example: kaldrix publish '{"type": "ALERT_TRIGGERED", "payload": {"type": "test",
  "severity": "info", "message": "hello", "timestamp": "2025-08-07T10:00:00Z"}}'
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
import trio

from ..client import ClientClosed, CommandError, open_client
from ..protocol import channel_problem, converter
from ._common import client_log_on_stderr

DEFAULT_URL = "ws://127.0.0.1:3000/ws"
CONNECT_ATTEMPTS = 3
"""Reconnects tried before giving up: a one-shot tool should fail, not wait forever."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway's WebSocket URL (default {DEFAULT_URL})")
    parser.add_argument(
        "--token", default=os.environ.get("KALDRIX_TOKEN"), help="publisher JWT (default: $KALDRIX_TOKEN)"
    )
    parser.add_argument("--channel", help="publish on this channel instead of the event type's channels")
    parser.add_argument("events", nargs="*", metavar="EVENT", help="a JSON event; none: read JSON lines from stdin")


def parse_event(text: str) -> dict[str, Any] | str:
    """The event in `text`, or why it cannot be read."""
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg}"
    if not isinstance(event, dict):
        return 'expected a JSON object such as {"type": "NEW_BLOCK", "payload": {...}}'
    return event


def run(args: argparse.Namespace) -> int:
    if args.channel is not None and (problem := channel_problem(args.channel)):
        print(f"kaldrix publish: --channel: {problem}", file=sys.stderr)
        return 2
    given = []
    for index, text in enumerate(args.events, 1):
        event = parse_event(text)
        if isinstance(event, str):
            print(f"kaldrix publish: event argument {index}: {event}", file=sys.stderr)
            return 2
        given.append(event)
    status = 130
    try:
        with client_log_on_stderr("publish", logging.WARNING):
            status = trio.run(_publish, args, given)
    except* KeyboardInterrupt:
        print("kaldrix publish: interrupted", file=sys.stderr)
    return status


async def _publish(args: argparse.Namespace, given: list[dict[str, Any]]) -> int:
    source = _from_list(given) if args.events else _from_stdin()
    status = 0
    try:
        async with open_client(
            args.url, token=args.token, max_reconnect_attempts=CONNECT_ATTEMPTS, reconnect_interval=0.2
        ) as client, aclosing(source) as events:
            async for where, event in events:
                if isinstance(event, str):
                    print(f"kaldrix publish: {where}: {event}", file=sys.stderr)
                    return 2
                try:
                    ack = await client.publish(event, channel=args.channel)
                    reply = {"type": "ACK", "payload": converter.unstructure(ack)}
                except CommandError as exc:
                    reply = {"type": "ERROR", "payload": converter.unstructure(exc.error)}
                    status = 1
                sys.stdout.write(orjson.dumps(reply).decode() + "\n")
                sys.stdout.flush()
    except ClientClosed as exc:
        print(f"kaldrix publish: {args.url}: {exc}", file=sys.stderr)
        return 1
    return status


async def _from_list(events: list[dict[str, Any]]) -> AsyncIterator[tuple[str, dict[str, Any] | str]]:
    for index, event in enumerate(events, 1):
        yield f"event argument {index}", event


async def _from_stdin() -> AsyncIterator[tuple[str, dict[str, Any] | str]]:
    number = 0
    async for line in trio.wrap_file(sys.stdin):
        number += 1
        if line.strip():
            yield f"line {number}", parse_event(line)

