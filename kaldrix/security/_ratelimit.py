"""Rate limits: a sliding window per client for handshakes, a token bucket per connection.

Both are plain objects that take the time as an argument (seconds on a monotonic clock),
so the server passes ``time.monotonic()`` and tests pass whatever instant they need.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Hashable

MAX_TRACKED_KEYS = 100_000
"""Clients a SlidingWindow remembers at once; beyond it the least recently seen are forgotten.
It bounds memory against a flood from many addresses (each one still gets its limit)."""


class SlidingWindow:
    """At most `limit` admissions per key within any `window` seconds (a sliding log).

    Only admitted events are logged, so a key costs at most `limit` timestamps, and a
    client that keeps knocking while refused does not push its own retry time further out.
    """

    def __init__(self, limit: int, window: float, *, max_keys: int = MAX_TRACKED_KEYS) -> None:
        if limit < 1 or not (math.isfinite(window) and window > 0):
            raise ValueError("a sliding window needs limit >= 1 and a positive window")
        self.limit = limit
        self.window = window
        self._max_keys = max_keys
        self._logs: dict[Hashable, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._logs)

    def acquire(self, key: Hashable, now: float) -> float:
        """Admit one event for `key` at `now` and return 0.0, or return the seconds until
        one would be admitted (the event is then not counted)."""
        log = self._recent(key, now)
        if len(log) >= self.limit:
            return max(log[0] + self.window - now, 0.0)
        log.append(now)
        return 0.0

    def count(self, key: Hashable, now: float) -> int:
        """Events admitted for `key` within the window ending at `now`."""
        log = self._logs.get(key)
        if log is None:
            return 0
        self._trim(log, now)
        return len(log)

    def forget(self, key: Hashable) -> None:
        self._logs.pop(key, None)

    def _recent(self, key: Hashable, now: float) -> deque[float]:
        log = self._logs.pop(key, None)
        if log is None:
            log = deque()
            if len(self._logs) >= self._max_keys:
                self._evict(now)
        else:
            self._trim(log, now)
        self._logs[key] = log  # re-inserted last: the dict stays ordered by last use
        return log

    def _trim(self, log: deque[float], now: float) -> None:
        # The same sum as the retry time in acquire, so a refusal always has a wait > 0.
        window = self.window
        while log and log[0] + window <= now:
            log.popleft()

    def _evict(self, now: float) -> None:
        for key in [k for k, log in self._logs.items() if not log or log[-1] + self.window <= now]:
            del self._logs[key]
        while len(self._logs) >= self._max_keys:
            del self._logs[next(iter(self._logs))]


class TokenBucket:
    """`rate` tokens a second up to `burst`; each message takes one."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise ValueError("a token bucket needs a positive rate and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Take a token at `now`; False when the bucket is empty."""
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Verdict(enum.Enum):
    """What to do with one client message."""

    ACCEPT = "accept"
    REFUSE = "refuse"
    """Drop it and answer ERROR RATE_LIMITED."""
    CLOSE = "close"
    """The client keeps flooding: close the connection with 4029."""


STRIKE_WINDOW = 10.0
"""Seconds over which refused messages are counted towards closing the connection."""


class MessageRate:
    """One connection's message budget: a token bucket, and a close when refusals pile up.

    A client that bursts now and then gets a RATE_LIMITED for the extra messages and
    carries on; one that goes on sending after `strikes` refusals within STRIKE_WINDOW
    seconds is closed, since answering its flood would cost more than reading it.
    """

    def __init__(self, rate: float, burst: int, strikes: int, now: float) -> None:
        self._bucket = TokenBucket(rate, burst, now)
        self._strikes = SlidingWindow(max(strikes, 1), STRIKE_WINDOW, max_keys=1)
        self.refused_in_a_row = 0
        """Refusals since the last accepted message: 1 marks the start of a flood."""

    def check(self, now: float) -> Verdict:
        if self._bucket.take(now):
            self.refused_in_a_row = 0
            return Verdict.ACCEPT
        self.refused_in_a_row += 1
        if self._strikes.acquire(None, now) > 0.0:
            return Verdict.CLOSE
        return Verdict.REFUSE
