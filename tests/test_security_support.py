"""Helpers shared by the security tests (this module holds no tests).

Clients connect from chosen loopback source addresses (Linux routes all of 127.0.0.0/8
to the loopback interface), so per-address limits, blocks and trusted proxies are
exercised with real, distinct socket peers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import h11
import orjson
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, wrap_client_stream

from kaldrix.server import Gateway
from tests.conftest import WireClient

SECRET = "kaldrix-security-test-secret-long-enough-for-hs256"
TIMEOUT = 5.0


async def tcp_from(gateway: Gateway, source: str) -> trio.SocketStream:
    """A TCP connection to the gateway whose peer address (as the gateway sees it) is `source`."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", gateway.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def ws_from(
    nursery: trio.Nursery,
    gateway: Gateway,
    source: str = "127.0.0.1",
    *,
    headers: dict[str, str] | None = None,
    resource: str = "/ws",
    welcome: bool = True,
) -> WireClient:
    """A WebSocket client connected from `source`; ConnectionRejected if the handshake is refused."""
    stream = await tcp_from(gateway, source)
    extra = [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    with trio.fail_after(TIMEOUT):
        ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{gateway.port}", resource, extra_headers=extra)
    client = WireClient(ws)
    if welcome:
        await client.expect("WELCOME")
    return client


async def http_from(
    gateway: Gateway,
    method: str,
    path: str,
    *,
    source: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request from `source`: (status, headers lower-cased, body)."""
    stream = await tcp_from(gateway, source)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None and not any(name.lower() in ("content-length", "transfer-encoding") for name in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    parser = h11.Connection(h11.CLIENT)
    # h11 reads a response only after it has seen its request go out.
    parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    parser.send(h11.EndOfMessage())
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(request)
            status, answer, data = 0, {}, b""
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    parser.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    answer = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, answer, data


async def closed_with(client: WireClient, timeout: float = TIMEOUT) -> tuple[int, str | None, list[dict[str, Any]]]:
    """Read until the server closes: (close code, reason, the messages received before)."""
    received = list(client.backlog)
    client.backlog.clear()
    with trio.fail_after(timeout):
        while True:
            try:
                received.append(orjson.loads(await client.ws.get_message()))
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return exc.reason.code, exc.reason.reason, received


async def still_serves(client: WireClient) -> None:
    """The connection answers a PING with its PONG."""
    message_id = await client.send("PING", {"t": "alive"})
    with trio.fail_after(TIMEOUT):
        while True:
            message = orjson.loads(await client.ws.get_message())
            if message["type"] == "PONG" and message["payload"].get("ref") == message_id:
                return
            client.backlog.append(message)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_token(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built by hand: what an attacker sends (`hmac_key` None: no signature at all)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}



def _rejection(group: BaseExceptionGroup) -> ConnectionRejected | None:
    matched, _ = group.split(ConnectionRejected)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched


async def connect_in(
    nursery: trio.Nursery, gateway: Gateway, source: str, headers: dict[str, str] | None = None
) -> WireClient:
    """Like ws_from, but a refused handshake raises ConnectionRejected here instead of
    failing `nursery` (trio-websocket reports it from its reader task)."""

    async def hold(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as own:
            task_status.started(await ws_from(own, gateway, source, headers=headers))

    try:
        return await nursery.start(hold)
    except BaseExceptionGroup as group:
        rejection = _rejection(group)
        if rejection is None:
            raise
        raise rejection from None


async def rejected(gateway: Gateway, source: str = "127.0.0.1", headers: dict[str, str] | None = None) -> ConnectionRejected:
    """The HTTP refusal of a WebSocket handshake from `source` (fails if it is accepted)."""
    async with trio.open_nursery() as own:
        try:
            await connect_in(own, gateway, source, headers)
        except ConnectionRejected as exc:
            return exc
        own.cancel_scope.cancel()
    raise AssertionError(f"the handshake from {source} was accepted")
