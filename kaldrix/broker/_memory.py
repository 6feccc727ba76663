"""The in-process broker: per-channel gap-free offsets, an epoch, and bounded history.

History holds the already-framed bytes of each event, so a replay costs no encoding.
Everything is synchronous: the router calls it from its one task and never waits.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import attrs


@attrs.frozen
class Position:
    """A channel's latest offset (0 before its first event) within its epoch."""

    offset: int
    epoch: str


@attrs.define
class _Stored:
    offset: int
    frame: bytes
    accepted_at: float


@attrs.define
class _Channel:
    epoch: str
    last_offset: int = 0
    events: deque[_Stored] = attrs.Factory(deque)


def _new_epoch() -> str:
    return secrets.token_hex(6)


class MemoryBroker:
    """Offsets, history and dedup for one process.

    Args:
        history_size: events kept per channel for recovery.
        history_ttl: seconds an event stays recoverable.
        dedup_window: seconds an event id is remembered for idempotent publishing.
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        *,
        history_size: int = 1000,
        history_ttl: float = 300.0,
        dedup_window: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.dedup_window = dedup_window
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        self._seen: OrderedDict[str, tuple[float, dict[str, int]]] = OrderedDict()

    def _channel(self, name: str) -> _Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(epoch=_new_epoch())
        return channel

    def position(self, name: str) -> Position:
        """Where `name` stands now; creating its epoch if it had none."""
        channel = self._channel(name)
        return Position(channel.last_offset, channel.epoch)

    def append(self, name: str, make_frame: Callable[[int, str], bytes], accepted_at: float) -> tuple[int, bytes]:
        """Give the next offset to an event, store its frame, and return both."""
        channel = self._channel(name)
        offset = channel.last_offset + 1
        frame = make_frame(offset, channel.epoch)
        channel.last_offset = offset
        channel.events.append(_Stored(offset, frame, accepted_at))
        if len(channel.events) > self.history_size:
            channel.events.popleft()
        self._expire(channel, accepted_at)
        return offset, frame

    def _expire(self, channel: _Channel, now: float) -> None:
        horizon = now - self.history_ttl
        while channel.events and channel.events[0].accepted_at < horizon:
            channel.events.popleft()

    def replay(self, name: str, since: Position) -> list[bytes] | None:
        """Frames after `since`, in order, or None when history no longer covers the gap."""
        channel = self._channel(name)
        if since.epoch != channel.epoch or since.offset > channel.last_offset:
            return None
        if since.offset == channel.last_offset:
            return []
        self._expire(channel, self._clock())
        if not channel.events or channel.events[0].offset > since.offset + 1:
            return None
        first = channel.events[0].offset
        return [stored.frame for stored in list(channel.events)[since.offset + 1 - first :]]

    def recall(self, event_id: str) -> dict[str, int] | None:
        """The offsets an event id got when it was published within the dedup window."""
        self._forget_old()
        seen = self._seen.get(event_id)
        return None if seen is None else seen[1]

    def remember(self, event_id: str, offsets: dict[str, int]) -> None:
        """Record that `event_id` was published, for the dedup window."""
        self._seen[event_id] = (self._clock(), offsets)
        self._seen.move_to_end(event_id)

    def _forget_old(self) -> None:
        horizon = self._clock() - self.dedup_window
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest[0] >= horizon:
                break
            self._seen.popitem(last=False)

    def statistics(self) -> dict[str, int]:
        """Counts for metrics and leak checks."""
        return {
            "channels": len(self._channels),
            "storedEvents": sum(len(c.events) for c in self._channels.values()),
            "dedupIds": len(self._seen),
        }
