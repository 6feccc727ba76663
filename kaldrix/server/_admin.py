"""Operator actions on a running gateway: the block list, over WebSocket and over HTTP.

WebSocket: ``ADMIN {action: "block"|"unblock"|"list", address?, duration?}`` from an
admin connection, answered with ACK ``{admin: {blocked, changed, closed}}``.
HTTP, on the WebSocket port, with ``Authorization: Bearer <admin token>``:

    POST /api/admin/block     {"address": "10.0.0.0/8", "duration": 3600}
    POST /api/admin/unblock   {"address": "10.0.0.0/8"}
    GET  /api/admin/blocked

Both paths share `perform`, so they cannot drift apart. A failed admin token over HTTP
counts as an authentication failure of the caller's address, like one over WebSocket.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ..protocol import (
    Ack,
    Admin,
    AdminAction,
    AdminResult,
    BlockEntry,
    CloseCode,
    Command,
    ErrorCode,
    ProtocolError,
    ReplyType,
    converter,
    format_timestamp,
)
from ..security import AuthError, Block, Principal, audit, may_admin
from . import _admission
from ._frames import error_frame, reply_frame
from ._http import RequestHead, Response

if TYPE_CHECKING:
    from ._connection import Connection
    from ._gateway import Gateway

MAX_BODY_BYTES = 4096


class AdminInputError(Exception):
    """An ADMIN request the gateway cannot carry out; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _entry(block: Block, now: float) -> BlockEntry:
    expires = None
    if block.expires_at is not None:
        expires = format_timestamp(datetime.now(UTC) + timedelta(seconds=max(block.expires_at - now, 0.0)))
    return BlockEntry(address=block.address, reason=block.reason, expires=expires)


def perform(gateway: Gateway, request: Admin, *, by: str) -> AdminResult:
    """Carry out one admin request; AdminInputError when its address or duration is unusable."""
    changed = False
    closed = 0
    if request.action is not AdminAction.LIST:
        if not request.address:
            raise AdminInputError("address", f"{request.action} needs an address or CIDR range")
        if request.duration is not None:
            if request.action is AdminAction.UNBLOCK:
                raise AdminInputError("duration", "only a block has a duration")
            if not (math.isfinite(request.duration) and request.duration > 0):
                raise AdminInputError("duration", "expected a positive number of seconds")
        try:
            if request.action is AdminAction.BLOCK:
                _, closed = _admission.block(gateway, request.address, by=by, duration=request.duration)
                changed = True
            else:
                changed = _admission.unblock(gateway, request.address, by=by)
        except ValueError as exc:
            raise AdminInputError("address", str(exc)) from None
    now = time.monotonic()
    blocked = [_entry(block, now) for block in gateway.guard.blocklist.entries(now)]
    return AdminResult(blocked=blocked, changed=changed, closed=closed)


def _who(principal: Principal | None, address: str) -> str:
    return f"{'anonymous' if principal is None else principal.sub}@{address}"


# -- WebSocket -------------------------------------------------------------------------------


def handle_command(conn: Connection, command: Command) -> None:
    """ADMIN from a connection: FORBIDDEN below the admin role, else ACK with the result."""
    address = _admission.host_of(conn.remote)
    if reason := may_admin(conn.principal, open_mode=conn.gateway.open_mode):
        audit("admin_refused", address, reason, session=conn.session_id)
        _send(conn, error_frame(ProtocolError(ErrorCode.FORBIDDEN, reason, ref=command.id)))
        return
    try:
        result = perform(conn.gateway, command.payload, by=_who(conn.principal, address))
    except AdminInputError as exc:
        error = ProtocolError(ErrorCode.INVALID_PAYLOAD, exc.message, f"payload.{exc.field}", command.id)
        _send(conn, error_frame(error))
        return
    _send(conn, reply_frame(ReplyType.ACK, Ack(ref=command.id, admin=result)))


def _send(conn: Connection, frame: bytes) -> None:
    if not conn.offer(frame, 0.0):
        conn.kick(CloseCode.SLOW_CONSUMER, "slow consumer: outbox full")


# -- HTTP ------------------------------------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.response = Response.json(status, {"error": message})


