"""The conformance runner: it passes the real gateway and catches servers that break the contract."""

from __future__ import annotations

import argparse
import functools
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from kaldrix.cli import conformance as conformance_cli
from kaldrix.conformance import (
    Outcome,
    Report,
    Status,
    Target,
    default_vectors_dir,
    load_vectors,
    plan,
    run_conformance,
)
from kaldrix.security import issue_token

SECRET = "conformance-test-secret-of-at-least-32-bytes!!"
ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")
LISTENING = re.compile(r"listening on (ws://127\.0\.0\.1:\d+/ws)")
PUBLISHING = ["ordering-and-offsets", "routing", "recovery-with-since", "recovery-bogus-epoch", "dedup", "batch", "unsubscribe"]


def failures(report: Report) -> str:
    return "\n".join(outcome.line() for outcome in report.failures())


def frame(text: dict[str, Any]) -> str:
    return json.dumps(text, separators=(",", ":"))


GOOD_VECTORS = [
    {"name": "ping", "frame": frame({"type": "PING", "id": "v1", "payload": {"t": 1}}), "verdict": "accept"},
    {"name": "minimal-ping", "frame": '{"type":"PING"}', "verdict": "accept"},
    {"name": "subscribe", "frame": frame({"type": "SUBSCRIBE", "id": "v2", "payload": {"channels": ["blocks"]}}), "verdict": "accept"},
    {
        "name": "publish",
        "frame": frame(
            {
                "type": "PUBLISH",
                "id": "v3",
                "payload": {"event": {"type": "NODE_STATUS", "payload": {"nodeId": "vec-1", "status": "ONLINE", "lastUpdate": "2025-08-07T10:00:00Z"}}},
            }
        ),
        "verdict": "accept",
    },
    {"name": "not-json", "frame": '{"type": "PING", ', "verdict": "reject", "code": "INVALID_JSON"},
    {
        "name": "bad-channel",
        "frame": frame({"type": "SUBSCRIBE", "id": "v4", "payload": {"channels": ["blocks", "nope"]}}),
        "verdict": "reject",
        "code": "INVALID_CHANNEL",
        "path": "payload.channels[1]",
    },
    {
        "name": "height-missing",
        "frame": frame(
            {
                "type": "PUBLISH",
                "id": "v5",
                "payload": {"event": {"type": "NEW_BLOCK", "payload": {"blockId": "b1", "timestamp": "2025-08-07T10:00:00Z"}}},
            }
        ),
        "verdict": "reject",
        "code": "INVALID_PAYLOAD",
        "path": "payload.event.payload.height",
    },
    {"name": "unknown-type", "frame": frame({"type": "NOPE", "id": "v6"}), "verdict": "reject", "code": "UNKNOWN_TYPE"},
]


@pytest.fixture
def good_vectors(tmp_path: Path) -> Path:
    directory = tmp_path / "vectors"
    directory.mkdir()
    (directory / "sample.json").write_text(json.dumps({"description": "known good", "vectors": GOOD_VECTORS}))
    return directory


def publisher_token() -> str:
    return issue_token("conformance-producer", "publisher", secret=SECRET)


def admin_token() -> str:
    return issue_token("conformance-ops", "admin", secret=SECRET)


# -- against the real gateway ----------------------------------------------------------------


async def test_every_scenario_passes_against_the_gateway(gateway, good_vectors):
    report = await run_conformance(Target(gateway.url, vectors=good_vectors))
    assert report.failed == 0, failures(report)
    outcomes = report.by_name()
    fixed = [s.name for s in plan(Target(gateway.url, vectors=good_vectors)) if not s.name.startswith("vector:")]
    assert set(fixed) <= set(outcomes)
    for name in ("welcome", "ping-pong", "subscribe-ack", *PUBLISHING, "error:INVALID_JSON", "error:TOO_LARGE", "error:FORBIDDEN"):
        assert outcomes[name].status is Status.PASS, outcomes[name]
    assert all(outcomes[f"vector:sample/{v['name']}"].status is Status.PASS for v in GOOD_VECTORS)
    # No token given: nothing to authenticate with; this gateway configures no rate limit.
    assert outcomes["auth-token"].status is Status.SKIP
    assert outcomes["error:RATE_LIMITED"].status is Status.SKIP


