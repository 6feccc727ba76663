"""The memory engine: the `Broker` interface over the in-process MemoryBroker.

Offsets, epochs, history bounds and the dedup window stay the MemoryBroker's; this
adds the live side (which channels this node wants, and the handler) so the node talks
to memory and Redis alike. Delivery is synchronous: `publish` hands each publication to
the handler before it returns, as the router's fan-out always did.

History keeps each publication as a broker record (see `_records`), the bytes the
Redis engine ships, so both engines recover through the same decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ._base import BrokerCounters, BrokerEvent, BrokerHandler, Publication, PublishOutcome
from ._memory import MemoryBroker, Position
from ._records import decode_live, encode_event, encode_live


class MemoryEngine:
    """One node's channels, in its own memory.

    Args:
        broker: the offsets, history and dedup store; a new MemoryBroker when None
            (passing a previous one keeps history across a node restart in-process).
        history_size, history_ttl, dedup_window, clock: as for MemoryBroker.
    """

    def __init__(
        self,
        broker: MemoryBroker | None = None,
        *,
        history_size: int = 1000,
        history_ttl: float = 300.0,
        dedup_window: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = broker or MemoryBroker(
            history_size=history_size, history_ttl=history_ttl, dedup_window=dedup_window, clock=clock
        )
        self._clock = clock
        self._handler: BrokerHandler | None = None
        self._interest: set[str] = set()
        self.counters = BrokerCounters()
        self.on_latency: Callable[[str, float], None] | None = None

    @property
    def ready(self) -> bool:
        return True

    async def run(self, handler: BrokerHandler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver to `handler` until cancelled; memory needs no connection."""
        self._handler = handler
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._handler = None

    # -- publishing ---------------------------------------------------------------

    async def publish(self, event: BrokerEvent, channels: Sequence[str]) -> PublishOutcome:
        await trio.lowlevel.checkpoint()
        return self._publish(event, channels)

    async def publish_many(self, batch: Sequence[tuple[BrokerEvent, Sequence[str]]]) -> list[PublishOutcome]:
        await trio.lowlevel.checkpoint()
        return [self._publish(event, channels) for event, channels in batch]

    def _publish(self, event: BrokerEvent, channels: Sequence[str]) -> PublishOutcome:
        started = time.perf_counter()
        store = self.store
        known = store.recall(event.id) if event.idempotent else None
        if known is not None:
            self.counters.duplicates += 1
            return PublishOutcome(dict(known), duplicate=True)
        record = encode_event(event)
        accepted_at = self._clock()
        offsets: dict[str, int] = {}
        live: list[Publication] = []

        def build(offset: int, epoch: str) -> bytes:
            return encode_live(epoch, [(offset, record)])

        for name in dict.fromkeys(channels):
            offset, _ = store.append(name, build, accepted_at)
            offsets[name] = offset
            if name in self._interest:
                live.append(Publication(name, offset, store.position(name).epoch, event))
        if event.idempotent:
            store.remember(event.id, offsets)
        self.counters.published += 1
        self._observe("publish", time.perf_counter() - started)
        self._deliver(live)
        return PublishOutcome(offsets)

    def _deliver(self, publications: list[Publication]) -> None:
        handler = self._handler
        if handler is None:
            return
        for publication in publications:
            handler.on_publications([publication])
        self.counters.delivered += len(publications)

    def _observe(self, operation: str, seconds: float) -> None:
        if operation == "publish":
            self.counters.record_publish(seconds)
        if self.on_latency is not None:
            self.on_latency(operation, seconds)

    # -- reading ------------------------------------------------------------------

    async def position(self, channel: str) -> Position:
        await trio.lowlevel.checkpoint()
        return self.store.position(channel)

    async def history(self, channel: str, since: Position) -> list[Publication] | None:
        await trio.lowlevel.checkpoint()
        stored = self.store.replay(channel, since)
        if stored is None:
            return None
        return [publication for data in stored for publication in decode_live(channel, data)]

    # -- live interest ------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint()
        self._interest.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        await trio.lowlevel.checkpoint()
        self._interest.discard(channel)

    # -- upkeep -------------------------------------------------------------------

    def sweep(self) -> int:
        return self.store.sweep()

    def statistics(self) -> dict[str, Any]:
        return {
            "engine": "memory",
            **self.store.statistics(),
            "liveChannels": len(self._interest),
            "ready": True,
            **self.counters.as_dict(),
        }