async def block_route(gateway: Gateway, head: RequestHead, stream: trio.abc.Stream, peer_host: str) -> Response:
    """POST /api/admin/block {"address": ..., "duration"?: seconds}"""
    return await _serve(gateway, head, stream, peer_host, AdminAction.BLOCK)


async def unblock_route(gateway: Gateway, head: RequestHead, stream: trio.abc.Stream, peer_host: str) -> Response:
    """POST /api/admin/unblock {"address": ...}"""
    return await _serve(gateway, head, stream, peer_host, AdminAction.UNBLOCK)


async def list_route(gateway: Gateway, head: RequestHead, stream: trio.abc.Stream, peer_host: str) -> Response:
    """GET /api/admin/blocked"""
    return await _serve(gateway, head, stream, peer_host, AdminAction.LIST)


async def _serve(
    gateway: Gateway, head: RequestHead, stream: trio.abc.Stream, peer_host: str, action: AdminAction
) -> Response:
    address = _admission.client_address(gateway, head, peer_host)
    try:
        principal = _authorize(gateway, head, address)
        body: dict[str, Any] = {}
        if action is not AdminAction.LIST:
            raw = None
            with trio.move_on_after(gateway.config.handshake_timeout):
                raw = await read_body(stream, head)
            if raw is None:
                raise HttpError(408, "the request body did not arrive in time")
            body = _json_object(raw)
        request = _admin_request(action, body)
        result = perform(gateway, request, by=_who(principal, address))
    except HttpError as exc:
        return exc.response
    except AdminInputError as exc:
        return Response.json(400, {"error": exc.message, "field": exc.field})
    return Response.json(200, converter.unstructure(result))


def _authorize(gateway: Gateway, head: RequestHead, address: str) -> Principal | None:
    """The admin behind the request, or HttpError (403 blocked or not admin, 401 bad token)."""
    if gateway.guard.blocked(address, time.monotonic()) is not None:
        audit("admin_refused", address, "this address is blocked")
        raise HttpError(403, "this address is blocked")
    principal = None
    authorization = head.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer " and not gateway.open_mode:
        try:
            principal = gateway.verifier.verify(authorization[7:].strip())
        except AuthError as exc:
            audit("auth_failed", address, exc.reason, route=head.path)
            _admission.auth_failed_at(gateway, address)
            raise HttpError(401, exc.reason) from None
    if reason := may_admin(principal, open_mode=gateway.open_mode):
        audit("admin_refused", address, reason, route=head.path)
        raise HttpError(401 if principal is None else 403, reason)
    return principal


async def read_body(stream: trio.abc.ReceiveStream, head: RequestHead) -> bytes:
    """The request body: Content-Length bytes, at most MAX_BODY_BYTES (HttpError otherwise).

    `read_head` may already have read past the head; those bytes come first.
    """
    if "chunked" in head.headers.get("transfer-encoding", "").lower():
        raise HttpError(411, "send the body with a Content-Length")
    text = head.headers.get("content-length")
    if text is None:
        raise HttpError(411, "send the body with a Content-Length")
    if not text.strip().isdigit():
        raise HttpError(400, "Content-Length is not a number")
    length = int(text)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, f"the body may be at most {MAX_BODY_BYTES} bytes")
    body = bytearray(head.raw[head.raw.index(b"\r\n\r\n") + 4 :][:length])
    while len(body) < length:
        chunk = await stream.receive_some(length - len(body))
        if not chunk:
            raise HttpError(400, "the body ended early")
        body += chunk
    return bytes(body)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HttpError(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, 'expected a JSON object such as {"address": "10.0.0.0/8"}')
    return data


def _admin_request(action: AdminAction, body: dict[str, Any]) -> Admin:
    unknown = sorted(set(body) - {"address", "duration"})
    if unknown:
        raise AdminInputError(unknown[0], "unknown field")
    address = body.get("address")
    if address is not None and not isinstance(address, str):
        raise AdminInputError("address", "expected a string")
    duration = body.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int | float)):
        raise AdminInputError("duration", "expected a number of seconds")
    return Admin(action=action, address=address, duration=None if duration is None else float(duration))