async def test_the_spec_vectors_hold_against_the_gateway(gateway):
    report = await run_conformance(Target(gateway.url), only=["vector*"])
    assert report.outcomes, "no vector scenario ran"
    assert report.failed == 0, failures(report)


async def test_a_secured_gateway_passes_with_tokens(start_gateway):
    gateway = await start_gateway(jwt_secret=SECRET, allow_anonymous_publish=False)
    target = Target(gateway.url, token=publisher_token(), admin_token=admin_token())
    only = ["welcome", "auth-token", "request-metrics", *PUBLISHING, "error:FORBIDDEN"]
    report = await run_conformance(target, only=only)
    assert report.failed == 0, failures(report)
    assert report.passed == len(only), [outcome.line() for outcome in report.outcomes]


async def test_a_secured_gateway_answers_a_bad_auth_before_closing(start_gateway):
    gateway = await start_gateway(jwt_secret=SECRET)
    report = await run_conformance(Target(gateway.url, token=publisher_token()), only=["error:UNAUTHORIZED"])
    assert report.passed == 1, failures(report)


async def test_without_publish_rights_the_publishing_scenarios_skip(start_gateway):
    gateway = await start_gateway(jwt_secret=SECRET, allow_anonymous_publish=False)
    report = await run_conformance(Target(gateway.url), only=["request-metrics", *PUBLISHING])
    assert report.failed == 0, failures(report)
    outcomes = report.by_name()
    for name in PUBLISHING:
        assert outcomes[name].status is Status.SKIP
        assert "FORBIDDEN" in outcomes[name].reason and "--token" in outcomes[name].reason
    assert outcomes["request-metrics"].status is Status.SKIP
    assert "--admin-token" in outcomes["request-metrics"].reason


# -- against servers that break the contract ------------------------------------------------------


def envelope(message_type: str, payload: dict[str, Any]) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps({"type": message_type, "payload": payload, "id": "s1", "timestamp": stamp, "version": "1.0.0"})


WELCOME = {"serverVersion": "0", "protocolVersion": "1.0.0", "heartbeatInterval": 20000, "authenticated": False}


def welcome(**changes: Any) -> str:
    return envelope("WELCOME", {**WELCOME, "sessionId": uuid.uuid4().hex, **changes})


async def silent_server(request: WebSocketRequest, **changes: Any) -> None:
    """Says WELCOME, then ignores everything."""
    ws = await request.accept()
    await ws.send_message(welcome(**changes))
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        pass


async def yes_server(request: WebSocketRequest) -> None:
    """Acknowledges every command, whatever it is, and never delivers an event."""
    ws = await request.accept()
    await ws.send_message(welcome())
    try:
        while True:
            message = await ws.get_message()
            try:
                ref = json.loads(message).get("id")
            except (ValueError, AttributeError):
                ref = None
            await ws.send_message(envelope("ACK", {"ref": ref, "results": [{"id": "x", "offsets": {}}]}))
    except ConnectionClosed:
        pass


async def start_fake(nursery: trio.Nursery, handler: Any) -> str:
    server = await nursery.start(functools.partial(serve_websocket, handler, "127.0.0.1", 0, None))
    return f"ws://127.0.0.1:{server.port}/ws"


async def test_a_server_that_ignores_everything_fails(nursery):
    url = await start_fake(nursery, silent_server)
    only = ["welcome", "ping-pong", "subscribe-ack", "dedup", "error:INVALID_JSON", "error:INVALID_CHANNEL"]
    report = await run_conformance(Target(url, timeout=0.3), only=only)
    outcomes = report.by_name()
    assert outcomes["welcome"].status is Status.PASS, outcomes["welcome"]
    for name in only[1:]:
        assert outcomes[name].status is Status.FAIL, outcomes[name]
        assert "timed out after 0.3 s waiting for" in outcomes[name].reason
    assert "PONG" in outcomes["ping-pong"].reason
    assert report.summary() == "1 passed, 5 failed, 0 skipped"


