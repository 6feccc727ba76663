"""The broker interface: what a node needs from wherever its channels live.

A broker numbers each channel's events (gap-free offsets from 1 within an epoch), keeps
a bounded history to recover from, remembers event ids for idempotent publishing, and
delivers the live publications of the channels this node's clients use. The memory
engine does it inside one process; the Redis engine lets many nodes share one stream
per channel.

Both engines deliver through one path: the node registers a `BrokerHandler` with
`Broker.run`, and every live publication reaches `handler.on_publications`, whichever
engine and whichever node published it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from ._memory import Position


class BrokerError(Exception):
    """The broker refused an operation (a Redis error reply, a script failure)."""


class BrokerUnavailable(BrokerError):
    """The broker's store cannot be reached right now.

    A publish that raises it may or may not have been stored (the connection can fail
    after Redis ran the command); publishing again with the same event id is safe,
    because the dedup window turns the retry into a duplicate.
    """


@attrs.frozen(slots=True)
class BrokerEvent:
    """An event as the node accepted it, before any channel numbered it.

    `payload` is the event's payload already encoded as JSON, so every node and every
    replay shares the bytes. `accepted_at` is wall-clock seconds (time.time()) when the
    publishing node accepted the event: wall clock so that another node can measure
    delivery latency from it (as exact as the nodes' clocks agree).

    `idempotent` is False when the node made the id up (the producer sent none):
    nobody can send that id again, so no dedup entry is kept for it. It is not stored
    with the event.
    """

    type: str
    id: str
    timestamp: str
    payload: bytes
    accepted_at: float
    idempotent: bool = attrs.field(default=True, eq=False)


@attrs.frozen(slots=True)
class Publication:
    """One event as one channel numbered it."""

    channel: str
    offset: int
    epoch: str
    event: BrokerEvent


@attrs.frozen(slots=True)
class PublishOutcome:
    """The offsets an event got, per channel.

    `duplicate` is True when its id was published within the dedup window: `offsets`
    are then the ones the first publication got, and nothing was delivered again.
    """

    offsets: dict[str, int]
    duplicate: bool = False


class BrokerHandler(Protocol):
    """What a broker delivers to: the node's router.

    Both methods are called from the broker's `run` task and must not wait: the live
    stream of every channel passes through them.
    """

    def on_publications(self, publications: Sequence[Publication]) -> None:
        """Live publications of one subscribed channel, in offset order, as they arrived
        together (one publish batch): the node may write them to each client at once."""

    def on_resync(self) -> None:
        """Live delivery (re)started after an interruption.

        Publications may have been missed while it was down: compare each channel's
        position with what was delivered, and recover the difference from history.
        """


class Broker(Protocol):
    """The operations both engines implement.

    Every async operation raises `BrokerUnavailable` when the broker cannot be reached
    (at once while `ready` is False) and `BrokerError` when it refuses the operation.
    """

    @property
    def ready(self) -> bool:
        """Whether publishing and live delivery work now (for /readyz)."""

    async def run(self, handler: BrokerHandler, *, task_status: Any = ...) -> None:
        """Connect, deliver live publications to `handler` until cancelled.

        Calls `task_status.started()` once the first connection attempt is over, so a
        node whose broker is down still starts (not ready) and keeps retrying.
        """

    async def publish(self, event: BrokerEvent, channels: Sequence[str]) -> PublishOutcome:
        """Number `event` on each of `channels`, store it in history, deliver it live."""

    async def publish_many(self, batch: Sequence[tuple[BrokerEvent, Sequence[str]]]) -> list[PublishOutcome]:
        """`publish` for several events at once, in order; one round trip where possible."""

    async def position(self, channel: str) -> Position:
        """Where `channel` stands now: its latest offset (0 before any event) and epoch."""

    async def history(self, channel: str, since: Position) -> list[Publication] | None:
        """The publications after `since`, in order; None when they cannot be recovered.

        None means: another epoch, an offset beyond the channel's, or events that left
        history (trimmed by size or older than its time bound).
        """

    async def subscribe(self, channel: str) -> None:
        """Deliver `channel`'s live publications to this node from now on.

        Once it returns, every publication committed afterwards reaches the handler.
        The interest is kept even when it raises, and re-established on reconnect.
        """

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel` to this node."""

    def sweep(self) -> int:
        """Drop what is past its age bound; returns how many items were dropped."""

    def statistics(self) -> dict[str, Any]:
        """Counts for metrics and leak checks."""


@attrs.define
class BrokerCounters:
    """Numbers for metrics: plain counters the node reads when it samples.

    Latencies are seconds from a request's arrival at the broker to its result.
    """

    published: int = 0
    """Events numbered and stored (duplicates excluded)."""
    duplicates: int = 0
    publish_errors: int = 0
    """Events whose publish raised (unavailable or refused)."""
    round_trips: int = 0
    """Pipelines sent to the store (each carrying one or more requests)."""
    delivered: int = 0
    """Live publications handed to the handler."""
    reconnects: int = 0
    resyncs: int = 0
    overruns: int = 0
    """Times the node fell so far behind its live stream (MAX_LIVE_LAG) that it caught up from history."""
    publish_seconds_total: float = 0.0
    publish_seconds_max: float = 0.0
    publish_calls: int = 0

    def record_publish(self, seconds: float) -> None:
        self.publish_calls += 1
        self.publish_seconds_total += seconds
        if seconds > self.publish_seconds_max:
            self.publish_seconds_max = seconds

    def as_dict(self) -> dict[str, int | float]:
        """The counters under the camelCase names of the metrics snapshot."""
        return {_camel(name): value for name, value in attrs.asdict(self).items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)
