"""Pre-framed writes beneath trio-websocket's public API, confined to this module.

Server-to-client frames are unmasked and we negotiate no extension, so one encoded
frame serves every subscriber of a channel. Writing it with ``send_message`` would
re-frame it per subscriber (wsproto) and cost a task switch each time; instead the
writer puts frames straight on the connection's stream, under the same lock
trio-websocket uses for its own writes (pongs, close), so frames never interleave.

This relies on two private attributes of ``trio_websocket.WebSocketConnection``:
``_stream`` and ``_stream_lock``. The dependency is pinned (``trio-websocket>=0.12.2,<0.13``)
and ``check_compatible`` fails loudly at start if they ever disappear.
"""

from __future__ import annotations

import struct

import trio
from trio_websocket import WebSocketConnection

_TEXT_FIN = 0x81


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked WebSocket text frame carrying `payload` (RFC 6455 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((_TEXT_FIN, length)) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, 126, length) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, length) + payload


def check_compatible(ws: WebSocketConnection) -> None:
    """Fail loudly if trio-websocket no longer has what the raw write path needs."""
    stream = getattr(ws, "_stream", None)
    lock = getattr(ws, "_stream_lock", None)
    if not isinstance(stream, trio.abc.SendStream) or not isinstance(lock, trio.StrictFIFOLock):
        raise RuntimeError(
            "trio-websocket internals changed (_stream/_stream_lock): "
            "kaldrix.server._wire needs updating for this trio-websocket version"
        )


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
