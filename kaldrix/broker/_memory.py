"""The in-process broker: per-channel gap-free offsets, an epoch, and bounded history.

History holds the already-framed bytes of each event, so a replay costs no encoding.
Everything is synchronous: the router calls it from its one task and never waits.

Memory stays within bounds whatever clients do: a channel costs nothing here until its
first event (before that its position is offset 0 in the broker's own epoch, so
subscribing to a million quiet channels allocates nothing), history is cut by count on
every append and by age on every append, replay and `sweep`, and the dedup memory is cut
by age on every publish and sweep.
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
        # Every channel starts in this epoch: a channel that never had an event needs no
        # state of its own to keep its epoch stable for the clients that joined it.
        self._epoch = _new_epoch()
        self._channels: dict[str, _Channel] = {}
        self._seen: OrderedDict[str, tuple[float, dict[str, int]]] = OrderedDict()

    def position(self, name: str) -> Position:
        """Where `name` stands now (offset 0 in the broker's epoch before its first event)."""
        channel = self._channels.get(name)
        if channel is None:
            return Position(0, self._epoch)
        return Position(channel.last_offset, channel.epoch)

    def append(self, name: str, make_frame: Callable[[int, str], bytes], accepted_at: float) -> tuple[int, bytes]:
        """Give the next offset to an event, store its frame, and return both."""
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(epoch=self._epoch)
        offset = channel.last_offset + 1
        frame = make_frame(offset, channel.epoch)
        channel.last_offset = offset
        channel.events.append(_Stored(offset, frame, accepted_at))
        if len(channel.events) > self.history_size:
            channel.events.popleft()
        self._expire(channel, accepted_at)
        return offset, frame

    def _expire(self, channel: _Channel, now: float) -> int:
        horizon = now - self.history_ttl
        dropped = 0
        while channel.events and channel.events[0].accepted_at < horizon:
            channel.events.popleft()
            dropped += 1
        return dropped

    def replay(self, name: str, since: Position) -> list[bytes] | None:
        """Frames after `since`, in order, or None when history no longer covers the gap."""
        current = self.position(name)
        if since.epoch != current.epoch or since.offset > current.offset:
            return None
        if since.offset == current.offset:
            return []
        channel = self._channels[name]
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
        self._forget_old()

    def _forget_old(self) -> int:
        horizon = self._clock() - self.dedup_window
        forgotten = 0
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest[0] >= horizon:
                break
            self._seen.popitem(last=False)
            forgotten += 1
        return forgotten

    def sweep(self) -> int:
        """Drop history past `history_ttl` on every channel, and ids past the dedup window.

        Appends and replays only trim the channel they touch; a channel that went quiet
        would otherwise keep its last `history_size` frames forever. Returns how many
        events and ids were dropped.
        """
        now = self._clock()
        dropped = sum(self._expire(channel, now) for channel in self._channels.values())
        return dropped + self._forget_old()

    def statistics(self) -> dict[str, int]:
        """Counts for metrics and leak checks."""
        return {
            "channels": len(self._channels),
            "storedEvents": sum(len(c.events) for c in self._channels.values()),
            "dedupIds": len(self._seen),
        }
