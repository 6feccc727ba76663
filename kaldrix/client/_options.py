"""The client's settings (the seed's useWebSocket options) and its observable state."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

TokenSource = str | Callable[[], str | Awaitable[str | None] | None] | None
"""A token, or a callable (sync or async) asked for a fresh one before each connect."""

_positive = attrs.validators.gt(0)
_not_negative = attrs.validators.ge(0)


@attrs.frozen
class ClientOptions:
    """How the client connects, reconnects and paces its handlers. Durations are seconds.

    Throttle and debounce apply per event type to handler dispatch only; `events()`
    always yields every event. With both on, debounce runs first and throttle caps
    the rate of what it lets through.
    """

    url: str
    fallback_urls: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """Other nodes of the same deployment (sharing a broker). After a connection ends or an
    attempt fails, the next attempt goes to the next URL of `url, *fallback_urls`, round robin."""
    token: TokenSource = None
    auto_reconnect: bool = True
    reconnect_interval: float = attrs.field(default=1.0, validator=_positive)
    """Base of the exponential backoff: the first retry waits up to this long."""
    max_reconnect_delay: float = attrs.field(default=30.0, validator=_positive)
    max_reconnect_attempts: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_not_negative)
    )
    """Consecutive failed reconnects before giving up; None retries forever."""
    enable_throttle: bool = False
    throttle_time: float = attrs.field(default=0.1, validator=_positive)
    """Handlers of a type get at most one event per window: the first at once, the latest at its end."""
    enable_debounce: bool = False
    debounce_time: float = attrs.field(default=0.2, validator=_positive)
    """Handlers of a type get only the last event of a burst, once the type was quiet this long."""
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=dict)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    """For the TCP connect, the WebSocket handshake and the WELCOME."""
    ping_interval: float | None = attrs.field(default=15.0, validator=attrs.validators.optional(_positive))
    """Seconds between PINGs that measure latency and detect a dead link; None: never."""
    ping_timeout: float = attrs.field(default=10.0, validator=_positive)
    """A PING unanswered this long counts the connection as dead."""
    buffer_size: int = attrs.field(default=1024, validator=_not_negative)
    """Events held between the socket and slow handlers or iterators before reading pauses."""
    max_message_size: int = attrs.field(default=1 << 22, validator=_positive)
    stale_after: float | None = attrs.field(default=None, validator=attrs.validators.optional(_not_negative))
    """Seconds without anything (event or HEARTBEAT) for a channel before it is resubscribed
    with `since`, and the connection replaced if that gets no answer. None: three times the
    server's announced channel heartbeat (no watchdog if it announces none); 0: never."""
    rng: random.Random = attrs.field(factory=random.Random, eq=False, repr=False)
    """Source of backoff jitter; seed it for reproducible delays."""


@attrs.define
class ClientState:
    """What the application may watch (the seed's hook state); the client updates it in place."""

    is_connected: bool = False
    connection_error: str | None = None
    reconnect_attempts: int = 0
    """Reconnect attempts since the last successful connection."""
    message_latency: float | None = None
    """Round trip of the latest PING, in milliseconds."""
    session_id: str | None = None
    resyncs: int = 0
    """Channels resubscribed because they went quiet too long or a HEARTBEAT showed a missed event."""
    last_offsets: dict[str, tuple[int, str]] = attrs.Factory(dict)
    """Per channel, the (offset, epoch) of the last event seen: where a reconnect resumes."""


def make_options(url: str | None, options: ClientOptions | None, settings: Mapping[str, Any]) -> ClientOptions:
    """ClientOptions from a url and keyword settings, or an existing one with changes."""
    if options is None:
        if url is None:
            raise TypeError("open_client needs a url or options")
        return ClientOptions(url=url, **settings)
    changes = dict(settings)
    if url is not None:
        changes["url"] = url
    return attrs.evolve(options, **changes) if changes else options
