"""Payloads of the control messages: the client's commands and the server's replies."""

from __future__ import annotations

from typing import Any

import attrs

from ._errors import ErrorCode
from ._events import EventPayload
from ._types import AdminAction, CommandType, Count, EventType, ReplyType, Timestamp

# -- client -> server ---------------------------------------------------------------


@attrs.frozen
class Auth:
    """AUTH: authenticate, or refresh the token of, an open connection."""

    token: str


@attrs.frozen
class StreamPosition:
    """Where a client stopped reading a channel: the last offset it saw, in which epoch."""

    offset: Count
    epoch: str


@attrs.frozen
class Subscribe:
    """SUBSCRIBE: join channels; with `since`, replay what was missed first."""

    channels: list[str]
    since: dict[str, StreamPosition] | None = None


@attrs.frozen
class Unsubscribe:
    """UNSUBSCRIBE: leave channels."""

    channels: list[str]


@attrs.frozen
class PublishedEvent:
    """One event as a producer hands it over; `id` makes a retried publish idempotent."""

    type: EventType
    payload: EventPayload
    id: str | None = None


@attrs.frozen
class Publish:
    """PUBLISH: one `event` or a batch of `events`; `channel` overrides the routing table."""

    event: PublishedEvent | None = None
    events: list[PublishedEvent] | None = None
    channel: str | None = None

    @property
    def all_events(self) -> list[PublishedEvent]:
        if self.event is not None:
            return [self.event]
        return list(self.events or ())


@attrs.frozen
class Ping:
    """PING: application-level round trip; `t` comes back unchanged in the PONG."""

    t: Any = None


@attrs.frozen
class RequestMetrics:
    """REQUEST_METRICS: ask for the server's metrics (the seed's request_metrics)."""

    type: str = "all"


@attrs.frozen
class Admin:
    """ADMIN: block or unblock an address or CIDR range, or list the block list (admin role)."""

    action: AdminAction
    address: str | None = None
    """An IPv4 or IPv6 address or CIDR range; required to block and unblock."""
    duration: float | None = None
    """Seconds a block lasts; absent: until unblocked."""


# -- server -> client ---------------------------------------------------------------


@attrs.frozen
class UserInfo:
    """Who the connection is authenticated as."""

    sub: str
    role: str


@attrs.frozen
class Welcome:
    """WELCOME: the first frame on every connection."""

    session_id: str
    server_version: str
    protocol_version: str
    heartbeat_interval: int
    authenticated: bool
    user: UserInfo | None = None
    channel_heartbeat: int | None = None
    """Milliseconds a subscribed channel may stay quiet before the server sends a HEARTBEAT
    for it (0: never); a client watching for stalled channels derives its patience from it."""


@attrs.frozen
class ChannelPosition:
    """Per-channel answer to SUBSCRIBE: the channel's current offset and epoch."""

    offset: int
    epoch: str
    recovered: bool = False
    replayed: int = 0


@attrs.frozen
class PublishResult:
    """Per-event answer to PUBLISH: the offset it got on each channel it was routed to."""

    id: str
    offsets: dict[str, int]
    duplicate: bool = False


@attrs.frozen
class BlockEntry:
    """One entry of the block list: an address or CIDR range, why, and until when."""

    address: str
    reason: str
    expires: Timestamp | None = None


@attrs.frozen
class AdminResult:
    """Answer to ADMIN: whether the block list changed, connections closed, the list after it."""

    blocked: list[BlockEntry]
    changed: bool = False
    closed: int = 0


@attrs.frozen
class Ack:
    """ACK: the command whose `id` is `ref` succeeded."""

    ref: str | None = None
    channels: dict[str, ChannelPosition] | None = None
    results: list[PublishResult] | None = None
    user: UserInfo | None = None
    admin: AdminResult | None = None


@attrs.frozen
class ErrorPayload:
    """ERROR: the command whose `id` is `ref` (if any) was refused."""

    code: ErrorCode
    message: str
    ref: str | None = None
    path: str | None = None


@attrs.frozen
class Pong:
    """PONG: answer to PING with the server's clock."""

    server_time: Timestamp
    t: Any = None
    ref: str | None = None


@attrs.frozen
class MetricsResponse:
    """METRICS_RESPONSE: the answer to REQUEST_METRICS."""

    type: str
    metrics: dict[str, Any]
    ref: str | None = None


@attrs.frozen
class Heartbeat:
    """HEARTBEAT: a subscribed channel has been quiet; where it stands, so that a subscriber
    can tell a quiet channel from a stalled subscription or a missed event."""

    channel: str
    offset: Count
    """The channel's latest offset: every event up to it was sent before this message."""
    epoch: str


COMMAND_PAYLOADS: dict[CommandType, type[Any]] = {
    CommandType.AUTH: Auth,
    CommandType.SUBSCRIBE: Subscribe,
    CommandType.UNSUBSCRIBE: Unsubscribe,
    CommandType.PUBLISH: Publish,
    CommandType.PING: Ping,
    CommandType.REQUEST_METRICS: RequestMetrics,
    CommandType.ADMIN: Admin,
}
"""Which payload class each client command carries."""

REPLY_PAYLOADS: dict[ReplyType, type[Any]] = {
    ReplyType.WELCOME: Welcome,
    ReplyType.ACK: Ack,
    ReplyType.ERROR: ErrorPayload,
    ReplyType.PONG: Pong,
    ReplyType.METRICS_RESPONSE: MetricsResponse,
    ReplyType.HEARTBEAT: Heartbeat,
}
"""Which payload class each server control message carries."""
