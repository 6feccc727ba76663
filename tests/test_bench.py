"""kaldrix bench: the harness end to end on a tiny scenario, and its client-side accounting.

Counts only: nothing here asserts a speed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from kaldrix.bench import load_scenario
from kaldrix.bench._session import Session
from kaldrix.bench._worker import Worker, WorkerSpec
from kaldrix.server._wire import text_frame

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALDRIX_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_tiny_scenario_against_a_server_it_starts(tmp_path: Path) -> None:
    hgrm = tmp_path / "latency.hgrm"
    saved = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "kaldrix", "bench",
        "--clients", "5", "--duration", "2", "--message-rate", "50",
        "--output", "json", "--log-level", "warning", "--no-pin",
        "--hgrm", str(hgrm), "--save", str(saved),
    ]  # fmt: skip
    plot = None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        plot = tmp_path / "latency.png"
        command += ["--plot", str(plot)]
    done = subprocess.run(command, capture_output=True, env=_env(), timeout=90, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = orjson.loads(done.stdout)
    assert result == orjson.loads(saved.read_bytes())
    assert result["connections"]["active"] == 5
    assert result["connections"]["total"] == 5
    assert result["connections"]["failed"] == 0
    assert result["lost"] == 0
    assert result["duplicates"] == 0
    assert result["unacknowledgedPublishes"] == 0
    published = round(result["throughput"]["eventsPerSecond"] * 2)
    assert 90 <= published <= 110
    delivery = result["eventDelivery"]
    assert delivery["count"] == 5 * published
    assert delivery["min"] <= delivery["p50"] <= delivery["p99"] <= delivery["p999"] <= delivery["max"]
    assert result["resources"]["serverRssBytes"] > 0
    assert result["verdict"].split(":")[0] in {"Excellent", "Good", "Acceptable", "Poor"}
    lines = hgrm.read_text().splitlines()
    assert lines[0].split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    assert any(line.startswith("#[Max") for line in lines)
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _event(offset: int, channel: str = "blocks") -> bytes:
    envelope = {
        "type": "NEW_BLOCK",
        "payload": {"height": offset},
        "timestamp": "2025-08-07T10:00:00.000000Z",
        "id": f"e{offset}",
        "version": "1.0.0",
        "channel": channel,
        "offset": offset,
        "epoch": "ep",
    }
    return text_frame(orjson.dumps(envelope))


async def test_worker_counts_losses_duplicates_and_split_frames() -> None:
    left, right = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    worker = Worker(WorkerSpec(index=0, host="127.0.0.1", port=0, channel="blocks", clients=1))
    from kaldrix.bench._worker import _Client

    client = _Client(Session(stream, b"", start_offset=10, connect_seconds=0.001))
    worker.clients[client.fd] = client
    wire = b"".join(_event(n) for n in (11, 12, 12, 15, 14, 16))
    now = 1754560800.0 + 0.004  # 4 ms after the events' timestamp
    # Delivered in awkward pieces: frame headers and bodies split across reads.
    for start in range(0, len(wire), 7):
        worker._consume(client, wire[start : start + 7], now)
    assert client.deliveries == 6
    assert client.last == 16
    assert client.duplicates == 2  # 12 again, and 14 after 15
    assert client.lost == 2  # 13 and 14 were skipped when 15 came (14 then counts as a duplicate)
    assert worker.latency.count == 6
    assert worker.latency.summary()["p50"] == pytest.approx(4.0, rel=1e-2)
    # Events the client never saw before the final offset count as lost too.
    assert worker.result(final_offset=18)["lost"] == 4
    right.close()
    await stream.aclose()


def test_scenario_files_load(tmp_path: Path) -> None:
    for path in sorted((ROOT / "bench" / "scenarios").glob("*.toml")):
        values = load_scenario(path)
        assert values["clients"] >= 1, path
    bad = tmp_path / "bad.toml"
    bad.write_text("clients = 5\nspeed = 'fast'\n")
    with pytest.raises(ValueError, match="speed"):
        load_scenario(bad)


def _measured(latency_s: float, deliveries: int, lost: int = 0) -> dict:
    from kaldrix.metrics import LatencyRecorder

    recorder = LatencyRecorder()
    recorder.record(latency_s, deliveries)
    reply = {
        "latency": recorder.histogram().encode(),
        "latencySumUs": recorder.sum_us,
        "lost": lost,
        "duplicates": 0,
        "disconnected": 0,
        "connected": 100,
    }
    return {
        "rate": 10.0,
        "replies": [reply],
        "published": 50,
        "publishedFor": 5.0,
        "deliveries": deliveries,
        "serverCpu": None,
        "generatorCpu": 0.1,
    }


def test_stress_steps_are_judged_on_p99_losses_and_keeping_up() -> None:
    from kaldrix.bench._harness import _step

    step, _ = _step(_measured(0.010, 5000), clients=100, clean_p99_ms=50.0)
    assert step["deliveriesPerSecond"] == 1000.0  # 10 events/s x 100 subscribers
    assert step["acceptedEventsPerSecond"] == 10.0
    assert step["clean"] and step["keptUp"]
    saturated, _ = _step(_measured(0.010, 3000), clients=100, clean_p99_ms=50.0)
    assert saturated["clean"] and not saturated["keptUp"]  # in time, but behind the publisher
    slow, _ = _step(_measured(0.080, 5000), clients=100, clean_p99_ms=50.0)
    assert not slow["clean"]
    lossy, _ = _step(_measured(0.010, 5000, lost=1), clients=100, clean_p99_ms=50.0)
    assert not lossy["clean"]


def _ready_node(env: dict[str, str]) -> tuple[int, subprocess.Popen[bytes]]:
    """A `kaldrix serve` as the harness starts its own, once /readyz says its broker is up."""
    from kaldrix.bench._server import ServerProcess, wait_ready

    node = ServerProcess()
    process = subprocess.Popen(node.command(), env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(process, "127.0.0.1", node.port)
    except RuntimeError:
        process.kill()
        raise
    return node.port, process


def test_publishing_through_another_node_measures_cross_node_delivery(redis_server: Any) -> None:
    """--publish-url: events published on node A reach the clients on node B, every one."""
    env = {**_env(), "KALDRIX_BROKER": redis_server.url, "KALDRIX_REDIS_PREFIX": "bench-cross"}
    nodes = []
    try:
        a_port, a = _ready_node(env)
        nodes.append(a)
        b_port, b = _ready_node(env)
        nodes.append(b)
        command = [
            sys.executable, "-m", "kaldrix", "bench",
            "--clients", "5", "--duration", "2", "--message-rate", "50",
            "--output", "json", "--log-level", "warning", "--no-pin",
            "--url", f"ws://127.0.0.1:{b_port}/ws", "--server-pid", str(b.pid),
            "--publish-url", f"ws://127.0.0.1:{a_port}/ws", "--watch-pid", f"node-a={a.pid}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, env=_env(), timeout=90, check=False)
    finally:
        for node in nodes:
            node.terminate()
            node.wait(10)
    assert done.returncode == 0, done.stderr.decode()
    result = orjson.loads(done.stdout)
    assert result["server"] == f"ws://127.0.0.1:{b_port}/ws"
    published = round(result["throughput"]["eventsPerSecond"] * 2)
    assert 90 <= published <= 110
    assert result["eventDelivery"]["count"] == 5 * published
    assert result["lost"] == 0
    assert result["duplicates"] == 0
    assert set(result["resources"]["watchedCpu"]) == {"node-a"}
    assert result["resources"]["watchedCpu"]["node-a"] > 0  # node A did the publishing


def test_watch_pid_needs_name_and_pid() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kaldrix", "bench", "--url", "ws://127.0.0.1:1/ws", "--watch-pid", "redis"],
        capture_output=True, env=_env(), timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert b"expected NAME=PID" in done.stderr
