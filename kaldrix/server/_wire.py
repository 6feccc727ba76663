"""Pre-framed writes beneath trio-websocket's public API, confined to this module.

Server-to-client frames are unmasked and we negotiate no extension, so one encoded
frame serves every subscriber of a channel. Writing it with ``send_message`` would
re-frame it per subscriber (wsproto) and cost a task switch each time; instead frames
go straight on the connection's stream, two ways:

- ``DirectWriter.try_write``: when no write is in progress, a frame is written into the
  socket at once with one non-blocking system call, from whichever task produced it
  (the router's fan-out), with no task switch. Whatever the socket does not take is
  left to the writer task.
- ``WriteBatch``: while the router works through several inbox requests at once, event
  frames are held per connection and written with one system call at the end.
- ``send_frames``: the writer task's path for backlog, under the same lock
  trio-websocket uses for its own writes (pongs, close), so frames never interleave.

Pings go out the same way (``ping_frame``), their pongs are matched by trio-websocket's
reader through ``expect_pong``, and wsproto's leftover handshake state is dropped once the
connection is open (``shed_handshake``).

This relies on three private attributes of ``trio_websocket.WebSocketConnection``:
``_stream``, ``_stream_lock`` and ``_pings``, and on the stream being (a pass-through wrapper of)
a ``trio.SocketStream``. Every path that makes trio-websocket write a close frame first
sets what its public ``closed`` reports, which is what keeps direct writes from
following a close. The dependency is pinned (``trio-websocket>=0.12.2,<0.13``) and
``check_compatible`` fails loudly at start if any of it changes; tests/test_wire.py
checks the same against the installed version.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Any

import trio
from trio_websocket import WebSocketConnection

_TEXT_FIN = 0x81
_PING_FIN = 0x89


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked WebSocket text frame carrying `payload` (RFC 6455 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((_TEXT_FIN, length)) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, 126, length) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, length) + payload


def ping_frame(payload: bytes) -> bytes:
    """A server's WebSocket ping (unmasked) carrying `payload` (at most 125 bytes)."""
    return bytes((_PING_FIN, len(payload))) + payload


def expect_pong(ws: WebSocketConnection, payload: bytes, pong: trio.Event) -> None:
    """Have trio-websocket's reader set `pong` when the pong for `payload` arrives.

    This is what its own ``ping()`` does before it sends the ping and waits; here the ping
    goes out as a pre-framed write and nobody waits: the gateway's timer looks at `pong`
    when the deadline comes, so a ping costs no task.
    """
    ws._pings[payload] = pong


def check_compatible(ws: WebSocketConnection) -> None:
    """Fail loudly if trio-websocket no longer has what the raw write path needs."""
    stream = getattr(ws, "_stream", None)
    lock = getattr(ws, "_stream_lock", None)
    if (
        not isinstance(stream, trio.abc.SendStream)
        or not isinstance(lock, trio.StrictFIFOLock)
        or not hasattr(type(ws), "closed")
        or not isinstance(getattr(ws, "_pings", None), OrderedDict)
    ):
        raise RuntimeError(
            "trio-websocket internals changed (_stream/_stream_lock/closed/_pings): "
            "kaldrix.server._wire needs updating for this trio-websocket version"
        )


def shed_handshake(ws: WebSocketConnection) -> bool:
    """Drop what the opening handshake left behind once the WebSocket is open.

    wsproto keeps its HTTP/1.1 parser (an h11 connection with its buffers) and the
    upgrade request for the life of every connection, about 2 KB each, though nothing
    reads them after the handshake: a server's WebSocket events come from wsproto's
    `connection`, not its `handshake`. Optional: when wsproto no longer looks as
    expected, nothing is dropped (returns False).
    """
    wsproto = getattr(ws, "_wsproto", None)
    handshake = getattr(wsproto, "handshake", None)
    if getattr(wsproto, "connection", None) is None or not hasattr(handshake, "_h11_connection"):
        return False
    handshake._h11_connection = None
    if hasattr(handshake, "_initiating_request"):
        handshake._initiating_request = None
    return True


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket beneath pass-through wrappers; None if anything in between transforms
    the bytes (TLS) or there is no socket at all."""
    for _ in range(4):
        if isinstance(stream, trio.SocketStream):
            return stream.socket
        if isinstance(stream, trio.SSLStream):
            return None
        inner = getattr(stream, "transport_stream", None)
        if inner is None:
            return None
        stream = inner
    return None


class DirectWriter:
    """Writes a frame into the socket at once when nothing else is writing to it.

    Safe only while the caller has nothing queued for the writer task (the caller
    keeps that count): order on the wire is the order of `try_write` and queueing.
    """

    __slots__ = ("_fd_of", "_lock", "_ws")

    def __init__(self, ws: WebSocketConnection, *, enabled: bool = True) -> None:
        self._ws = ws
        self._lock: trio.StrictFIFOLock = ws._stream_lock
        sock = _socket_of(ws._stream) if enabled and os.name == "posix" else None
        if sock is not None and os.get_blocking(sock.fileno()):
            sock = None  # a blocking write would stall the whole server
        self._fd_of = sock.fileno if sock is not None else None

    @property
    def enabled(self) -> bool:
        return self._fd_of is not None

    def try_write(self, data: bytes) -> int:
        """How many bytes of `data` went into the socket now, without blocking.

        0 when a write is in progress (ours or trio-websocket's), the WebSocket is
        closing, the socket is full or broken: the caller queues the rest for the
        writer task, whose blocking write then waits or reports the error.
        """
        fd_of = self._fd_of
        if fd_of is None or self._lock.locked() or self._ws.closed is not None:
            return 0
        fd = fd_of()
        if fd < 0:  # closed: the number may already belong to another socket
            return 0
        try:
            return os.write(fd, data)
        except OSError:
            return 0


class WriteBatch:
    """Event frames offered while the router works through a batch of its inbox.

    A connection with nothing queued holds the event frames it is offered during the
    batch and writes them with one system call when the batch ends (`release`): under
    load, several events reach each subscriber per write instead of one. Outside a batch
    (or for control frames, which first release what is held) frames go out at once.
    """

    __slots__ = ("active", "pending")

    def __init__(self) -> None:
        self.active = False
        self.pending: list[Any] = []
        """Connections holding frames, in the order they started to."""

    def release(self) -> list[Any]:
        """End the batch: every holding connection writes; returns those that could not
        queue what the socket did not take (slow consumers)."""
        self.active = False
        pending, self.pending = self.pending, []
        return [conn for conn in pending if not conn.release()]


class WriteState:
    """Whether a write has started and not finished: after a cancelled partial write
    the stream holds half a frame, so the connection must be aborted, not closed."""

    __slots__ = ("mid_write",)

    def __init__(self) -> None:
        self.mid_write = False


async def send_frames(ws: WebSocketConnection, data: bytes, state: WriteState) -> None:
    """Write already-framed bytes to the peer, serialised with trio-websocket's writes."""
    async with ws._stream_lock:
        state.mid_write = True
        await ws._stream.send_all(data)
        state.mid_write = False


async def abort(ws: WebSocketConnection) -> None:
    """Close the TCP stream without a close handshake (after a half-written frame)."""
    await ws._stream.aclose()
