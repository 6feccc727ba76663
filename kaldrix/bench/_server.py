"""The server under test when the harness starts its own: a `kaldrix serve` subprocess.

It runs with the simulator off and anonymous publishing on, logs at warning level (a
log line per connection would be measured too), optionally pinned to one core with
`taskset` so that server and load generator do not share a CPU. Its memory and CPU
time are read from /proc/<pid>.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def process_rss_bytes(pid: int) -> int:
    """VmRSS of a process, or 0 where /proc cannot tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, or 0.0 where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


async def scraped_rss_bytes(host: str, port: int, token: str | None = None) -> int:
    """A running kaldrix's RSS from its `/metrics` (process_resident_memory_bytes); 0 if unknown."""
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return 0
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    return 0


def wait_ready(process: subprocess.Popen[bytes], host: str, port: int, limit: float = 30.0) -> None:
    """Block until `kaldrix serve` (the child `process`) answers GET /readyz with 200: it
    listens and, with a shared broker, reaches it. RuntimeError if it exits or takes longer."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kaldrix serve exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: bench\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"kaldrix serve on {host}:{port} was not ready within {limit:g}s")


class ServerProcess:
    """A `kaldrix serve` child process; use `start()` then `stop()`."""

    def __init__(self, *, cpu: int | None = None, extra_args: tuple[str, ...] = (), host: str = "127.0.0.1") -> None:
        self.cpu = cpu
        self.extra_args = extra_args
        self.host = host
        self.port = free_port(host)
        self.process: trio.Process | None = None
        self.pinned = False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        command = [
            sys.executable, "-m", "kaldrix", "serve",
            "--host", self.host, "--port", str(self.port),
            "--no-simulate", "--allow-anonymous-publish", "--log-level", "warning",
            # every benchmark client comes from one address: per-address limits would refuse them
            "--handshake-rate-limit", "0", "--max-connections-per-ip", "0",
            *self.extra_args,
        ]  # fmt: skip
        if self.cpu is not None and shutil.which("taskset"):
            self.pinned = True
            command = ["taskset", "-c", str(self.cpu), *command]
        return command

    async def start(self, startup_limit: float = 20.0) -> None:
        self.process = await trio.lowlevel.open_process(self.command(), stdin=subprocess.DEVNULL)
        with trio.fail_after(startup_limit):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"kaldrix serve exited with {self.process.returncode} before listening")
                try:
                    stream = await trio.open_tcp_stream(self.host, self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                reply = await stream.receive_some(64)
                await stream.aclose()
                if reply.startswith(b"HTTP/1.1 200"):
                    return
                await trio.sleep(0.05)

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    async def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.process.wait()
            return
        self.process.kill()
        await self.process.wait()
