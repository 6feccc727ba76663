"""One task per gateway for every connection's deadlines: when to ping, when to give up
on an AUTH, when a token runs out.

A task per connection that sleeps for twenty seconds at a time costs a few KB of memory
each (task, coroutine frames, cancel scope), which with 10,000 mostly idle clients is
more than the rest of the connection. Here each connection is one entry in a timing
wheel: buckets of `RESOLUTION` seconds, a heap of the bucket keys, and one task that
sleeps until the earliest bucket is due and asks each of its connections what to do
(`Timed.on_timer`). A connection is in at most one bucket, that of its nearest deadline,
and leaves it in O(1) when it closes, so nothing here keeps a closed connection alive.

Deadlines are on trio's clock, like `trio.move_on_after`, and never fire early; they
fire at most `RESOLUTION` late, which also lets one wake-up serve many connections.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Any, Protocol

import trio

log = logging.getLogger("kaldrix.connection")

RESOLUTION = 0.025
"""Seconds per bucket: how late a deadline may fire, and how close wake-ups may come."""


class Timed(Protocol):
    """What the timers need of a connection."""

    def on_timer(self, now: float) -> float | None:
        """A deadline passed: act on it, and return the next deadline (None: no more)."""


class ConnectionTimers:
    """Deadlines of many connections, served by one task (`run`)."""

    __slots__ = ("_buckets", "_keys", "_resolution", "_wake", "_where")

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self._resolution = resolution
        self._buckets: dict[int, set[Timed]] = {}
        self._keys: list[int] = []
        """Heap of bucket keys; a key whose bucket is gone or empty is dropped when met."""
        self._where: dict[Timed, int] = {}
        self._wake: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._where)

    def schedule(self, item: Timed, deadline: float | None) -> None:
        """Call `item.on_timer` once `deadline` has passed, instead of any earlier plan."""
        self.cancel(item)
        if deadline is None:
            return
        key = math.ceil(deadline / self._resolution)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._keys, key)
        bucket.add(item)
        self._where[item] = key
        wake = self._wake
        if wake is not None and key * self._resolution < wake.deadline:
            wake.deadline = key * self._resolution

    def cancel(self, item: Timed) -> None:
        """Forget `item`'s deadline (it closed, or plans anew)."""
        key = self._where.pop(item, None)
        if key is not None:
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.discard(item)
                if not bucket:
                    del self._buckets[key]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve deadlines until cancelled."""
        task_status.started()
        while True:
            self._fire(trio.current_time())
            with trio.CancelScope(deadline=self._next_wake()) as self._wake:
                await trio.sleep_forever()
            self._wake = None

    def _next_wake(self) -> float:
        keys, buckets = self._keys, self._buckets
        while keys and keys[0] not in buckets:
            heapq.heappop(keys)
        return keys[0] * self._resolution if keys else math.inf

    def _fire(self, now: float) -> None:
        keys, buckets, where, resolution = self._keys, self._buckets, self._where, self._resolution
        while keys and keys[0] * resolution <= now:  # the same product as the wake-up's deadline
            bucket = buckets.pop(heapq.heappop(keys), None)
            if not bucket:
                continue
            for item in bucket:
                del where[item]
            for item in bucket:
                try:
                    deadline = item.on_timer(now)
                except Exception:
                    # One connection's fault must not stop every other connection's timers.
                    log.exception("a connection timer failed")
                    continue
                if deadline is not None:
                    self.schedule(item, deadline)
