"""Per-channel heartbeats, and the other timer that walks the channels: history upkeep.

When a subscribed channel has carried nothing for `channel_heartbeat` seconds, each of
its subscribers gets ``HEARTBEAT {channel, offset, epoch}``. The offset is the channel's
latest, and every event up to it was queued to that subscriber before the heartbeat, so
a client whose last offset is lower knows it missed an event, and a client that hears
nothing about a channel for several intervals knows its subscription stalled.

It stays cheap with many channels: the router keeps a `ChannelClock` (one dict entry per
subscribed channel, moved to the end on every fan-out, O(1)); one task per gateway sleeps
until the quietest channel is due, encodes one frame per due channel and offers it to
that channel's subscribers through the router, which never waits. The same task sweeps
the broker, so history and dedup memory past their age bounds are dropped even on
channels nobody publishes to any more.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import Heartbeat, ReplyType
from ._frames import reply_frame

if TYPE_CHECKING:
    from ._router import Router

SWEEP_BOUNDS = (0.05, 30.0)
"""The broker sweep runs every quarter of the shorter age bound, within these seconds."""


class ChannelClock:
    """When each subscribed channel last carried a frame, the quietest first."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: OrderedDict[str, float] = OrderedDict()

    def touch(self, channel: str, now: float) -> None:
        """`channel` carried a frame (or gained its first subscriber) at `now`."""
        self._last[channel] = now
        self._last.move_to_end(channel)

    def forget(self, channel: str) -> None:
        """`channel` has no subscribers left."""
        self._last.pop(channel, None)

    def take_due(self, now: float, quiet: float) -> list[str]:
        """Remove and return the channels quiet since `now - quiet` or longer.

        A due channel comes back when its heartbeat reaches a subscriber (the fan-out
        touches it); one whose subscribers are all gone stays out.
        """
        horizon = now - quiet
        due = []
        while self._last:
            name, last = next(iter(self._last.items()))
            if last > horizon:
                break
            self._last.popitem(last=False)
            due.append(name)
        return due

    def next_due(self, quiet: float) -> float | None:
        """When the quietest channel is due, or None without channels."""
        if not self._last:
            return None
        return next(iter(self._last.values())) + quiet

    def __len__(self) -> int:
        return len(self._last)


def heartbeat_frames(router: Router, channels: list[str]) -> int:
    """Offer one HEARTBEAT frame per channel to its subscribers; returns the deliveries."""
    delivered = 0
    for name in channels:
        position = router.position(name)
        if position is None:
            continue
        frame = reply_frame(ReplyType.HEARTBEAT, Heartbeat(channel=name, offset=position.offset, epoch=position.epoch))
        delivered += router.broadcast(name, frame)
    return delivered


def sweep_interval(history_ttl: float, dedup_window: float) -> float:
    low, high = SWEEP_BOUNDS
    return max(low, min(high, min(history_ttl, dedup_window) / 4))


async def run_channel_timers(
    router: Router,
    *,
    heartbeat: float,
    sweep_every: float,
    clock: Callable[[], float] = time.monotonic,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send heartbeats on quiet channels (`heartbeat` seconds; 0: never) and sweep the
    broker every `sweep_every` seconds, until cancelled.

    Heartbeats are batched: a wake-up serves every channel due by then, and wake-ups are
    at least a tenth of the interval apart, so a heartbeat may come that much late.
    """
    task_status.started()
    channels = router.heartbeats
    next_sweep = clock() + sweep_every
    while True:
        now = clock()
        if heartbeat > 0:
            heartbeat_frames(router, channels.take_due(now, heartbeat))
        if now >= next_sweep:
            router.sweep()
            next_sweep = now + sweep_every
        wake = next_sweep
        if heartbeat > 0:
            # A channel that gains its first subscriber while we sleep is due a full
            # interval later, so sleeping at most one interval never misses it.
            due = channels.next_due(heartbeat)
            wake = min(wake, now + heartbeat if due is None else max(due, now + heartbeat / 10))
        await trio.sleep(max(0.0, wake - clock()))
