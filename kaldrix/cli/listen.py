"""Print the events of one or more channels as JSON lines, until interrupted.

Each line is {"channel", "offset", "type", "payload", "timestamp", "id"}, flushed at
once, so the output can be piped into jq or a file. The listener reconnects by itself
and resumes every channel from the last offset it printed: no event is printed twice
or skipped. When the server can no longer fill a hole (history trimmed, or a new
epoch after the server lost its history), the gap is reported on stderr, as are
connection problems. Ctrl-C (or SIGTERM) stops it with exit code 0.

Example: kaldrix listen --url ws://127.0.0.1:3000/ws blocks address:0xabc
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import orjson
import trio

from ..client import ClientClosed, Gap, KaldrixClient, open_client
from ..protocol import Envelope, channel_problem, converter
from ._common import client_log_on_stderr

DEFAULT_URL = "ws://127.0.0.1:3000/ws"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway's WebSocket URL (default {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("KALDRIX_TOKEN"), help="JWT to connect with (default: $KALDRIX_TOKEN)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also report every (re)connection on stderr")
    parser.add_argument("channels", nargs="+", metavar="CHANNEL", help="blocks, dag, validators, address:<addr>, ...")


def event_line(event: Envelope) -> bytes:
    """One event as the JSON line the listener prints."""
    return orjson.dumps(
        {
            "channel": event.channel,
            "offset": event.offset,
            "type": event.type,
            "payload": converter.unstructure(event.payload),
            "timestamp": event.timestamp,
            "id": event.id,
        }
    )


def gap_text(gap: Gap) -> str:
    lost = f"{gap.missed} event(s)" if gap.missed is not None else "the rest of epoch " + gap.epoch
    return (
        f"gap on {gap.channel}: {lost} lost after offset {gap.last_offset} ({gap.reason}); "
        f"continuing after offset {gap.new_offset} of epoch {gap.new_epoch}"
    )


def run(args: argparse.Namespace) -> int:
    for name in args.channels:
        if problem := channel_problem(name):
            print(f"kaldrix listen: {problem}", file=sys.stderr)
            return 2
    with client_log_on_stderr("listen", logging.INFO if args.verbose else logging.WARNING):
        return trio.run(_listen, args)


async def _listen(args: argparse.Namespace) -> int:
    interrupted = False

    async def close_on_signal(client: KaldrixClient) -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                interrupted = True
                await client.close()  # a clean close (1000) ends the event stream below
                return

    out = sys.stdout.buffer
    try:
        async with (
            open_client(args.url, token=args.token, channels=args.channels, wait_connected=False) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(close_on_signal, client)
            client.on_gap(lambda gap: print(f"kaldrix listen: {gap_text(gap)}", file=sys.stderr, flush=True))
            async with client.events() as events:
                async for event in events:
                    try:
                        out.write(event_line(event) + b"\n")
                        out.flush()
                    except BrokenPipeError:
                        # Whoever read our output is gone (| head): stop quietly.
                        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
                        interrupted = True
                        break
            nursery.cancel_scope.cancel()
            error = client.state.connection_error
    except ClientClosed as exc:
        error = str(exc)
    if interrupted:
        return 0
    print(f"kaldrix listen: stopped: {error or 'connection closed'}", file=sys.stderr)
    return 1

