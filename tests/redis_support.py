"""A real redis-server for tests, started on a free port in a temporary directory.

No persistence (``--save "" --appendonly no``), so killing it loses everything, as a
Redis restart without persistence does in production. A test can kill it with SIGKILL
and start it again on the same port.

Without the binary the tests that need it are skipped with the reason; in CI
(``CI=true``) they fail instead, so a CI image without Redis cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


def redis_binary() -> str:
    """The redis-server to run; skips (or fails in CI) when there is none."""
    path = os.environ.get("KALDRIX_REDIS_SERVER") or shutil.which("redis-server")
    if path:
        return path
    reason = "redis-server is not installed (apt-get install redis-server)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the Redis tests, not skip them")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server process that can be killed and started again on its port."""

    def __init__(self, binary: str, directory: Path, port: int | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running, "already running"
        with open(self.directory / "redis.log", "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.directory),
                    "--loglevel", "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; everything in it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=START_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (after `kill`)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def command(self, *args: str | int) -> str | int | list[object] | None:
        """Run one command on a fresh connection and return its (simply parsed) reply."""
        parts = [str(arg).encode() for arg in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            sock.sendall(request)
            reader = sock.makefile("rb")
            return _read_reply(reader)


def _read_reply(reader: object) -> str | int | list[object] | None:
    line = reader.readline()  # type: ignore[attr-defined]
    if not line:
        raise ConnectionError("Redis closed the connection")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RuntimeError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = reader.read(size + 2)  # type: ignore[attr-defined]
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected reply {line!r}")


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started RedisServer, stopped at the end whatever happened."""
    server = RedisServer(redis_binary(), directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
