"""Graceful drain: stop taking clients, ask every one to leave, let writers flush, stop.

    Gateway.shutdown(code) ─ drain(gateway, code, reason):
      1. `draining`: /readyz answers 503 and a late upgrade gets 503 + Retry-After;
      2. the listener stops;
      3. every connection is told to close with `code` (1001: final shutdown, 1012:
         restart); its writer keeps flushing what is queued until the drain deadline,
         then the close frame follows;
      4. wait until every connection is gone, at most `shutdown_timeout`.
    The gateway then cancels whatever is left (the shielded close of each connection
    still has `close_timeout`).

Clients reconnect with full-jitter backoff (kaldrix.client), so a fleet told to leave
at once comes back spread over the backoff window instead of all together.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from ._connection import Connection
    from ._gateway import Gateway

log = logging.getLogger("kaldrix.server")


@attrs.frozen
class Drain:
    """One drain in progress: the close code every client gets, and when time is up."""

    code: int
    reason: str
    deadline: float
    """trio time after which the gateway stops waiting for connections to finish."""


async def drain(gateway: Gateway, code: int, reason: str) -> None:
    """Stop accepting, close every connection with `code`, wait for them (bounded)."""
    timeout = gateway.config.shutdown_timeout
    gateway.draining = True
    gateway.drain = Drain(code, reason, trio.current_time() + timeout)
    gateway._listen_scope.cancel()
    connections = list(gateway.connections)
    log.info("draining %d connection(s): closing with %d, up to %.1fs to flush", len(connections), code, timeout)
    for conn in connections:
        conn.kick(code, reason)
    with trio.move_on_at(gateway.drain.deadline):
        while gateway.connections:
            await gateway._idle.wait()
    if gateway.connections:
        log.warning("drain: %d connection(s) still open after %.1fs; dropping them", len(gateway.connections), timeout)
    else:
        log.info("drain: every connection closed")


def admit_late(gateway: Gateway, conn: Connection) -> None:
    """A connection whose handshake finished after the drain began leaves at once too."""
    if gateway.drain is not None:
        conn.kick(gateway.drain.code, gateway.drain.reason)


def flush_deadline(gateway: Gateway, close_timeout: float) -> float:
    """Until when a closing connection's writer may flush its queued frames.

    Normally `close_timeout`; during a drain, until the drain deadline, so that what
    was queued before a restart reaches the client ahead of the close frame.
    """
    own = trio.current_time() + close_timeout
    return own if gateway.drain is None else max(own, gateway.drain.deadline)
