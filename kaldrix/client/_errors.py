"""What the client raises: the three ways a call can fail, each with the reason kept."""

from __future__ import annotations

from ..protocol import ErrorPayload


class ClientClosed(Exception):
    """The client was closed, or gave up reconnecting; the message says why."""


class ConnectionLost(Exception):
    """The connection dropped before the server answered; the call may be retried."""


class CommandError(Exception):
    """The server answered a command with ERROR."""

    def __init__(self, error: ErrorPayload) -> None:
        where = f" at {error.path}" if error.path else ""
        super().__init__(f"{error.code}{where}: {error.message}")
        self.error = error

    @property
    def code(self) -> str:
        return str(self.error.code)
