"""The gateway's side of kaldrix.security.Guard: admission before the upgrade, and the
security hooks of a live connection (message rate, auth failures, blocks).

A refusal before the upgrade is an HTTP response (403, 429, ...) sent instead of the
101, so a refused client costs no WebSocket state at all. Every refusal, rate-limit
hit, block and ban is written to the audit log with the client's address and a reason.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import orjson

from ..protocol import MAX_CHANNEL_LENGTH, CloseCode, Command, ErrorCode, ProtocolError, Publish, Subscribe
from ..security import Block, Verdict, audit, may_publish, parse_address
from ._frames import error_frame
from ._http import RequestHead, Response

if TYPE_CHECKING:
    from ._connection import Connection
    from ._gateway import Gateway


def client_address(gateway: Gateway, head: RequestHead, peer_host: str) -> str:
    """The address the client connects from, as far as the gateway can trust it."""
    return gateway.guard.client_address(peer_host, head.headers.get("x-forwarded-for"))


def admit(gateway: Gateway, head: RequestHead, client_host: str) -> Response | None:
    """None to go on with the upgrade, or the response that refuses it."""
    refusal = gateway.guard.admit(
        client_host, origin=head.headers.get("origin"), host=head.headers.get("host"), now=time.monotonic()
    )
    if refusal is None:
        return None
    audit(refusal.event, client_host, refusal.reason, origin=head.headers.get("origin") if refusal.status == 403 else None)
    headers = (("Retry-After", str(refusal.retry_after)),) if refusal.retry_after is not None else ()
    return Response.json(refusal.status, {"error": refusal.reason}, headers=headers)


@contextlib.contextmanager
def counted(gateway: Gateway, client_host: str) -> Iterator[None]:
    """Count an admitted connection against its address for as long as it lasts."""
    gateway.guard.connected(client_host)
    try:
        yield
    finally:
        gateway.guard.disconnected(client_host)


def host_of(remote: str) -> str:
    """The address part of a connection's ``remote`` (``1.2.3.4:5``, ``[2001:db8::1]:5``)."""
    if remote.startswith("["):
        return remote[1 : remote.find("]")]
    return remote.rsplit(":", 1)[0]


# -- a live connection ------------------------------------------------------------------


def throttled(conn: Connection, message: str | bytes) -> bool:
    """Spend one message of the connection's budget; True when the message must be dropped.

    Connections allowed to PUBLISH are not limited: producers push the chain's events
    at the chain's pace. Everyone else gets ERROR RATE_LIMITED for messages over the
    budget, and a close with 4029 when they keep going.
    """
    rate = conn.message_rate
    if rate is None:
        return False
    gateway = conn.gateway
    open_mode, anonymous_publish = gateway.open_mode, gateway.config.allow_anonymous_publish
    if may_publish(conn.principal, open_mode=open_mode, allow_anonymous_publish=anonymous_publish) is None:
        return False
    verdict = rate.check(time.monotonic())
    if verdict is Verdict.ACCEPT:
        return False
    address = host_of(conn.remote)
    conn.metrics.error(ErrorCode.RATE_LIMITED)
    if verdict is Verdict.CLOSE:
        if conn.kick(CloseCode.RATE_LIMITED, "rate limited"):
            audit("rate_limit_close", address, "kept sending over the message rate", session=conn.session_id)
        return True
    if rate.refused_in_a_row == 1:
        audit("rate_limited", address, "message rate exceeded", session=conn.session_id)
    error = ProtocolError(
        ErrorCode.RATE_LIMITED, f"over {gateway.config.message_rate:g} messages per second: dropped", ref=_message_id(message)
    )
    if not conn.offer(error_frame(error), 0.0):
        conn.kick(CloseCode.SLOW_CONSUMER, "slow consumer: outbox full")
    return True


def _message_id(message: str | bytes) -> str | None:
    """The `id` of a dropped message, so the client can tell which one it was."""
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    found = obj.get("id") if isinstance(obj, dict) else None
    return found if isinstance(found, str) else None


def check_command(conn: Connection, command: Command) -> ProtocolError | None:
    """Limits on a decoded command that depend on the server's settings."""
    limit = conn.config.max_channel_length
    if limit >= MAX_CHANNEL_LENGTH:
        return None  # the codec has checked it already
    payload = command.payload
    if isinstance(payload, Subscribe):
        named = [(f"payload.channels[{i}]", name) for i, name in enumerate(payload.channels)]
    elif isinstance(payload, Publish) and payload.channel is not None:
        named = [("payload.channel", payload.channel)]
    else:
        return None
    for path, name in named:
        if len(name) > limit:
            return ProtocolError(ErrorCode.INVALID_CHANNEL, f"channel names are at most {limit} characters here", path, command.id)
    return None


def audit_connection(conn: Connection, event: str, reason: str, **fields: object) -> None:
    """An audit line about one connection (its address and session)."""
    audit(event, host_of(conn.remote), reason, session=conn.session_id, **fields)


def auth_failed(conn: Connection, reason: str) -> None:
    """Audit a failed authentication; enough of them from one address ban it for a while."""
    audit_connection(conn, "auth_failed", reason)
    auth_failed_at(conn.gateway, host_of(conn.remote))


def auth_failed_at(gateway: Gateway, address: str) -> None:
    """Count a failed authentication from `address` (already audited); ban on too many."""
    ban = gateway.guard.auth_failed(address, time.monotonic())
    if ban is not None:
        closed = close_blocked(gateway, ban)
        audit("banned", address, ban.reason, range=ban.address, seconds=gateway.guard.auth_ban_duration, closed=closed)


# -- blocking -----------------------------------------------------------------------------


def block(gateway: Gateway, spec: str, *, by: str, duration: float | None = None) -> tuple[Block, int]:
    """Block `spec` (ValueError if it is no address or CIDR) and close its open connections."""
    entry = gateway.guard.block(spec, reason=f"blocked by {by}", now=time.monotonic(), duration=duration)
    closed = close_blocked(gateway, entry)
    audit("blocked", entry.address, entry.reason, seconds=duration, closed=closed)
    return entry, closed


def unblock(gateway: Gateway, spec: str, *, by: str) -> bool:
    """Lift the entry for exactly `spec` (ValueError if it is no address or CIDR)."""
    removed = gateway.guard.unblock(spec)
    if removed:
        audit("unblocked", spec.strip(), f"unblocked by {by}")
    return removed


def close_blocked(gateway: Gateway, entry: Block) -> int:
    """Close every open connection inside `entry` with 4003; how many were closed."""
    closed = 0
    for conn in list(gateway.connections):
        address = parse_address(host_of(conn.remote))
        if address is not None and address in entry.network and conn.kick(CloseCode.FORBIDDEN, "address blocked"):
            closed += 1
    return closed


def admit_late(gateway: Gateway, conn: Connection) -> None:
    """Close with 4003 a connection whose address was blocked while its handshake was in
    progress (after `admit`, before the gateway listed it): `close_blocked` missed it."""
    if gateway.guard.blocked(host_of(conn.remote), time.monotonic()) is not None:
        conn.kick(CloseCode.FORBIDDEN, "address blocked")
