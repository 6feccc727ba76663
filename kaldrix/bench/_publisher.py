"""The benchmark's producer: one connection publishing events at a steady rate through PUBLISH.

Events go through the server's real publish path (validation, offsets, history, dedup,
fan-out). Each is a NEW_BLOCK of about 400 bytes once the server has wrapped it in its
envelope (id, timestamp, channel, offset, epoch), close to the ~330-byte events of the
figures in the project's performance issue.
"""

from __future__ import annotations

import itertools
from typing import Any

import trio

from ._dialect import Dialect
from ._session import read_until
from ._ws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, client_frame, open_websocket, split_frames

TICK = 0.005
"""Seconds between sends; the events due in a tick go out in one write."""


def block_event(height: int) -> dict[str, Any]:
    return {
        "type": "NEW_BLOCK",
        "payload": {
            "blockId": f"blk-{height:010d}",
            "height": height,
            "timestamp": "2025-08-07T10:00:00.000000Z",
            "hash": f"0x{height:064x}",
            "validator": "validator-07",
        },
    }


class Publisher:
    """Publishes `rate` events per second to one channel and counts the acknowledgements."""

    def __init__(self, host: str, port: int, dialect: Dialect, channel: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.host = host
        self.port = port
        self.dialect = dialect
        self.channel = channel
        self.headers = headers
        self.sent = 0
        self.acked = 0
        self.last_offset = 0
        self._stream: trio.SocketStream | None = None
        self._rest = b""
        self._heights = itertools.count(1)
        self._all_acked = trio.Event()
        self._send_lock = trio.StrictFIFOLock()

    async def _send(self, data: bytes) -> None:
        assert self._stream is not None
        async with self._send_lock:
            await self._stream.send_all(data)

    async def connect(self) -> None:
        stream, rest = await open_websocket(self.host, self.port, self.dialect.path, self.headers)
        _, self._rest = await read_until(stream, rest, self.dialect, lambda m: True if self.dialect.is_open(m) else None)
        self._stream = stream

    async def read_acks(self) -> None:
        """Read acknowledgements until the connection closes (run it in a nursery)."""
        assert self._stream is not None
        stream = self._stream
        rest = self._rest
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            frames, rest = split_frames(rest + chunk)
            for opcode, payload in frames:
                if opcode == OP_PING:
                    await self._send(client_frame(payload, OP_PONG))
                elif opcode == OP_CLOSE:
                    return
                elif opcode == OP_TEXT:
                    reply = self.dialect.ping_reply(payload)
                    if reply is not None:
                        await self._send(client_frame(reply))
                        continue
                    offsets = self.dialect.published(self.dialect.decode(payload), self.channel)
                    if offsets:
                        self.acked += len(offsets)
                        self.last_offset = max(self.last_offset, *offsets)
                        if self.acked >= self.sent:
                            self._all_acked.set()

    async def publish(self, rate: float, duration: float) -> None:
        """Publish at `rate` events/s for `duration` seconds, paced on trio's clock."""
        assert self._stream is not None
        self._all_acked = trio.Event()
        started = trio.current_time()
        sent_here = 0
        while True:
            elapsed = trio.current_time() - started
            if elapsed >= duration:
                break
            due = int(elapsed * rate) + 1 - sent_here
            # At most one second of events unacknowledged: a server that cannot keep up
            # makes the publisher wait instead of piling megabytes up in the socket (where
            # the answer to the server's ping would queue behind them).
            due = min(due, max(100, int(rate)) - (self.sent - self.acked))
            if due > 0:
                frames = []
                for _ in range(due):
                    frame, _ = self.dialect.publish([block_event(next(self._heights))], self.channel)
                    frames.append(client_frame(frame))
                self.sent += due
                sent_here += due
                await self._send(b"".join(frames))
            await trio.sleep(TICK)

    async def wait_acked(self, grace: float) -> bool:
        """Wait up to `grace` seconds until every event sent is acknowledged."""
        if self.acked >= self.sent:
            return True
        with trio.move_on_after(grace):
            await self._all_acked.wait()
            return True
        return False

    async def aclose(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
