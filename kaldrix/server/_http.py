"""Telling a WebSocket upgrade from a plain HTTP request on one port, and answering the latter.

trio-websocket answers a plain GET with 400 before any handler could run, so every
connection starts here: the request head is read and parsed with h11, upgrades go on
to trio-websocket with the bytes replayed, everything else gets an ops response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import orjson
import trio

MAX_HEAD_BYTES = 16 * 1024


@attrs.frozen
class RequestHead:
    """The parts of a request's head the gateway looks at."""

    method: str
    target: str
    headers: dict[str, str]
    raw: bytes
    """Every byte read so far, replayed to trio-websocket on an upgrade."""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    @property
    def is_websocket_upgrade(self) -> bool:
        upgrade = self.headers.get("upgrade", "").lower()
        connection = self.headers.get("connection", "").lower()
        return upgrade == "websocket" and "upgrade" in connection


class BadRequest(Exception):
    """The peer did not send an HTTP/1.1 request head we can read."""


async def read_head(stream: trio.abc.ReceiveStream) -> RequestHead | None:
    """Read up to the end of the request head; None when the peer closed first."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadRequest("request head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buffer += chunk
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(bytes(buffer))
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(event, h11.Request):
        raise BadRequest("incomplete request head")
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return RequestHead(
        method=event.method.decode("ascii"),
        target=event.target.decode("latin-1"),
        headers=headers,
        raw=bytes(buffer),
    )


@attrs.frozen
class Response:
    """A complete, small HTTP response; the connection closes after it."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, data: object, **kwargs: object) -> Response:
        return cls(status, orjson.dumps(data) + b"\n", **kwargs)  # type: ignore[arg-type]

    def encode(self, *, head_only: bool = False) -> bytes:
        writer = h11.Connection(h11.SERVER)
        # h11 needs to have seen a request before it will write a response.
        writer.receive_data(b"GET / HTTP/1.1\r\nHost: kaldrix\r\n\r\n")
        writer.next_event()
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
            *self.headers,
        ]
        out = writer.send(h11.Response(status_code=self.status, headers=headers)) or b""
        if not head_only:
            out += writer.send(h11.Data(data=self.body)) or b""
        return out


Route = Callable[[RequestHead], Awaitable[Response]]


async def respond(stream: trio.abc.Stream, response: Response, *, head_only: bool = False) -> None:
    """Write `response` and close the stream."""
    try:
        await stream.send_all(response.encode(head_only=head_only))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


class ReplayStream(trio.abc.Stream):
    """A stream that first returns bytes already read from `stream`, then reads on.

    It lets trio-websocket parse a handshake the gateway has already peeked at.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
