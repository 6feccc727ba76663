"""The load generator's WebSocket: just enough RFC 6455 for a benchmark client.

A benchmark client must cost far less than the server it measures, so there is no
wsproto here: the opening handshake is written by hand, client frames are masked with a
plain integer XOR, and server frames (never masked, never fragmented by the servers we
measure) are cut out of the byte stream with a few slices.
"""

from __future__ import annotations

import base64
import os
import struct

import trio

MAX_HEAD = 16 * 1024

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class HandshakeError(Exception):
    """The server did not switch protocols."""


def handshake_request(host: str, port: int, target: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
        "",
        "",
    ]
    return "\r\n".join(lines).encode()


async def open_websocket(
    host: str, port: int, target: str, headers: tuple[tuple[str, str], ...] = ()
) -> tuple[trio.SocketStream, bytes]:
    """Connect and upgrade; returns the stream and whatever bytes followed the 101 head."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(handshake_request(host, port, target, headers))
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD:
                raise HandshakeError("response head too large")
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise HandshakeError("closed during the handshake")
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise HandshakeError(status.decode(errors="replace"))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, rest


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked frame (clients must mask, RFC 6455 5.3)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    if not length:
        return head + mask
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(length, "little")
    return head + mask + masked


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete server frames at the start of `data` as (opcode, payload), and the rest."""
    frames = []
    pos = 0
    end = len(data)
    while end - pos >= 2:
        opcode = data[pos] & 0x0F
        length = data[pos + 1] & 0x7F
        start = pos + 2
        if length == 126:
            if end - pos < 4:
                break
            length = (data[pos + 2] << 8) | data[pos + 3]
            start = pos + 4
        elif length == 127:
            if end - pos < 10:
                break
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            start = pos + 10
        stop = start + length
        if stop > end:
            break
        frames.append((opcode, data[start:stop]))
        pos = stop
    return frames, data[pos:]
