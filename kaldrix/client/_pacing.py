"""Throttle and debounce for handler dispatch, as pure state machines driven by a clock.

Each stage keeps its state per key (the event type) and answers three questions:
what to release now that an item arrived (`offer`), what to release now that time
passed (`due`), and when it next needs to be asked (`deadline`). The dispatcher
sleeps until the earliest deadline, so no timer task exists per key.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

Released = list[tuple[str, Any]]


class Stage(Protocol):
    def offer(self, key: str, item: Any, now: float) -> Released: ...

    def due(self, now: float) -> Released: ...

    def deadline(self) -> float: ...

    def flush(self) -> Released: ...


class Throttle:
    """At most one item per `interval` per key: the first at once (leading edge), then the
    latest of the window when it ends (trailing edge), which opens the next window."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._window_end: dict[str, float] = {}
        self._pending: dict[str, Any] = {}

    def offer(self, key: str, item: Any, now: float) -> Released:
        end = self._window_end.get(key)
        if end is None or now >= end:
            self._window_end[key] = now + self.interval
            return [(key, item)]
        self._pending[key] = item
        return []

    def due(self, now: float) -> Released:
        released = []
        for key in [k for k in self._pending if self._window_end[k] <= now]:
            released.append((key, self._pending.pop(key)))
            self._window_end[key] = now + self.interval
        return released

    def deadline(self) -> float:
        return min((self._window_end[key] for key in self._pending), default=math.inf)

    def flush(self) -> Released:
        released = list(self._pending.items())
        self._pending.clear()
        return released


class Debounce:
    """Only the last item of a burst per key, once the key was quiet for `wait`."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._pending: dict[str, tuple[float, Any]] = {}

    def offer(self, key: str, item: Any, now: float) -> Released:
        self._pending.pop(key, None)  # re-insert: keeps release order by quiet time
        self._pending[key] = (now + self.wait, item)
        return []

    def due(self, now: float) -> Released:
        ready = [key for key, (at, _) in self._pending.items() if at <= now]
        return [(key, self._pending.pop(key)[1]) for key in ready]

    def deadline(self) -> float:
        return min((at for at, _ in self._pending.values()), default=math.inf)

    def flush(self) -> Released:
        released = [(key, item) for key, (_, item) in self._pending.items()]
        self._pending.clear()
        return released


class Pacer:
    """Stages in a chain: what one releases is offered to the next. No stage: pass-through."""

    def __init__(self, *stages: Stage) -> None:
        self.stages = stages

    @classmethod
    def from_settings(
        cls, *, throttle: float | None = None, debounce: float | None = None
    ) -> Pacer:
        stages: list[Stage] = []
        if debounce is not None:
            stages.append(Debounce(debounce))
        if throttle is not None:
            stages.append(Throttle(throttle))
        return cls(*stages)

    def offer(self, key: str, item: Any, now: float) -> list[Any]:
        pairs: Released = [(key, item)]
        for stage in self.stages:
            pairs = [out for k, i in pairs for out in stage.offer(k, i, now)]
        return [i for _, i in pairs]

    def due(self, now: float) -> list[Any]:
        pairs: Released = []
        for stage in self.stages:
            # A stage's own overdue items are older than what earlier stages release now.
            pairs = stage.due(now) + [out for k, i in pairs for out in stage.offer(k, i, now)]
        return [i for _, i in pairs]

    def deadline(self) -> float:
        return min((stage.deadline() for stage in self.stages), default=math.inf)

    def flush(self) -> list[Any]:
        """Everything still held, oldest first (used when the stream ends)."""
        return [i for stage in reversed(self.stages) for _, i in stage.flush()]
