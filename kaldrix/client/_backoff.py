"""Reconnect delays: exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads the clients
of a restarted gateway evenly over the window instead of sending them back in waves.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 64


def backoff_ceiling(attempt: int, base: float, max_delay: float) -> float:
    """The longest delay before reconnect attempt `attempt` (0 for the first)."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    return min(max_delay, base * 2.0 ** min(attempt, _MAX_EXPONENT))


def backoff_delay(attempt: int, base: float, max_delay: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt `attempt`: uniform in [0, min(max_delay, base * 2**attempt)]."""
    return (rng or random).uniform(0.0, backoff_ceiling(attempt, base, max_delay))
