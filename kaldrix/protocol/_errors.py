"""Error codes, close codes and the typed protocol error.

Every refusal the server makes maps to one of these values; the codes are part of the
wire contract v1 and never change meaning.
"""

from __future__ import annotations

import enum

import attrs


class ErrorCode(enum.StrEnum):
    """The `code` of an ERROR message."""

    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    INVALID_CHANNEL = "INVALID_CHANNEL"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_LARGE = "TOO_LARGE"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    RESTART = 1012
    AUTH_FAILED = 4001
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029


@attrs.frozen
class ProtocolError(Exception):
    """A message the peer sent that the protocol refuses.

    It is a value the server turns into an ERROR frame, never an exception that
    escapes into a connection: decoding returns it rather than raising it.
    """

    code: ErrorCode
    message: str
    path: str | None = None
    ref: str | None = None

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.code}{where}: {self.message}"
