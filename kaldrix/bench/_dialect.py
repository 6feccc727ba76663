"""How the load generator speaks to a server: kaldrix's protocol, or Socket.IO for a peer.

Every server benchmarked delivers the same envelope (type, payload, timestamp, channel,
offset, ...), so the client's measurements are the same whatever carries the frames; a
dialect only knows where to connect, how to subscribe and publish, and how to find the
envelope inside a frame.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson

__all__ = ["DIALECTS", "Dialect", "KaldrixDialect", "SocketIODialect"]


class Dialect:
    """The kaldrix wire protocol (also what the plain-WebSocket reference server speaks)."""

    name = "kaldrix"
    path = "/ws"

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def opening(self, payload: bytes) -> bytes | None:
        """A reply to one frame of the opening exchange, or None."""
        return None

    def is_open(self, message: Any) -> bool:
        """Whether `message` (a decoded frame) says the session is ready for SUBSCRIBE."""
        return isinstance(message, dict) and message.get("type") == "WELCOME"

    def subscribe(self, channel: str) -> tuple[bytes, str]:
        ref = f"s{next(self._ids)}"
        return orjson.dumps({"type": "SUBSCRIBE", "id": ref, "payload": {"channels": [channel]}}), ref

    def subscribed(self, message: Any, ref: str, channel: str) -> int | None:
        """The channel's offset at subscription when `message` acknowledges `ref`, else None."""
        if not isinstance(message, dict) or message.get("type") != "ACK":
            return None
        payload = message.get("payload") or {}
        if payload.get("ref") != ref:
            return None
        return int(payload["channels"][channel]["offset"])

    def publish(self, events: list[dict[str, Any]], channel: str) -> tuple[bytes, str]:
        ref = f"p{next(self._ids)}"
        body: dict[str, Any] = {"event": events[0]} if len(events) == 1 else {"events": events}
        body["channel"] = channel
        return orjson.dumps({"type": "PUBLISH", "id": ref, "payload": body}), ref

    def published(self, message: Any, channel: str) -> list[int] | None:
        """The offsets a publish acknowledgement reports, or None for other frames."""
        if not isinstance(message, dict) or message.get("type") != "ACK":
            return None
        results = (message.get("payload") or {}).get("results")
        if results is None:
            return None
        return [int(result["offsets"][channel]) for result in results]

    def decode(self, payload: bytes) -> Any:
        """A frame's message."""
        return orjson.loads(payload)

    def ping_reply(self, payload: bytes) -> bytes | None:
        """A text-level keepalive answer (Engine.IO's), or None."""
        return None


class SocketIODialect(Dialect):
    """Socket.IO 4 over a bare WebSocket (Engine.IO 4): `42["event", {...}]` frames."""

    name = "socketio"
    path = "/socket.io/?EIO=4&transport=websocket"

    def opening(self, payload: bytes) -> bytes | None:
        if payload[:1] == b"0":  # Engine.IO open: join the default namespace
            return b"40"
        return None

    def is_open(self, message: Any) -> bool:
        return message == ("connect", None)

    def subscribe(self, channel: str) -> tuple[bytes, str]:
        ref = f"s{next(self._ids)}"
        return b"42" + orjson.dumps(["subscribe", {"id": ref, "channels": [channel]}]), ref

    def subscribed(self, message: Any, ref: str, channel: str) -> int | None:
        if isinstance(message, list) and message and message[0] == "ack" and message[1].get("ref") == ref:
            return int(message[1]["channels"][channel]["offset"])
        return None

    def publish(self, events: list[dict[str, Any]], channel: str) -> tuple[bytes, str]:
        ref = f"p{next(self._ids)}"
        return b"42" + orjson.dumps(["publish", {"id": ref, "channel": channel, "events": events}]), ref

    def published(self, message: Any, channel: str) -> list[int] | None:
        if isinstance(message, list) and message and message[0] == "ack" and "results" in message[1]:
            return [int(result["offsets"][channel]) for result in message[1]["results"]]
        return None

    def decode(self, payload: bytes) -> Any:
        if payload[:2] == b"42":
            message = orjson.loads(payload[2:])
            if message and message[0] == "event":
                return message[1]
            return message
        if payload[:2] == b"40":
            return ("connect", None)
        return ("engineio", payload)

    def ping_reply(self, payload: bytes) -> bytes | None:
        return b"3" if payload == b"2" else None


DIALECTS: dict[str, type[Dialect]] = {"kaldrix": Dialect, "socketio": SocketIODialect}
KaldrixDialect = Dialect