async def test_a_server_that_accepts_everything_fails(nursery, good_vectors):
    url = await start_fake(nursery, yes_server)
    only = ["ping-pong", "subscribe-ack", "error:INVALID*", "error:UNKNOWN_TYPE", "error:UNAUTHORIZED", "vector:sample/bad-channel"]
    report = await run_conformance(Target(url, timeout=0.3, vectors=good_vectors), only=only)
    outcomes = report.by_name()
    assert outcomes["subscribe-ack"].status is Status.FAIL
    assert "`channels`" in outcomes["subscribe-ack"].reason
    assert outcomes["error:UNKNOWN_TYPE"].status is Status.FAIL
    assert "must be refused with UNKNOWN_TYPE" in outcomes["error:UNKNOWN_TYPE"].reason
    assert outcomes["error:INVALID_PAYLOAD"].status is Status.FAIL
    assert "vector:sample/bad-channel" in outcomes and outcomes["vector:sample/bad-channel"].status is Status.FAIL
    assert "a reject vector was accepted" in outcomes["vector:sample/bad-channel"].reason
    assert report.failed == len(report.outcomes) == 10, [o.line() for o in report.outcomes]


async def test_a_wrong_welcome_fails(nursery):
    url = await start_fake(nursery, functools.partial(silent_server, protocolVersion="2.0.0"))
    report = await run_conformance(Target(url, timeout=0.5), only=["welcome"])
    (outcome,) = report.outcomes
    assert outcome.status is Status.FAIL and '"1.x"' in outcome.reason


async def test_vectors_the_server_does_not_honour_fail(gateway, tmp_path):
    directory = tmp_path / "vectors"
    directory.mkdir()
    wrong = [
        {"name": "valid-ping-called-invalid", "frame": '{"type":"PING","id":"w1"}', "verdict": "reject", "code": "INVALID_PAYLOAD"},
        {
            "name": "wrong-path",
            "frame": frame({"type": "SUBSCRIBE", "id": "w2", "payload": {"channels": ["nope"]}}),
            "verdict": "reject",
            "code": "INVALID_CHANNEL",
            "path": "payload.channels[9]",
        },
        {"name": "invalid-called-valid", "frame": '{"type":"PING","id":"w3","payload":[]}', "verdict": "accept"},
    ]
    (directory / "wrong.json").write_text(json.dumps({"description": "wrong on purpose", "vectors": wrong}))
    (directory / "broken.json").write_text('{"vectors": [')
    (directory / "partial.json").write_text(json.dumps({"vectors": [{"name": "no-frame", "verdict": "accept"}]}))
    report = await run_conformance(Target(gateway.url, vectors=directory), only=["vector*"])
    outcomes = report.by_name()
    assert {name for name, o in outcomes.items() if o.status is Status.FAIL} == {
        "vector:wrong/valid-ping-called-invalid",
        "vector:wrong/wrong-path",
        "vector:wrong/invalid-called-valid",
        "vectors:broken.json",
        "vector:partial/0",
    }
    assert "payload.channels[9]" in outcomes["vector:wrong/wrong-path"].reason
    assert "an accept vector was refused" in outcomes["vector:wrong/invalid-called-valid"].reason


@given(st.lists(st.sampled_from(list(Status)), max_size=30))
def test_the_summary_line_counts_every_outcome(statuses):
    report = Report("ws://x/ws", tuple(Outcome(f"s{i}", status, "why") for i, status in enumerate(statuses)))
    match = SUMMARY.match(report.summary())
    assert match is not None
    assert [int(n) for n in match.groups()] == [statuses.count(s) for s in (Status.PASS, Status.FAIL, Status.SKIP)]
    assert report.ok == (Status.FAIL not in statuses)
    assert all(line.startswith(("PASS s", "FAIL s", "SKIP s")) for line in map(Outcome.line, report.outcomes))


vector_entries = st.lists(
    st.fixed_dictionaries(
        {"name": st.text(min_size=1, max_size=20), "frame": st.text(max_size=50), "verdict": st.sampled_from(["accept", "reject"])},
        optional={"code": st.sampled_from(["INVALID_JSON", "INVALID_PAYLOAD"]), "path": st.text(max_size=10)},
    ),
    max_size=10,
)


