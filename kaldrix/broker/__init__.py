"""Brokers: where each channel's offsets, epoch, history and dedup window live.

The memory broker is the embedded default; a node with it alone owns its channels. The
engines behind the `Broker` interface let nodes share channels: `RedisEngine` (imported
on first use: its client library is slow to import) and `MemoryEngine` (one process).
"""

from typing import TYPE_CHECKING, Any

from ._base import (
    Broker,
    BrokerError,
    BrokerEvent,
    BrokerHandler,
    BrokerUnavailable,
    Publication,
    PublishOutcome,
)
from ._memory import MemoryBroker, Position

if TYPE_CHECKING:
    from ._memory_engine import MemoryEngine
    from ._redis import RedisEngine

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerEvent",
    "BrokerHandler",
    "BrokerUnavailable",
    "MemoryBroker",
    "MemoryEngine",
    "Position",
    "Publication",
    "PublishOutcome",
    "RedisEngine",
]


def __getattr__(name: str) -> Any:
    if name == "RedisEngine":
        from ._redis import RedisEngine

        return RedisEngine
    if name == "MemoryEngine":
        from ._memory_engine import MemoryEngine

        return MemoryEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
