"""Noticing a stalled subscription: per channel, when the client last heard of it.

A server announcing `channelHeartbeat` in WELCOME sends a HEARTBEAT for every subscribed
channel that has been quiet that long, so on a healthy connection each channel is heard
from (an event, a HEARTBEAT, a SUBSCRIBE ACK) at least that often. A channel not heard
from for `stale_after` (three heartbeats unless configured) has stalled; a HEARTBEAT
whose position differs from the last one the client saw means an event went missing.
Either way the client resubscribes with `since`, and reconnects when even that gets no
answer. Time the client spends unable to read (its application is slow) does not count
against the server.

Plain bookkeeping without I/O; the client's watchdog task acts on its answers.
"""

from __future__ import annotations

import math

STALE_HEARTBEATS = 3
"""With no `stale_after` given, a channel is stale after this many missed heartbeats."""


def stale_after(option: float | None, channel_heartbeat_ms: int | None) -> float | None:
    """Seconds of silence after which a channel counts as stalled, or None (no watchdog).

    An explicit option wins (0 turns the watchdog off); otherwise three of the server's
    heartbeat intervals, and no watchdog when the server sends no heartbeats.
    """
    if option is not None:
        return option or None
    if not channel_heartbeat_ms:
        return None
    return STALE_HEARTBEATS * channel_heartbeat_ms / 1000.0


class Freshness:
    """When each channel of one connection was last heard from, and which look wrong."""

    def __init__(self, stale_after: float | None) -> None:
        self.stale_after = stale_after
        self._heard: dict[str, float] = {}
        self._suspect: dict[str, None] = {}

    @property
    def check_interval(self) -> float:
        """How often to look for stale channels (inf: only when told of a missed event)."""
        return math.inf if self.stale_after is None else self.stale_after / 4

    def heard(self, channel: str, now: float) -> None:
        """Something arrived for `channel`."""
        self._heard[channel] = now

    def heartbeat(self, channel: str, position: tuple[int, str], last: tuple[int, str] | None, now: float) -> bool:
        """Take in a HEARTBEAT; True when it shows the client missed something.

        Every event up to the heartbeat's offset was sent before it, in order, so the
        client's last position must equal it; anything else (a lower offset, another
        epoch, or a higher offset, which a rewound stream gives) needs a resubscribe.
        """
        self._heard[channel] = now
        if last is None or last == position:
            return False
        self._suspect[channel] = None
        return True

    def paused(self, seconds: float) -> None:
        """The client could not read for `seconds`: that silence is not the server's."""
        if seconds > 0.001:
            for channel in self._heard:
                self._heard[channel] += seconds

    def due(self, channels: list[str], now: float, *, silence: bool = True) -> list[str]:
        """The channels among `channels` to resubscribe: suspect, or (with `silence`)
        silent too long."""
        due = [name for name in channels if name in self._suspect]
        if self.stale_after is not None and silence:
            horizon = now - self.stale_after
            due.extend(
                name for name in channels if name not in self._suspect and self._heard.setdefault(name, now) < horizon
            )
        self._suspect.clear()
        return due

    def forget(self, channel: str) -> None:
        self._heard.pop(channel, None)
        self._suspect.pop(channel, None)
