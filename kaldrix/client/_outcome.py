"""How one connection attempt of the client ended, and whether to try again."""

from __future__ import annotations

from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from ..protocol import CloseCode, ProtocolError, Welcome, decode_message
from ._options import ClientOptions


@attrs.frozen
class Outcome:
    """How one connection attempt ended."""

    error: str
    code: int | None = None
    fatal: bool = False


class NoWelcome(Exception):
    """The peer spoke, but not the kaldrix protocol."""


async def read_welcome(ws: Any) -> Welcome:
    """The server's first message, which must be WELCOME."""
    message = decode_message(await ws.get_message())
    if isinstance(message, ProtocolError) or not isinstance(message.payload, Welcome):
        raise NoWelcome(f"expected WELCOME from the server, got {str(message)[:200]}")
    return message.payload


def failure(exc: BaseException) -> Outcome:
    """How a connection attempt failed, from the first real error in (nested) groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = next((e for e in exc.exceptions if not isinstance(e, trio.Cancelled)), exc.exceptions[0])
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        if reason is None:
            return Outcome("connection closed before WELCOME")
        return Outcome(f"connection closed before WELCOME: {reason.code} {reason.reason or reason.name}", reason.code)
    if isinstance(exc, NoWelcome):
        return Outcome(str(exc))
    if isinstance(exc, ConnectionRejected):
        return Outcome(f"the server refused the WebSocket: HTTP {exc.status_code}")
    if isinstance(exc, trio.TooSlowError):
        return Outcome("timed out connecting")
    if isinstance(exc, OSError):
        return Outcome(f"cannot connect: {exc.strerror or exc}")
    return Outcome(f"{type(exc).__name__}: {exc}")


def give_up_reason(outcome: Outcome, options: ClientOptions, attempts: int) -> str | None:
    """Why not to reconnect after `outcome` (after `attempts` failed reconnects), or None."""
    if outcome.fatal:
        return "not reconnecting"
    if outcome.code == CloseCode.FORBIDDEN:
        return "forbidden: not reconnecting"
    if outcome.code == CloseCode.AUTH_FAILED and not callable(options.token):
        return "authentication failed and the token cannot change: not reconnecting"
    if not options.auto_reconnect:
        return "auto_reconnect is off"
    limit = options.max_reconnect_attempts
    if limit is not None and attempts >= limit:
        return f"gave up after {attempts} reconnect attempt(s)"
    return None
