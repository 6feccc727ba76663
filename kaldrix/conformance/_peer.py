"""One client connection to the server under test, spoken to in plain JSON.

Frames that arrive while a scenario waits for something else are kept, in arrival
order, so that a later wait finds them: nothing the server sends is lost or reordered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from ._checks import envelope_problem, event_problem, require, show
from ._outcome import ScenarioFailed

Frame = dict[str, Any]
Match = Callable[[Frame], bool]

CLIENT_VERSION = "1.0.0"
CLOSE_GRACE = 2.0
"""Seconds a polite close may take before the socket is simply dropped."""


@attrs.frozen
class Closed:
    """How the server ended a connection (`reason` None: without a close frame)."""

    reason: CloseReason | None

    @property
    def code(self) -> int | None:
        return None if self.reason is None else self.reason.code

    def __str__(self) -> str:
        if self.reason is None:
            return "no close frame"
        return f"close code {self.reason.code}" + (f" {self.reason.reason!r}" if self.reason.reason else "")


def client_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Peer:
    """A WebSocket client with the waits a scenario needs; failures name the frames."""

    def __init__(self, ws: WebSocketConnection, label: str, *, new_id: Callable[[], str], note: Callable[[str], None]) -> None:
        self.ws = ws
        self.label = label
        self.welcome: Frame = {}
        self.pending: list[Frame] = []
        self._new_id = new_id
        self._note = note

    # -- sending -------------------------------------------------------------------

    async def send(self, message_type: str, payload: dict[str, Any] | None = None, *, message_id: str | None = None) -> str:
        """Send a command in a full v1 envelope; returns its id."""
        message_id = message_id or self._new_id()
        frame = {
            "type": message_type,
            "payload": payload if payload is not None else {},
            "id": message_id,
            "timestamp": client_timestamp(),
            "version": CLIENT_VERSION,
        }
        await self.send_raw(json.dumps(frame, separators=(",", ":")))
        return message_id

    async def send_raw(self, data: str | bytes) -> None:
        """Send exactly `data` (a text frame for str, a binary frame for bytes)."""
        try:
            await self.ws.send_message(data)
        except ConnectionClosed as exc:
            raise ScenarioFailed(f"{self.label}: connection closed by the server ({Closed(exc.reason)}) before a send") from None

    # -- receiving -----------------------------------------------------------------

    async def next_or_close(self, what: str) -> Frame | Closed:
        """The next frame (kept ones first), or how the server closed the connection."""
        if self.pending:
            return self.pending.pop(0)
        self._note(f"{what} on {self.label}")
        try:
            message = await self.ws.get_message()
        except ConnectionClosed as exc:
            return Closed(exc.reason)
        if isinstance(message, bytes):
            raise ScenarioFailed(f"{self.label}: the server sent a binary frame ({len(message)} bytes); v1 frames are text")
        try:
            frame = json.loads(message)
        except ValueError:
            raise ScenarioFailed(f"{self.label}: the server sent a frame that is not JSON: {show(message)}") from None
        if problem := envelope_problem(frame):
            raise ScenarioFailed(f"{self.label}: a server frame is not a v1 envelope ({problem}): {show(message)}")
        return frame

    async def _read(self, what: str) -> Frame:
        got = await self.next_or_close(what)
        if isinstance(got, Closed):
            raise ScenarioFailed(f"{self.label}: connection closed by the server ({got}) while waiting for {what}")
        return got

    async def wait_for(self, match: Match, what: str) -> Frame:
        """The first frame (kept or new) that `match`es; the others stay kept, in order."""
        for index, frame in enumerate(self.pending):
            if match(frame):
                del self.pending[index]
                return frame
        kept, self.pending = self.pending, []
        try:
            while True:
                frame = await self._read(what)
                if match(frame):
                    return frame
                kept.append(frame)
        finally:
            self.pending = kept + self.pending

    async def reply_to(self, message_id: str | None, what: str = "") -> Frame:
        """The ACK or ERROR whose `ref` is `message_id`."""

        def match(frame: Frame) -> bool:
            return frame["type"] in ("ACK", "ERROR") and frame["payload"].get("ref") == message_id

        return await self.wait_for(match, what or f"the ACK or ERROR with ref {message_id!r}")

    async def request(self, message_type: str, payload: dict[str, Any] | None = None) -> tuple[str, Frame]:
        """Send a command and return its id and its ACK or ERROR."""
        message_id = await self.send(message_type, payload)
        return message_id, await self.reply_to(message_id, f"the ACK or ERROR of {message_type} {message_id!r}")

    async def ack(self, message_type: str, payload: dict[str, Any] | None = None) -> Frame:
        """Send a command that must succeed; returns the ACK's payload."""
        _, reply = await self.request(message_type, payload)
        require(reply["type"] == "ACK", f"{message_type} {show(payload)} was refused", reply)
        return reply["payload"]

    async def subscribe(self, *channels: str, since: dict[str, Any] | None = None) -> Frame:
        """SUBSCRIBE that must succeed; returns the ACK's payload."""
        payload: dict[str, Any] = {"channels": list(channels)}
        if since is not None:
            payload["since"] = since
        return await self.ack("SUBSCRIBE", payload)

    async def event_on(self, channel: str, match: Match | None = None, what: str = "") -> Frame:
        """The next event on `channel` (that `match`es, when given)."""

        def wanted(frame: Frame) -> bool:
            return frame.get("channel") == channel and (match is None or match(frame))

        event = await self.wait_for(wanted, what or f"an event on {channel}")
        if problem := event_problem(event):
            raise ScenarioFailed(f"{self.label}: {problem}; got {show(event)}")
        return event

    async def events_on(self, channel: str, count: int) -> list[Frame]:
        """The next `count` events on `channel`, in arrival order."""
        return [await self.event_on(channel, what=f"event {i + 1} of {count} on {channel}") for i in range(count)]

    def kept_events(self, channel: str) -> list[Frame]:
        """Events on `channel` that arrived but no wait has taken yet."""
        return [frame for frame in self.pending if frame.get("channel") == channel]

    async def ping(self) -> Frame:
        """PING with a fresh `t`; returns its PONG."""
        token = self._new_id()
        await self.send("PING", {"t": token})
        return await self.wait_for(
            lambda frame: frame["type"] == "PONG" and frame["payload"].get("t") == token, f"the PONG to PING t={token!r}"
        )

    async def still_open(self, after: str) -> None:
        """Fail unless the connection still answers a PING (it must outlive a refused command)."""
        try:
            await self.ping()
        except ScenarioFailed as exc:
            raise ScenarioFailed(f"the connection must stay open after {after}: {exc.reason}") from None

    async def closed(self, what: str) -> Closed:
        """Wait until the server closes the connection; frames before it are kept."""
        kept, self.pending = self.pending, []
        try:
            while True:
                got = await self.next_or_close(what)
                if isinstance(got, Closed):
                    return got
                kept.append(got)
        finally:
            self.pending = kept + self.pending

    async def close(self) -> None:
        """Close politely; a server that does not answer in time has its socket dropped.

        (trio-websocket closes the socket itself when its close handshake is cancelled.)
        """
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
            await self.ws.aclose()
