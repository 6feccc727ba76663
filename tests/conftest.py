"""Shared fixtures: a real gateway on port 0 and a thin WebSocket test client.

Every integration test talks to a real server over real loopback sockets.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import trio
from hypothesis import settings
from trio_websocket import WebSocketConnection, connect_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from kaldrix.config import Config, load_config
from kaldrix.server import Gateway

# `pytest --hypothesis-profile=deep`: many more examples, e.g. for the security state machine.
settings.register_profile("deep", max_examples=1000)
# HYPOTHESIS_PROFILE=nightly: many more examples everywhere, the live-server state machine
# of tests/test_state_machine.py included.
settings.register_profile("nightly", max_examples=1000, deadline=None)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

TIMEOUT = 5.0


def make_config(**overrides: Any) -> Config:
    """Test defaults: free port, no simulator, anonymous publishing allowed."""
    values: dict[str, Any] = {"port": 0, "simulate": False, "allow_anonymous_publish": True}
    values.update(overrides)
    return load_config(environ={}, overrides=values)


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(nursery: trio.Nursery) -> StartGateway:
    """Start a gateway with the given config overrides inside the test's nursery."""

    async def start(**overrides: Any) -> Gateway:
        gateway = Gateway(make_config(**overrides))
        await nursery.start(gateway.run)
        return gateway

    return start


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real redis-server for the test module (tests keep apart with key prefixes)."""
    from .redis_support import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


class WireClient:
    """A protocol-level client for tests: sends raw commands, reads raw frames."""

    _ids = itertools.count(1)

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.backlog: list[dict[str, Any]] = []

    async def send(self, message_type: str, payload: dict[str, Any] | None = None, *, message_id: str | None = None) -> str:
        message_id = message_id or f"c{next(self._ids)}"
        frame = {"type": message_type, "payload": payload or {}, "id": message_id}
        await self.ws.send_message(orjson.dumps(frame).decode())
        return message_id

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        with trio.fail_after(timeout):
            return orjson.loads(await self.ws.get_message())

    async def expect(self, message_type: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        message = await self.receive(timeout)
        assert message["type"] == message_type, message
        return message

    async def request(self, message_type: str, payload: dict[str, Any] | None = None, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send a command and return its ACK/ERROR; other frames wait in `backlog`."""
        message_id = await self.send(message_type, payload)
        return await self.reply_to(message_id, timeout)

    async def reply_to(self, message_id: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                message = orjson.loads(await self.ws.get_message())
                if message["type"] in ("ACK", "ERROR") and message["payload"].get("ref") == message_id:
                    return message
                self.backlog.append(message)

    async def events(self, count: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """The next `count` events (frames that carry a channel)."""
        found = []
        with trio.fail_after(timeout):
            while len(found) < count:
                message = await self.receive(timeout)
                if "channel" in message:
                    found.append(message)
        return found

    async def subscribe(self, *channels: str, since: dict[str, Any] | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"channels": list(channels)}
        if since is not None:
            payload["since"] = since
        ack = await self.request("SUBSCRIBE", payload)
        assert ack["type"] == "ACK", ack
        return ack

    async def publish(self, *events: dict[str, Any], channel: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"event": events[0]} if len(events) == 1 else {"events": list(events)}
        if channel is not None:
            payload["channel"] = channel
        return await self.request("PUBLISH", payload)


Connect = Callable[..., Awaitable[WireClient]]


@pytest.fixture
async def connect(nursery: trio.Nursery, gateway: Gateway) -> Connect:
    """Open a WebSocket to the gateway and read its WELCOME."""

    async def open_client(url: str | None = None, *, headers: list[tuple[str, str]] | None = None, welcome: bool = True) -> WireClient:
        ws = await connect_websocket_url(nursery, url or gateway.url, extra_headers=headers or [])
        client = WireClient(ws)
        if welcome:
            await client.expect("WELCOME")
        return client

    return open_client


_counter = itertools.count(1)


def block_event(height: int | None = None, **extra: Any) -> dict[str, Any]:
    """A valid NEW_BLOCK as a producer sends it inside PUBLISH."""
    height = next(_counter) if height is None else height
    payload = {"blockId": f"b{height}", "height": height, "timestamp": "2025-08-07T10:00:00Z", "hash": f"0x{height:064x}"}
    payload.update(extra)
    return {"type": "NEW_BLOCK", "payload": payload}


def tx_event(tx_id: str, sender: str, receiver: str, amount: str = "1000") -> dict[str, Any]:
    return {
        "type": "TX_RECEIVED",
        "payload": {
            "txId": tx_id,
            "from": sender,
            "to": receiver,
            "amount": amount,
            "status": "pending",
            "timestamp": "2025-08-07T10:00:00Z",
        },
    }


async def raw_websocket(port: int) -> tuple[trio.SocketStream, WSConnection]:
    """A WebSocket handshake by hand: the peer then does only what the test makes it do
    (it answers no ping on its own)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws")))
    with trio.fail_after(5):
        while not any(isinstance(event, AcceptConnection) for event in ws.events()):
            ws.receive_data(await stream.receive_some(65536))
    return stream, ws


async def send_text(stream: trio.SocketStream, ws: WSConnection, message: dict[str, Any]) -> None:
    await stream.send_all(ws.send(TextMessage(orjson.dumps(message).decode())))
