"""`kaldrix publish` and `kaldrix listen` against a real gateway (in a thread or a subprocess)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import trio

from kaldrix.cli import listen, publish
from kaldrix.client import open_client

from .conftest import block_event

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


def parse(module: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return parser.parse_args(argv)


def kaldrix_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "kaldrix", *argv]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KALDRIX_TOKEN", None)
    return env


def json_lines(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


# -- publish -------------------------------------------------------------------------


async def test_publish_prints_one_ack_per_event(gateway, connect, capsys):
    subscriber = await connect()
    await subscriber.subscribe("blocks")
    args = parse(publish, ["--url", gateway.url, orjson.dumps(block_event(1)).decode(), orjson.dumps({**block_event(2), "id": "b-2"}).decode()])
    status = await trio.to_thread.run_sync(publish.run, args)
    assert status == 0
    replies = json_lines(capsys.readouterr().out.encode())
    assert [reply["type"] for reply in replies] == ["ACK", "ACK"]
    assert [reply["payload"]["results"][0]["offsets"] for reply in replies] == [{"blocks": 1}, {"blocks": 2}]
    assert replies[1]["payload"]["results"][0]["id"] == "b-2"
    events = await subscriber.events(2)
    assert [event["payload"]["height"] for event in events] == [1, 2]


async def test_publish_reports_a_refused_event_and_exits_1(gateway, capsys):
    bad = {"type": "NEW_BLOCK", "payload": {"height": 1}}
    args = parse(publish, ["--url", gateway.url, "--channel", "blocks", orjson.dumps(bad).decode(), orjson.dumps(block_event(5)).decode()])
    status = await trio.to_thread.run_sync(publish.run, args)
    assert status == 1
    error, ack = json_lines(capsys.readouterr().out.encode())
    assert error["type"] == "ERROR" and error["payload"]["code"] == "INVALID_PAYLOAD"
    assert error["payload"]["path"].startswith("payload.event.payload")
    assert ack["type"] == "ACK"


async def test_publish_refuses_an_unreadable_argument_before_sending(gateway, capsys):
    args = parse(publish, ["--url", gateway.url, orjson.dumps(block_event(1)).decode(), "{not json"])
    assert publish.run(args) == 2
    captured = capsys.readouterr()
    assert "event argument 2: not valid JSON" in captured.err and captured.out == ""
    assert gateway.broker.position("blocks").offset == 0


async def test_publish_cannot_reach_the_server(capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = parse(publish, ["--url", f"ws://127.0.0.1:{port}/ws", orjson.dumps(block_event(1)).decode()])
    assert await trio.to_thread.run_sync(publish.run, args) == 1
    assert "cannot connect" in capsys.readouterr().err


async def test_publish_reads_json_lines_from_stdin_and_names_a_bad_line(gateway):
    lines = [orjson.dumps(block_event(1)), b"", orjson.dumps(block_event(2)), b"[1, 2]", orjson.dumps(block_event(3))]
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            kaldrix_command("publish", "--url", gateway.url),
            stdin=b"\n".join(lines) + b"\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_env(),
            cwd=ROOT,
        )
    assert result.returncode == 2, result.stderr
    assert "line 4: expected a JSON object" in result.stderr.decode()
    replies = json_lines(result.stdout)
    assert [reply["payload"]["results"][0]["offsets"]["blocks"] for reply in replies] == [1, 2]
    assert gateway.broker.position("blocks").offset == 2  # nothing after the bad line


# -- listen ----------------------------------------------------------------------------


def test_event_line_has_the_documented_keys():
    from kaldrix.protocol import build_new_block_message

    event = build_new_block_message(block_id="b1", height=1)
    event = type(event)(type=event.type, payload=event.payload, id="e1", timestamp=event.timestamp, channel="blocks", offset=1, epoch="x")
    line = orjson.loads(listen.event_line(event))
    assert list(line) == ["channel", "offset", "type", "payload", "timestamp", "id"]
    assert line["payload"]["blockId"] == "b1" and line["offset"] == 1


def test_listen_refuses_a_bad_channel(capsys):
    assert listen.run(parse(listen, ["nonsense"])) == 2
    assert "unknown channel" in capsys.readouterr().err


class Lines:
    """Complete lines read from a child's pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def take(self, count: int) -> list[dict[str, Any]]:
        with trio.fail_after(TIMEOUT):
            while self.buffer.count(b"\n") < count:
                chunk = await self.stream.receive_some()
                assert chunk, f"the listener exited early; got {self.buffer!r}"
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n", count)
        return [orjson.loads(line) for line in lines]


async def test_listen_prints_events_survives_a_drop_and_stops_cleanly_on_sigint(gateway):
    process = await trio.lowlevel.open_process(
        kaldrix_command("listen", "--url", gateway.url, "blocks"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=ROOT,
    )
    try:
        with trio.fail_after(TIMEOUT):
            while gateway.router.subscriber_count("blocks") < 1:
                await trio.sleep(0.02)
        stdout = Lines(process.stdout)
        async with open_client(gateway.url, reconnect_interval=0.02) as producer:
            for height in (1, 2, 3):
                await producer.publish(block_event(height))
            first = await stdout.take(3)
            for conn in list(gateway.connections):
                if conn.channels:
                    conn.kick(1012, "restart")
            for height in (4, 5):  # published while the listener is away: replayed on return
                await producer.publish(block_event(height))
            rest = await stdout.take(2)
        lines = first + rest
        assert [line["offset"] for line in lines] == [1, 2, 3, 4, 5]
        assert [line["payload"]["height"] for line in lines] == [1, 2, 3, 4, 5]
        assert all(line["channel"] == "blocks" and line["type"] == "NEW_BLOCK" and line["id"] for line in lines)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(TIMEOUT):
            code = await process.wait()
        errors = b""
        while chunk := await process.stderr.receive_some():
            errors += chunk
        assert code == 0, errors
        assert b"Traceback" not in errors
        assert b"reconnecting" in errors  # the drop was reported
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
