"""`python -m kaldrix serve` as a user runs it: a real process, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/ws")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALDRIX_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def _start_serve(*flags: str) -> tuple[trio.Process, int, list[bytes]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "kaldrix", "serve", "--port", "0", *flags],
        stderr=subprocess.PIPE,
        env=_env(),
    )
    output: list[bytes] = []
    with trio.fail_after(15):
        buffer = b""
        while not (match := LISTENING.search(buffer.decode(errors="replace"))):
            chunk = await process.stderr.receive_some(4096)
            assert chunk, f"serve exited early: {buffer.decode(errors='replace')}"
            buffer += chunk
    output.append(buffer)
    return process, int(match.group(1)), output


async def _drain(process: trio.Process, output: list[bytes]) -> None:
    while chunk := await process.stderr.receive_some(4096):
        output.append(chunk)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_with_1001_and_exits_0(signum):
    process, port, output = await _start_serve("--no-simulate")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, process, output)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
            welcome = orjson.loads(await ws.get_message())
            assert welcome["type"] == "WELCOME"
            process.send_signal(signum)
            with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1001
        with trio.fail_after(10):
            assert await process.wait() == 0
    log = b"".join(output).decode()
    assert "Traceback" not in log
    assert "closing every client with 1001" in log


async def test_healthz_and_readyz_answer_plain_http_on_the_same_port():
    process, port, _ = await _start_serve("--no-simulate")
    try:
        for path, status in (("/healthz", b"200"), ("/readyz", b"200"), ("/nope", b"404")):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(4096):
                    response += chunk
            assert response.split(b" ")[1] == status, response
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()


def test_port_in_use_is_a_clear_error_not_a_traceback():
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "kaldrix", "serve", "--port", str(port), "--no-simulate"],
            capture_output=True, text=True, env=_env(), timeout=30,
        )
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_names_it(tmp_path):
    config = tmp_path / "kaldrix.toml"
    config.write_text('port = 3000\nhistory_size = 0\n')
    result = subprocess.run(
        [sys.executable, "-m", "kaldrix", "serve", "--config", str(config)],
        capture_output=True, text=True, env=_env(), timeout=30,
    )
    assert result.returncode == 2
    assert "history_size" in result.stderr


def test_environment_settings_are_read():
    env = _env() | {"KALDRIX_PORT": "not-a-port"}
    result = subprocess.run(
        [sys.executable, "-m", "kaldrix", "serve"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 2
    assert "KALDRIX_PORT" in result.stderr


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "kaldrix", "--help"], capture_output=True, text=True, env=_env(), timeout=30)
    assert result.returncode == 0
    for command in ("serve", "listen", "publish", "token", "schema", "conformance"):
        assert command in result.stdout
