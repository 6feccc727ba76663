"""Brokers: where each channel's offsets, epoch, history and dedup window live.

The memory broker is the embedded default; a node with it alone owns its channels.
"""

from ._memory import MemoryBroker, Position

__all__ = ["MemoryBroker", "Position"]
