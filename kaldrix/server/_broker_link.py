"""The router's side of a shared broker (Redis): publishing through it, following its
channels, and subscribing clients without a gap between history and live.

With the embedded memory broker the router does everything synchronously. With a broker
shared by several nodes, offsets come from the broker, so publishing and subscribing
need a round trip the router must not wait for. The link does the waiting in its own
tasks and hands results back to the router, which stays a plain class that never awaits:

    Gateway nursery
     └─ BrokerLink.run ── link nursery
         ├─ engine.run (live publications → on_publications, reconnects → on_resync)
         ├─ publisher: batches of PUBLISH → engine.publish_many → ACK or ERROR UNAVAILABLE
         └─ short tasks: a channel's first subscription, a SUBSCRIBE's history, catch-ups

Following channels is `kaldrix.server._feeds`; SUBSCRIBE and UNSUBSCRIBE are
`kaldrix.server._memberships`; publishing is here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from ..broker import Position
from ..broker._base import Broker, BrokerError, BrokerEvent
from ..protocol import (
    Ack,
    ErrorCode,
    ProtocolError,
    Publish,
    PublishResult,
    Subscribe,
    Unsubscribe,
    channels_for,
    converter,
    new_id,
    now_timestamp,
)
from ._feeds import Feeds
from ._memberships import Memberships

if TYPE_CHECKING:
    from ._router import Router, Subscriber

log = logging.getLogger("kaldrix.broker")

PUBLISH_QUEUE = 8192
"""PUBLISH commands waiting for the broker; beyond it they get ERROR UNAVAILABLE."""
PUBLISH_BATCH_EVENTS = 1000
"""Events sent to the broker in one publish_many (one round trip)."""

Answer = Callable[[Ack | ProtocolError], None]


@attrs.define(eq=False)
class _PublishItem:
    payload: Publish
    ref: str | None
    answer: Answer | None


class BrokerLink:
    """Connects one router to a shared broker engine.

    Args:
        router: the node's router; the link calls its synchronous methods.
        engine: a `Broker` (kaldrix.broker), normally the Redis engine.
        metrics: the node's Metrics.
        timeout: seconds a broker request may take; a SUBSCRIBE waits at most twice that.
        join_limit: live frames kept per joining connection before it is a slow consumer.
    """

    def __init__(self, router: Router, engine: Broker, metrics: Any, *, timeout: float, join_limit: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.feeds = Feeds(router, engine, metrics, self._spawn, timeout=timeout, join_limit=join_limit)
        self.memberships = Memberships(router, self.feeds, engine, self._spawn, timeout=timeout)
        self._publish_in, self._publish_out = trio.open_memory_channel[_PublishItem](PUBLISH_QUEUE)
        self._nursery: trio.Nursery | None = None
        self._outage_logged = False

    @property
    def ready(self) -> bool:
        return self.engine.ready

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine (delivering to the feeds) and the publisher until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.engine.run, self.feeds)
            nursery.start_soon(self._publisher)
            task_status.started()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None, "BrokerLink.run is not running"
        self._nursery.start_soon(fn, *args)

    # -- what the router asks -------------------------------------------------------------

    def membership(self, conn: Subscriber, ref: str | None, payload: Subscribe | Unsubscribe) -> None:
        """Carry out a SUBSCRIBE or UNSUBSCRIBE after the connection's earlier ones."""
        self.memberships.handle(conn, ref, payload)

    def forget(self, conn: Subscriber) -> None:
        """The connection closed: drop what it was waiting for."""
        self.memberships.forget(conn)

    def leave(self, conn: Subscriber, name: str) -> None:
        """`conn` no longer uses channel `name` (the router already removed it)."""
        self.feeds.leave(conn, name)

    def position(self, channel: str) -> Position | None:
        """Where this node's delivery of `channel` stands (for HEARTBEAT)."""
        return self.feeds.position(channel)

    def sweep(self, now: float) -> None:
        """Stop following channels nobody on this node used for a while."""
        self.feeds.sweep(now)

    # -- publishing --------------------------------------------------------------------

    def publish(self, payload: Publish, ref: str | None, answer: Answer | None) -> None:
        """Queue a PUBLISH for the broker; `answer` gets its ACK or ERROR later."""
        try:
            self._publish_in.send_nowait(_PublishItem(payload, ref, answer))
        except trio.WouldBlock:
            if answer is not None:
                answer(ProtocolError(ErrorCode.UNAVAILABLE, "too many publishes are waiting for the broker; retry", ref=ref))

    async def _publisher(self) -> None:
        """Send queued PUBLISHes to the broker in batches, one round trip each, in order."""
        queue = self._publish_out
        async for item in queue:
            items = [item]
            events = len(item.payload.all_events)
            while events < PUBLISH_BATCH_EVENTS:
                try:
                    more = queue.receive_nowait()
                except trio.WouldBlock:
                    break
                items.append(more)
                events += len(more.payload.all_events)
            await self._publish_batch(items)

    async def _publish_batch(self, items: list[_PublishItem]) -> None:
        batch: list[tuple[BrokerEvent, list[str]]] = []
        counts: list[int] = []
        for item in items:
            events = _broker_events(item.payload)
            batch.extend(events)
            counts.append(len(events))
        try:
            outcomes = await self.engine.publish_many(batch)
        except BrokerError as exc:
            self._refuse_publishes(items, exc)
            return
        except Exception:
            log.exception("publishing to the broker failed")
            for item in items:
                self._answer(item, ProtocolError(ErrorCode.INTERNAL, "internal error", ref=item.ref))
            return
        self._outage_logged = False
        at = 0
        metrics = self.metrics
        for item, count in zip(items, counts, strict=True):
            results = []
            for (event, _), outcome in zip(batch[at : at + count], outcomes[at : at + count], strict=True):
                results.append(PublishResult(id=event.id, offsets=outcome.offsets, duplicate=outcome.duplicate))
                if outcome.duplicate:
                    metrics.duplicates += 1
                else:
                    metrics.events_published += 1
            at += count
            self._answer(item, Ack(ref=item.ref, results=results))

    def _refuse_publishes(self, items: list[_PublishItem], exc: BrokerError) -> None:
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("publishing failed, the broker is unavailable: %s", exc)
        for item in items:
            self._answer(
                item,
                ProtocolError(
                    ErrorCode.UNAVAILABLE, f"the broker is unavailable, the events may not be stored: {exc}; retry", ref=item.ref
                ),
            )

    def _answer(self, item: _PublishItem, result: Ack | ProtocolError) -> None:
        if item.answer is not None:
            item.answer(result)

    def statistics(self) -> dict[str, Any]:
        return {
            **self.engine.statistics(),
            "followedChannels": len(self.feeds.feeds),
            "waitingPublishes": self._publish_out.statistics().current_buffer_used,
            **self.feeds.counters,
            "subscribeErrors": self.memberships.subscribe_errors,
        }


def _broker_events(payload: Publish) -> list[tuple[BrokerEvent, list[str]]]:
    """Each event of a PUBLISH as the broker takes it, with the channels it goes to."""
    accepted_at = time.time()
    timestamp = now_timestamp()
    events = []
    for event in payload.all_events:
        names = [payload.channel] if payload.channel is not None else channels_for(event.type, event.payload)
        body = orjson.dumps(converter.unstructure(event.payload))
        broker_event = BrokerEvent(
            event.type.value, event.id or new_id(), timestamp, body, accepted_at, idempotent=event.id is not None
        )
        events.append((broker_event, names))
    return events
