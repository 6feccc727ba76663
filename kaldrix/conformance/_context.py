"""What a scenario is given: the server's address, the tokens, and ways to open connections."""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import HandshakeError, connect_websocket_url

from ._checks import require, show
from ._outcome import ScenarioFailed, ScenarioSkipped
from ._peer import Frame, Peer

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_MESSAGE = 4 << 20
"""What the runner accepts per frame: more than any reply the scenarios provoke."""


@attrs.frozen
class Target:
    """The server under test and what the run may use against it.

    Args:
        url: the WebSocket endpoint, e.g. ``ws://127.0.0.1:3000/ws``.
        token: a token with the publisher (or admin) role, for the scenarios that PUBLISH.
        admin_token: a token with the admin role, for REQUEST_METRICS.
        timeout: seconds each scenario may take.
        vectors: the directory of ``*.json`` vector files (None: the package's spec/vectors).
    """

    url: str
    token: str | None = None
    admin_token: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    vectors: Path | None = None


class RunState:
    """What one scenario learns about the server that later ones use."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(4)
        self.counter = itertools.count(1)
        self.publish_refused: str | None = None
        self.verifies_tokens: bool | None = None
        self.shared_peers: dict[str, Peer] = {}
        self.shared_uses: dict[str, int] = {}

    async def drop_shared(self, key: str) -> None:
        """Close a connection that scenarios share (the vectors'), so the next one is fresh."""
        peer = self.shared_peers.pop(key, None)
        self.shared_uses.pop(key, None)
        if peer is not None:
            await peer.close()

    async def close(self) -> None:
        for key in list(self.shared_peers):
            await self.drop_shared(key)


class Context:
    """One scenario's view of the run: the target, fresh names, and its connections.

    Connections live in the run's nursery; the runner closes the ones a scenario opened
    when it ends, whatever way it ends.
    """

    def __init__(self, target: Target, nursery: trio.Nursery, state: RunState) -> None:
        self.target = target
        self.url = target.url
        self.token = target.token
        self.admin_token = target.admin_token
        self.timeout = target.timeout
        self.state = state
        self.waiting = "the scenario to finish"
        self.peers: list[Peer] = []
        self._nursery = nursery

    # -- names -----------------------------------------------------------------------

    def new_id(self) -> str:
        """A message id no other frame of this run uses."""
        return f"conf-{self.state.tag}-{next(self.state.counter)}"

    def fresh(self, prefix: str = "") -> str:
        """A random name part, so that each scenario works on channels of its own."""
        return f"{prefix}conf-{self.state.tag}-{secrets.token_hex(4)}"

    def note(self, what: str) -> None:
        """Remember what the scenario waits for, to explain a timeout."""
        self.waiting = what

    # -- connections ---------------------------------------------------------------------

    async def connect(
        self,
        *,
        token: str | None = None,
        label: str = "",
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        keep: bool = False,
    ) -> Peer:
        """Open a connection (with `token` as a Bearer token) and read its WELCOME.

        `keep=True` leaves closing to the caller (connections shared across scenarios).
        """
        headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
        label = label or f"connection {len(self.peers) + 1}"
        self.note(f"the WebSocket handshake of {label}")
        try:
            ws = await connect_websocket_url(
                self._nursery, self.url, extra_headers=headers, max_message_size=max_message_size
            )
        except (HandshakeError, OSError) as exc:
            raise ScenarioFailed(f"cannot open a WebSocket to {self.url}: {exc!r}") from None
        peer = Peer(ws, label, new_id=self.new_id, note=self.note)
        if not keep:
            self.peers.append(peer)
        try:
            first = await peer.wait_for(lambda frame: True, "WELCOME, the first frame")
            require(first["type"] == "WELCOME", f"{label}: the first frame must be WELCOME", first)
        except BaseException:
            if keep:  # nobody else would close it
                await peer.close()
            raise
        peer.welcome = first
        return peer

    async def close_all(self) -> None:
        for peer in self.peers:
            await peer.close()
        self.peers.clear()

    # -- publishing ------------------------------------------------------------------------

    def _publish_refused(self, reply: Frame) -> str:
        payload = reply["payload"]
        who = "with the --token given" if self.token else "anonymously (pass --token with a publisher token)"
        return f"PUBLISH {who} was refused: {payload.get('code')} {payload.get('message', '')!r}"

    async def publisher(self, label: str = "publisher") -> Peer:
        """A connection that may PUBLISH; skips the scenario once publishing was refused."""
        if self.state.publish_refused is not None:
            raise ScenarioSkipped(self.state.publish_refused)
        return await self.connect(token=self.token, label=label)

    async def publish(self, peer: Peer, payload: dict[str, Any]) -> Frame:
        """PUBLISH that must succeed; returns the ACK's payload.

        FORBIDDEN or UNAUTHORIZED means this run lacks the rights, not that the server is
        wrong: the scenario, and every later one that publishes, is skipped.
        """
        _, reply = await peer.request("PUBLISH", payload)
        if reply["type"] == "ERROR" and reply["payload"].get("code") in ("FORBIDDEN", "UNAUTHORIZED"):
            self.state.publish_refused = self._publish_refused(reply)
            raise ScenarioSkipped(self.state.publish_refused)
        require(reply["type"] == "ACK", f"PUBLISH {show(payload)} was refused", reply)
        return reply["payload"]

    # -- what the server is --------------------------------------------------------------------

    async def verifies_tokens(self) -> bool | None:
        """True when the server authenticated a connection with a token given to the run.

        None when the run has no token: it cannot tell a server that checks tokens from
        one in open development mode, where every channel is open to everyone.
        """
        token = self.token or self.admin_token
        if token is None:
            return None
        if self.state.verifies_tokens is None:
            peer = await self.connect(token=token, label="token check")
            self.state.verifies_tokens = peer.welcome["payload"].get("authenticated") is True
        return self.state.verifies_tokens