@settings(max_examples=50)
@given(vector_entries)
def test_vector_files_load_every_entry_under_a_unique_name(entries):
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "some.json").write_text(json.dumps({"description": "generated", "vectors": entries}))
        vectors, problems = load_vectors(Path(tmp))
    assert problems == []
    assert [(v.frame, v.verdict, v.code, v.path) for v in vectors] == [
        (e["frame"], e["verdict"], e.get("code"), e.get("path")) for e in entries
    ]
    assert len({v.name for v in vectors}) == len(vectors)


def test_missing_vectors_are_a_skip_not_a_pass(tmp_path):
    (scenario,) = plan(Target("ws://127.0.0.1:1/ws", vectors=tmp_path / "none"), only=["vector*"])
    assert scenario.name == "vectors"
    assert default_vectors_dir() == ROOT / "spec" / "vectors"


# -- the command ---------------------------------------------------------------------------------------


def parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    conformance_cli.configure(parser)
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_reports_an_unreachable_server_as_failed(capsys):
    url = f"ws://127.0.0.1:{free_port()}/ws"
    assert conformance_cli.run(parse_cli(url, "--only", "welcome", "--only", "ping-pong", "--timeout", "2")) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL welcome: cannot open a WebSocket")
    assert lines[-1] == "0 passed, 2 failed, 0 skipped"
    assert conformance_cli.run(parse_cli(url, "--only", "welcome", "--json")) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == {"passed": 0, "failed": 1, "skipped": 0}
    assert report["scenarios"][0]["status"] == "FAIL"
    assert conformance_cli.run(parse_cli(url, "--only", "no-such-scenario")) == 2


@pytest.fixture
def served() -> Iterator[str]:
    """`kaldrix serve` in a subprocess (through its own module): its WebSocket URL."""
    code = (
        "import argparse, sys\n"
        "from kaldrix.cli import serve\n"
        "parser = argparse.ArgumentParser()\n"
        "serve.configure(parser)\n"
        "sys.exit(serve.run(parser.parse_args(sys.argv[1:])))\n"
    )
    with ServerProcess([sys.executable, "-c", code]) as url:
        yield url


class ServerProcess:
    """Run a server command, read its URL from the 'listening on' log line, stop it after."""

    def __init__(self, command: list[str]) -> None:
        self.command = [*command, "--port", "0", "--no-simulate", "--allow-anonymous-publish"]

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                if not found and (match := LISTENING.search(line)):
                    found.append(match[1])
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(15)
        if not found:
            self.__exit__()
            pytest.fail(f"the server did not log 'listening on': {self.command}")
        return found[0]

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_cli_passes_a_served_gateway(served, good_vectors, capsys):
    only = ["welcome", "ping-pong", "ordering-and-offsets", "recovery-with-since", "error:INVALID_CHANNEL", "vector*"]
    args = parse_cli(served, "--vectors", str(good_vectors), *[f"--only={p}" for p in only])
    assert conformance_cli.run(args) == 0, capsys.readouterr().out
    lines = capsys.readouterr().out.splitlines()
    assert "PASS ordering-and-offsets" in lines
    assert lines[-1] == f"{len(only) - 1 + len(GOOD_VECTORS)} passed, 0 failed, 0 skipped"


def kaldrix_command_works() -> bool:
    done = subprocess.run([sys.executable, "-m", "kaldrix", "--help"], cwd=ROOT, capture_output=True, timeout=60)
    return done.returncode == 0


def test_python_m_kaldrix_conformance_against_python_m_kaldrix_serve(good_vectors):
    if not kaldrix_command_works():
        pytest.skip("`python -m kaldrix --help` fails: not every subcommand exists yet")
    with ServerProcess([sys.executable, "-m", "kaldrix", "serve"]) as url:
        done = subprocess.run(
            [sys.executable, "-m", "kaldrix", "conformance", url, "--vectors", str(good_vectors)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    match = SUMMARY.match(lines[-1])
    assert match and int(match[1]) > 0 and match[2] == "0", lines[-1]
    assert all(line.startswith(("PASS ", "SKIP ")) for line in lines[:-1]), done.stdout
