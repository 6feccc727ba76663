"""Opening one benchmark client: connect, upgrade, wait for the server's hello, subscribe.

This part runs on trio streams (it happens once per client); what follows, the
receiving of events, is the worker's lean epoll loop.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import trio

from ._dialect import Dialect
from ._ws import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, client_frame, open_websocket, split_frames


class SessionError(Exception):
    """The server refused or closed the client during its opening."""


@attrs.define
class Session:
    """An open, subscribed client, ready to be handed to the receive loop."""

    stream: trio.SocketStream
    rest: bytes
    """Bytes received after the subscription's acknowledgement (the start of the next frame)."""
    start_offset: int
    connect_seconds: float
    """TCP connect to the server's hello (WELCOME), as the seed's "connection time"."""


async def _frames(stream: trio.SocketStream, rest: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    frames, rest = split_frames(rest)
    while not frames:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise SessionError("server closed the connection")
        frames, rest = split_frames(rest + chunk)
    return frames, rest


async def read_until(stream: trio.SocketStream, rest: bytes, dialect: Dialect, want: Any) -> tuple[Any, bytes]:
    """Read frames until `want(message)` is not None; answer pings and the opening exchange."""
    while True:
        frames, rest = await _frames(stream, rest)
        for index, (opcode, payload) in enumerate(frames):
            if opcode == OP_PING:
                await stream.send_all(client_frame(payload, OP_PONG))
                continue
            if opcode == OP_CLOSE:
                raise SessionError(f"server closed: {payload[2:].decode(errors='replace')}")
            if opcode != OP_TEXT:
                continue
            reply = dialect.opening(payload) or dialect.ping_reply(payload)
            if reply is not None:
                await stream.send_all(client_frame(reply))
                continue
            found = want(dialect.decode(payload))
            if found is not None:
                # Frames after the one we wanted go back in front of the rest.
                leftover = b"".join(_reframe(op, data) for op, data in frames[index + 1 :])
                return found, leftover + rest


def _reframe(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")
    return head + payload


async def open_session(
    host: str, port: int, dialect: Dialect, channel: str, headers: tuple[tuple[str, str], ...] = ()
) -> Session:
    """One subscribed client; raises OSError, HandshakeError or SessionError on failure."""
    started = time.monotonic()
    stream, rest = await open_websocket(host, port, dialect.path, headers)
    try:
        _, rest = await read_until(stream, rest, dialect, lambda m: True if dialect.is_open(m) else None)
        connected = time.monotonic() - started
        frame, ref = dialect.subscribe(channel)
        await stream.send_all(client_frame(frame))
        offset, rest = await read_until(stream, rest, dialect, lambda m: dialect.subscribed(m, ref, channel))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return Session(stream, rest, offset, connected)
