"""The router: the one owner of subscriptions, and the fan-out of every event.

It is a plain class (`Router.handle(request)`), driven by one trio task that reads
its inbox. It never awaits a client: each frame goes into a subscriber's bounded
outbox with `offer` (a `send_nowait`), and a subscriber whose outbox is full is
dropped as a slow consumer (close 4008; it recovers from history on reconnect).
Each event is encoded once per channel, never once per subscriber.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import orjson
import trio

if TYPE_CHECKING:
    from ._broker_link import BrokerLink

from ..broker import MemoryBroker, Position
from ..protocol import (
    Ack,
    ChannelPosition,
    CloseCode,
    Command,
    ErrorCode,
    ProtocolError,
    Publish,
    PublishedEvent,
    PublishResult,
    ReplyType,
    Subscribe,
    Unsubscribe,
    channels_for,
    converter,
    new_id,
    now_timestamp,
)
from ._frames import error_frame, event_frame, reply_frame
from ._heartbeat import ChannelClock
from ._wire import WriteBatch

log = logging.getLogger("kaldrix.router")

BATCH_REQUESTS = 32
"""Inbox requests handled before the frames they produced are written (bounds the delay)."""


class Subscriber(Protocol):
    """What the router needs of a connection."""

    session_id: str
    channels: set[str]

    def offer(self, frame: bytes, accepted_at: float) -> bool:
        """Queue a frame without waiting; False when the outbox is full or closed."""

    def offer_replay(self, frames: list[bytes]) -> bool:
        """Queue a recovery replay as one outbox item, its bytes outside outbox_max_bytes;
        False when even that does not fit."""

    def kick(self, code: int, reason: str) -> bool:
        """Close the connection soon with `code` (never waits); True the first time."""


@attrs.frozen
class RouterRequest:
    """One item of the router's inbox.

    `origin` is the connection that sent the command (None for in-process producers
    such as the simulator); `on_result` receives the ACK payload or ProtocolError of
    a PUBLISH from an in-process producer.
    """

    command: Command | None = None
    origin: Subscriber | None = None
    detach: bool = False
    on_result: Callable[[Ack | ProtocolError], None] | None = None


def _event_bytes(event_type: str, payload: bytes, event_id: str, timestamp: str, channel: str) -> Callable[[int, str], bytes]:
    """The frame builder the broker calls once it has given the event its offset."""

    def build(offset: int, epoch: str) -> bytes:
        return event_frame(event_type, payload, event_id, timestamp, channel, offset, epoch)

    return build


class Router:
    """Subscriptions, offsets and fan-out for one gateway process.

    Args:
        broker: holds offsets, epochs, history and the dedup window, in this process.
            None when a shared broker does, through `link` (set before `run`).
        metrics: counters and histograms (a kaldrix.metrics.Metrics), or None.
        max_channels_per_connection: SUBSCRIBE beyond it gets LIMIT_EXCEEDED.
    """

    def __init__(self, broker: MemoryBroker | None, metrics: Any = None, *, max_channels_per_connection: int = 256) -> None:
        self.broker = broker
        self.link: BrokerLink | None = None
        """The shared broker's side: publishing and subscribing wait for it there."""
        self.metrics = metrics
        self.max_channels_per_connection = max_channels_per_connection
        self._subscribers: dict[str, set[Subscriber]] = {}
        self.heartbeats = ChannelClock()
        self.write_batch = WriteBatch()
        """Event frames held per connection while `run` handles a batch of requests."""
        """When each subscribed channel last carried a frame (kaldrix.server._heartbeat)."""

    # -- inbox ------------------------------------------------------------------

    def handle(self, request: RouterRequest) -> None:
        """Carry out one inbox request; never raises for a client's sake."""
        origin = request.origin
        if request.detach:
            assert origin is not None
            self.detach(origin)
            return
        command = request.command
        assert command is not None
        try:
            payload = command.payload
            if self.link is not None:
                self._handle_linked(request, payload)
            elif isinstance(payload, Subscribe):
                assert origin is not None
                self._subscribe(origin, command.id, payload)
            elif isinstance(payload, Unsubscribe):
                assert origin is not None
                self.unsubscribe_now(origin, command.id, payload)
            elif isinstance(payload, Publish):
                result = self.publish(payload, ref=command.id)
                if request.on_result is not None:
                    request.on_result(result)
                elif origin is not None:
                    self._answer(origin, result)
            else:
                raise TypeError(f"router got {type(payload).__name__}")
        except Exception:
            log.exception("router failed on %s", command.type)
            error = ProtocolError(ErrorCode.INTERNAL, "internal error", ref=command.id)
            if origin is not None:
                self.send(origin, error_frame(error))
            if request.on_result is not None:
                request.on_result(error)

    def _handle_linked(self, request: RouterRequest, payload: Any) -> None:
        """With a shared broker: the link does what needs a round trip, then comes back."""
        assert self.link is not None and request.command is not None
        origin = request.origin
        ref = request.command.id
        if isinstance(payload, (Subscribe, Unsubscribe)):
            assert origin is not None
            self.link.membership(origin, ref, payload)
        elif isinstance(payload, Publish):
            answer = request.on_result
            if answer is None and origin is not None:
                answer = functools.partial(self._answer, origin)
            self.link.publish(payload, ref, answer)
        else:
            raise TypeError(f"router got {type(payload).__name__}")

    async def run(self, inbox: trio.MemoryReceiveChannel[RouterRequest], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox until it is closed or the task is cancelled."""
        task_status.started()
        batch = self.write_batch
        async for request in inbox:
            # Whatever else is already waiting is handled in the same batch, so that each
            # subscriber gets the batch's events in one write (kaldrix.server._wire.WriteBatch).
            # A request alone is written as it is fanned out: holding would only cost time.
            batch.active = inbox.statistics().current_buffer_used > 0
            try:
                self.handle(request)
                batch.active = True
                for _ in range(BATCH_REQUESTS - 1):
                    try:
                        request = inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    self.handle(request)
            finally:
                for conn in batch.release():
                    self.drop_slow(conn)

    # -- subscriptions -------------------------------------------------------------

    def admit_channels(self, conn: Subscriber, ref: str | None, channels: list[str]) -> list[str] | None:
        """The channels of a SUBSCRIBE without repeats; None (and ERROR sent) beyond the limit."""
        wanted = list(dict.fromkeys(channels))
        if len(conn.channels | set(wanted)) > self.max_channels_per_connection:
            error = ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {self.max_channels_per_connection} channels per connection",
                path="payload.channels",
                ref=ref,
            )
            self.send(conn, error_frame(error))
            return None
        return wanted

    def _subscribe(self, conn: Subscriber, ref: str | None, payload: Subscribe) -> None:
        assert self.broker is not None
        wanted = self.admit_channels(conn, ref, payload.channels)
        if wanted is None:
            return
        positions: dict[str, ChannelPosition] = {}
        replays: list[bytes] = []
        for name in wanted:
            current = self.broker.position(name)
            since = (payload.since or {}).get(name)
            frames: list[bytes] = []
            recovered = False
            if since is not None:
                replay = self.broker.replay(name, Position(since.offset, since.epoch))
                recovered = replay is not None
                frames = replay or []
            positions[name] = ChannelPosition(current.offset, current.epoch, recovered, len(frames))
            replays.extend(frames)
            self.add_member(conn, name)
        self.acknowledge_subscribe(conn, Ack(ref=ref, channels=positions), replays)

    def acknowledge_subscribe(self, conn: Subscriber, ack: Ack, replays: list[bytes]) -> None:
        """The ACK of a SUBSCRIBE, then its replay, ahead of any live event after them."""
        if self.metrics is not None:
            self.metrics.replayed += len(replays)
        if self.send(conn, reply_frame(ReplyType.ACK, ack)) and replays:
            if not conn.offer_replay(replays):
                self.drop_slow(conn)

    def add_member(self, conn: Subscriber, name: str) -> None:
        """`conn` receives `name`'s live events from now on."""
        members = self._subscribers.get(name)
        if members is None:
            members = self._subscribers[name] = set()
            self.heartbeats.touch(name, time.monotonic())
        members.add(conn)
        conn.channels.add(name)

    def remove_member(self, conn: Subscriber, name: str) -> bool:
        """Stop live events of `name` to `conn` (its channel set is left alone); True if it had them."""
        members = self._subscribers.get(name)
        if members is None or conn not in members:
            return False
        members.discard(conn)
        if not members:
            del self._subscribers[name]
            self.heartbeats.forget(name)
        return True

    def unsubscribe_now(self, conn: Subscriber, ref: str | None, payload: Unsubscribe) -> None:
        for name in payload.channels:
            self._leave(conn, name)
        self.send(conn, reply_frame(ReplyType.ACK, Ack(ref=ref)))


    def _leave(self, conn: Subscriber, name: str) -> None:
        conn.channels.discard(name)
        self.remove_member(conn, name)
        if self.link is not None:
            self.link.leave(conn, name)

    def detach(self, conn: Subscriber) -> None:
        """Forget a connection entirely (it closed)."""
        if self.link is not None:
            self.link.forget(conn)
        for name in list(conn.channels):
            self._leave(conn, name)

    def position(self, channel: str) -> Position | None:
        """Where `channel` stands for this node's subscribers (None: not known here)."""
        if self.link is not None:
            return self.link.position(channel)
        assert self.broker is not None
        return self.broker.position(channel)

    def sweep(self) -> None:
        """Drop what is past its age bound (history, dedup ids, channels no one follows)."""
        if self.broker is not None:
            self.broker.sweep()
        if self.link is not None:
            self.link.sweep(time.monotonic())

    def subscriber_count(self, channel: str | None = None) -> int:
        """Subscriptions on one channel, or in total: for metrics and leak checks."""
        if channel is not None:
            return len(self._subscribers.get(channel, ()))
        return sum(len(members) for members in self._subscribers.values())

    @property
    def channel_count(self) -> int:
        return len(self._subscribers)

    # -- publishing -------------------------------------------------------------

    def publish(self, payload: Publish, *, ref: str | None = None) -> Ack:
        """Route, number, store and fan out every event of a PUBLISH, in order."""
        started = time.monotonic()
        results: list[PublishResult] = []
        for event in payload.all_events:
            results.append(self._publish_one(event, payload.channel))
        if self.metrics is not None:
            self.metrics.record_fanout(time.monotonic() - started)
        return Ack(ref=ref, results=results)

    def _publish_one(self, event: PublishedEvent, channel: str | None) -> PublishResult:
        assert self.broker is not None
        event_id = event.id or new_id()
        if event.id is not None:
            known = self.broker.recall(event_id)
            if known is not None:
                if self.metrics is not None:
                    self.metrics.duplicates += 1
                return PublishResult(id=event_id, offsets=known, duplicate=True)
        accepted_at = time.monotonic()
        timestamp = now_timestamp()
        payload_json = orjson.dumps(converter.unstructure(event.payload))
        names = [channel] if channel is not None else channels_for(event.type, event.payload)
        offsets: dict[str, int] = {}
        delivered = 0
        for name in names:
            build = _event_bytes(event.type.value, payload_json, event_id, timestamp, name)
            offset, frame = self.broker.append(name, build, accepted_at)
            offsets[name] = offset
            delivered += self.fan_out(name, frame, accepted_at)
        if event.id is not None:  # an id the server made up can never be sent again
            self.broker.remember(event_id, offsets)
        if self.metrics is not None:
            self.metrics.events_published += 1
            self.metrics.broadcasts += len(names)
            self.metrics.deliveries += delivered
        return PublishResult(id=event_id, offsets=offsets)

    def fan_out(self, channel: str, frame: bytes, accepted_at: float) -> int:
        """Offer an event frame to every subscriber of `channel`; returns how many took it."""
        members = self._subscribers.get(channel)
        if not members:
            return 0
        self.heartbeats.touch(channel, time.monotonic())
        slow = [conn for conn in members if not conn.offer(frame, accepted_at)]
        delivered = len(members) - len(slow)
        for conn in slow:
            self.drop_slow(conn)
        return delivered

    def broadcast(self, channel: str, frame: bytes) -> int:
        """Offer a control frame (a HEARTBEAT) to every subscriber of `channel`; never waits."""
        return self.fan_out(channel, frame, 0.0)

    # -- sending --------------------------------------------------------------

    def send(self, conn: Subscriber, frame: bytes) -> bool:
        """Offer a frame to one connection; False (and it is dropped) when it cannot take it."""
        if conn.offer(frame, 0.0):
            return True
        self.drop_slow(conn)
        return False


    def _answer(self, conn: Subscriber, result: Ack | ProtocolError) -> None:
        if isinstance(result, ProtocolError):
            self.send(conn, error_frame(result))
        else:
            self.send(conn, reply_frame(ReplyType.ACK, result))

    def drop_slow(self, conn: Subscriber) -> None:
        """Close a connection that cannot keep up (4008); it recovers on reconnect."""
        self.detach(conn)
        if conn.kick(CloseCode.SLOW_CONSUMER, "slow consumer: outbox full"):
            log.warning("slow consumer %s: outbox full, closing with 4008", conn.session_id)
            if self.metrics is not None:
                self.metrics.slow_consumer_closes += 1

