"""One WebSocket connection of the client: commands out, their replies matched back.

A Session lives as long as its socket. Requests wait for the ACK or ERROR whose `ref`
is their id; PINGs wait for the PONG that echoes their `t`. When the socket goes,
every waiter wakes with ConnectionLost, so no call outlives its connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..protocol import (
    Ack,
    CommandType,
    Envelope,
    ErrorPayload,
    ReplyType,
    Welcome,
    converter,
    new_id,
    reply_type,
)
from ._errors import CommandError, ConnectionLost
from ._watchdog import Freshness

ApplyAck = Callable[[Ack], list[Any]]


@attrs.define(eq=False)
class _Waiter:
    apply: ApplyAck | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    reply: Envelope | None = None


class Session:
    """The client's side of one connection, from WELCOME to close."""

    def __init__(self, ws: WebSocketConnection, welcome: Welcome, *, stale_after: float | None = None) -> None:
        self.ws = ws
        self.welcome = welcome
        self.subscribed: set[str] = set()
        self.ready = trio.Event()
        self.freshness = Freshness(stale_after)
        """When each channel was last heard from on this connection (the staleness watchdog)."""
        self.resync_wanted = trio.Event()
        """Set when a HEARTBEAT showed a missed event: the watchdog should look now."""
        self.handing_off = False
        """True while the reader waits for the application to take an item."""
        self.lost = False
        self.refusal: str | None = None
        """The last ERROR that answered nothing we sent (it often explains a close)."""
        self.fatal: str | None = None
        """Set when the client must not reconnect after this session ends."""
        self._pending: dict[str, _Waiter] = {}
        self._pings: dict[str, _Waiter] = {}

    @property
    def session_id(self) -> str:
        return self.welcome.session_id

    async def send(self, message_type: str, payload: Any, *, message_id: str | None = None) -> str:
        """Send one command without waiting for its answer; returns its id."""
        if self.lost:
            raise ConnectionLost("the connection is closed")
        message_id = message_id or new_id()
        frame = {"type": str(message_type), "payload": converter.unstructure(payload), "id": message_id}
        try:
            await self.ws.send_message(orjson.dumps(frame).decode())
        except ConnectionClosed as exc:
            self.close()  # callers must now wait for the next connection, not retry this one
            raise ConnectionLost(f"the connection closed: {exc.reason}") from None
        return message_id

    async def request(self, message_type: str, payload: Any, apply: ApplyAck | None = None) -> Ack:
        """Send a command and return its ACK; `apply` runs on the ACK in the reading task,
        before any later frame is read (SUBSCRIBE needs its positions in order)."""
        message_id = new_id()
        waiter = self._pending[message_id] = _Waiter(apply)
        try:
            await self.send(message_type, payload, message_id=message_id)
            await waiter.done.wait()
        finally:
            self._pending.pop(message_id, None)
        if waiter.reply is None:
            raise ConnectionLost("the connection closed before the server answered")
        if isinstance(waiter.reply.payload, ErrorPayload):
            raise CommandError(waiter.reply.payload)
        return waiter.reply.payload

    async def ping(self) -> float:
        """Seconds for a PING to come back as PONG."""
        token = new_id()
        waiter = self._pings[token] = _Waiter()
        started = trio.current_time()
        try:
            await self.send(CommandType.PING, {"t": token})
            await waiter.done.wait()
        finally:
            self._pings.pop(token, None)
        if waiter.reply is None:
            raise ConnectionLost("the connection closed before the PONG")
        return trio.current_time() - started

    def resolve(self, message: Envelope) -> list[Any] | None:
        """Hand a reply to its waiter and return what must follow it into the stream;
        None when nothing here was waiting for it."""
        kind = reply_type(message.type)
        waiter = None
        if kind in (ReplyType.ACK, ReplyType.ERROR) and message.payload.ref is not None:
            waiter = self._pending.pop(message.payload.ref, None)
        elif kind is ReplyType.PONG and isinstance(message.payload.t, str):
            waiter = self._pings.pop(message.payload.t, None)
        if waiter is None:
            return None
        waiter.reply = message
        follow = []
        if waiter.apply is not None and isinstance(message.payload, Ack):
            follow = waiter.apply(message.payload)
        waiter.done.set()
        return follow

    def close(self) -> None:
        """The socket is gone: wake every waiter."""
        self.lost = True
        for waiter in [*self._pending.values(), *self._pings.values()]:
            waiter.done.set()
        self._pending.clear()
        self._pings.clear()
