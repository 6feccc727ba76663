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

A **feed** is one channel this node follows. It knows the last offset and epoch it
delivered, and delivers each live publication once, in offset order: a duplicate is
dropped, a gap is filled from the broker's history before anything after it, and a
channel whose history is gone continues from where the stream is (its subscribers are
told at once with a HEARTBEAT, and recover or learn of the gap as in spec section 7).

A SUBSCRIBE of a connection **joins** its channels: from the moment it is handled, live
frames of those channels are kept for the connection instead of sent; once each feed's
position and the requested history are known, the router sends the ACK, the replay (the
history, then the kept frames, up to the position in the ACK) and the connection becomes
a subscriber, in one step. Each connection's SUBSCRIBE and UNSUBSCRIBE are carried out
in the order it sent them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from ..broker import Position
from ..broker._base import Broker, BrokerError, BrokerEvent, Publication
from ..protocol import (
    Ack,
    ChannelPosition,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    Publish,
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

if TYPE_CHECKING:
    from ._router import Router, Subscriber

log = logging.getLogger("kaldrix.broker")

PUBLISH_QUEUE = 8192
"""PUBLISH commands waiting for the broker; beyond it they get ERROR UNAVAILABLE."""
PUBLISH_BATCH_EVENTS = 1000
"""Events sent to the broker in one publish_many (one round trip)."""
EARLY_LIMIT = 10_000
"""Live publications a feed keeps while it fetches what came before them; beyond it they
are dropped and fetched from history instead."""
IDLE_FEED_SECONDS = 30.0
"""A channel nobody on this node uses is followed this much longer (reconnects are cheap)."""

Answer = Callable[[Ack | ProtocolError], None]


def publication_frame(publication: Publication) -> bytes:
    """The event frame of a publication: what every node and every replay sends."""
    event = publication.event
    return event_frame(event.type, event.payload, event.id, event.timestamp, publication.channel, publication.offset, publication.epoch)


@attrs.define(eq=False)
class Feed:
    """One channel this node follows through the broker."""

    name: str
    epoch: str | None = None
    """None until the broker said where the channel stands (then the feed is established)."""
    offset: int = 0
    """The last offset delivered to this node's subscribers."""
    established: trio.Event = attrs.Factory(trio.Event)
    joining: dict[Any, list[tuple[int, str, bytes]]] = attrs.Factory(dict)
    """Connections whose SUBSCRIBE is in flight, and the live frames kept for them."""
    early: list[Publication] = attrs.Factory(list)
    """Live publications held while what comes before them is fetched."""
    fetching: bool = False
    recheck: bool = False
    idle_since: float | None = None
    moved: trio.Event | None = None
    """Set (and dropped) when the position changes; created only while someone waits."""

    def advanced(self) -> None:
        if self.moved is not None:
            self.moved.set()
            self.moved = None

    async def wait_moved(self) -> None:
        if self.moved is None:
            self.moved = trio.Event()
        await self.moved.wait()

    @property
    def position(self) -> Position:
        assert self.epoch is not None
        return Position(self.offset, self.epoch)


@attrs.define(eq=False)
class _PublishItem:
    payload: Publish
    ref: str | None
    answer: Answer | None


@attrs.define(eq=False)
class _Memberships:
    """A connection's SUBSCRIBE/UNSUBSCRIBE commands waiting behind one in flight."""

    waiting: deque[tuple[str | None, Subscribe | Unsubscribe]] = attrs.Factory(deque)
    gone: bool = False


class BrokerLink:
    """Connects one router to a shared broker engine.

    Args:
        router: the node's router; the link calls its synchronous methods.
        engine: a `Broker` (kaldrix.broker), normally the Redis engine.
        metrics: the node's Metrics.
        timeout: seconds a SUBSCRIBE may wait for the broker before ERROR UNAVAILABLE.
        join_limit: live frames kept per joining connection before it is a slow consumer.
    """

    def __init__(self, router: Router, engine: Broker, metrics: Any, *, timeout: float, join_limit: int) -> None:
        self.router = router
        self.engine = engine
        self.metrics = metrics
        self.timeout = timeout
        self.join_limit = join_limit
        self.feeds: dict[str, Feed] = {}
        self._memberships: dict[Any, _Memberships] = {}
        self._publish_in, self._publish_out = trio.open_memory_channel[_PublishItem](PUBLISH_QUEUE)
        self._nursery: trio.Nursery | None = None
        self._resynced = trio.Event()
        self._outage_logged = False
        self.counters = {"duplicatesDropped": 0, "gapsFilled": 0, "gapsLost": 0, "subscribeErrors": 0}

    @property
    def ready(self) -> bool:
        return self.engine.ready

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine and the publisher until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.engine.run, self)
            nursery.start_soon(self._publisher)
            task_status.started()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None, "BrokerLink.run is not running"
        self._nursery.start_soon(fn, *args)

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

    # -- feeds -----------------------------------------------------------------------------

    def position(self, channel: str) -> Position | None:
        """Where this node's delivery of `channel` stands (for HEARTBEAT), if it follows it.

        None while the broker is unreachable: the node cannot vouch that the channel is
        quiet, and a client whose channels go silent moves on (its watchdog resubscribes,
        gets UNAVAILABLE and reconnects, to another node if it knows one).
        """
        feed = self.feeds.get(channel)
        if feed is None or feed.epoch is None or not self.engine.ready:
            return None
        return feed.position

    def _feed(self, name: str) -> Feed:
        feed = self.feeds.get(name)
        if feed is None:
            feed = self.feeds[name] = Feed(name)
            self._spawn(self._establish, feed)
        feed.idle_since = None
        return feed

    async def _establish(self, feed: Feed) -> None:
        """Follow a channel: subscribe this node to its live stream, then learn its position.

        Subscribing first means nothing committed after the position was read is missed:
        it arrives live, and what arrived before is dropped by offset.
        """
        while self.feeds.get(feed.name) is feed:
            resynced = self._resynced
            try:
                await self.engine.subscribe(feed.name)
                position = await self.engine.position(feed.name)
            except BrokerError as exc:
                log.debug("cannot follow %s yet: %s", feed.name, exc)
                with trio.move_on_after(self.timeout):
                    await resynced.wait()
                continue
            if self.feeds.get(feed.name) is not feed:
                return
            feed.epoch, feed.offset = position.epoch, position.offset
            feed.established.set()
            self._drain_early(feed)
            return

    def on_publications(self, publications: Sequence[Publication]) -> None:
        """The engine's live delivery: one channel's publications in the order the broker
        numbered them. Several (one publish batch) reach each client in one write."""
        feed = self.feeds.get(publications[0].channel)
        if feed is None:
            return
        with self._one_write_each(len(publications) > 1):
            for publication in publications:
                if feed.epoch is None or feed.fetching:
                    self._hold(feed, publication)
                else:
                    self._take(feed, publication)

    @contextlib.contextmanager
    def _one_write_each(self, several: bool) -> Iterator[None]:
        """Hold the event frames delivered inside, and write each client's at once at the end."""
        batch = self.router.write_batch
        batch.active = several
        try:
            yield
        finally:
            if batch.active:
                for conn in batch.release():
                    self.router.drop_slow(conn)

    def _hold(self, feed: Feed, publication: Publication) -> None:
        if len(feed.early) >= EARLY_LIMIT:
            feed.early.clear()  # history has them; fetch it instead of holding more
            if feed.epoch is not None:
                self._catch_up(feed)
            return
        feed.early.append(publication)

    def _take(self, feed: Feed, publication: Publication) -> None:
        if publication.epoch == feed.epoch:
            if publication.offset <= feed.offset:
                self.counters["duplicatesDropped"] += 1
                return
            if publication.offset == feed.offset + 1:
                self._deliver(feed, publication)
                return
        elif publication.offset == 1:
            # A new epoch: the broker lost the channel's history. The event's epoch tells
            # every subscriber; the ones who held the old epoch recover or learn of the gap.
            log.warning("%s: the broker started a new epoch %s (was %s)", feed.name, publication.epoch, feed.epoch)
            self._deliver(feed, publication)
            return
        feed.early.append(publication)
        self._catch_up(feed)

    def _deliver(self, feed: Feed, publication: Publication) -> None:
        frame = publication_frame(publication)
        feed.epoch, feed.offset = publication.epoch, publication.offset
        feed.advanced()
        # Latency counts from the publishing node's acceptance (wall clocks of the nodes).
        waited = max(0.0, time.time() - publication.event.accepted_at)
        delivered = self.router.fan_out(feed.name, frame, time.monotonic() - waited)
        metrics = self.metrics
        metrics.broadcasts += 1
        metrics.deliveries += delivered
        if feed.joining:
            kept = (publication.offset, publication.epoch, frame)
            for conn, frames in list(feed.joining.items()):
                frames.append(kept)
                if len(frames) > self.join_limit:
                    self.router.drop_slow(conn)

    def _drain_early(self, feed: Feed) -> None:
        """Deliver the held publications that follow on; fetch what is missing before them."""
        early, feed.early = feed.early, []
        for index, publication in enumerate(early):
            if feed.fetching:
                feed.early.extend(early[index:])
                return
            self._take(feed, publication)

    def _catch_up(self, feed: Feed) -> None:
        """Fetch what the broker has past this feed's position (once at a time per feed)."""
        feed.recheck = True
        if not feed.fetching:
            feed.fetching = True
            self._spawn(self._fill, feed)

    async def _fill(self, feed: Feed) -> None:
        failures = 0
        try:
            while feed.recheck and self.feeds.get(feed.name) is feed:
                feed.recheck = False
                resynced = self._resynced
                try:
                    await self._fill_once(feed)
                except (BrokerError, trio.TooSlowError) as exc:
                    # Live publications stay held meanwhile; history has them too.
                    if not failures:
                        log.warning("%s: cannot fetch missed events yet (%s); retrying", feed.name, exc or "timeout")
                    failures += 1
                    feed.recheck = True
                    with trio.move_on_after(self.timeout):
                        await resynced.wait()
        finally:
            feed.fetching = False
            if self.feeds.get(feed.name) is feed:
                self._drain_early(feed)

    async def _fill_once(self, feed: Feed) -> None:
        with trio.fail_after(self.timeout * 2):
            current = await self.engine.position(feed.name)
            held = feed.position
            if current.epoch == held.epoch and current.offset <= held.offset:
                return
            since = held if current.epoch == held.epoch else Position(0, current.epoch)
            missed = await self.engine.history(feed.name, since) if since.offset < current.offset else []
        if missed is None:
            lost = current.offset - held.offset if current.epoch == held.epoch else None
            log.warning("%s: events %s after %s@%s are gone from history; continuing at %s@%s",
                        feed.name, lost if lost is not None else "of the old epoch", held.offset, held.epoch,
                        current.offset, current.epoch)
            self.counters["gapsLost"] += 1
            self._jump(feed, current)
            return
        if since.epoch != held.epoch:
            log.warning("%s: the broker started a new epoch %s (was %s)", feed.name, current.epoch, held.epoch)
            feed.epoch, feed.offset = current.epoch, 0
            if not missed:
                self._jump(feed, current)
                return
        self.counters["gapsFilled"] += 1
        with self._one_write_each(len(missed) > 1):
            for publication in missed:
                if publication.epoch == feed.epoch and publication.offset == feed.offset + 1:
                    self._deliver(feed, publication)

    def _jump(self, feed: Feed, position: Position) -> None:
        """Continue at `position`, and tell the subscribers now with a HEARTBEAT: their
        last offset does not match it, so they recover or learn of the gap."""
        feed.epoch, feed.offset = position.epoch, position.offset
        feed.advanced()
        frame = reply_frame(ReplyType.HEARTBEAT, Heartbeat(channel=feed.name, offset=position.offset, epoch=position.epoch))
        self.router.broadcast(feed.name, frame)

    def on_resync(self) -> None:
        """The engine's live stream is back: look for what every feed missed meanwhile."""
        self._resynced.set()
        self._resynced = trio.Event()
        for feed in self.feeds.values():
            if feed.epoch is not None:
                self._catch_up(feed)

    # -- memberships (SUBSCRIBE / UNSUBSCRIBE) ------------------------------------------------

    def membership(self, conn: Subscriber, ref: str | None, payload: Subscribe | Unsubscribe) -> None:
        """Carry out a SUBSCRIBE or UNSUBSCRIBE after the connection's earlier ones."""
        queued = self._memberships.get(conn)
        if queued is not None:
            queued.waiting.append((ref, payload))
            return
        if isinstance(payload, Unsubscribe):
            self.router.unsubscribe_now(conn, ref, payload)
            return
        if self._subscribe_now(conn, ref, payload):
            return
        queued = self._memberships[conn] = _Memberships()
        queued.waiting.append((ref, payload))
        self._spawn(self._memberships_task, conn, queued)

    def forget(self, conn: Subscriber) -> None:
        """The connection closed: drop what it was waiting for."""
        queued = self._memberships.pop(conn, None)
        if queued is not None:
            queued.gone = True
            queued.waiting.clear()

    def leave(self, conn: Subscriber, name: str) -> None:
        """`conn` no longer uses channel `name` (the router already removed it)."""
        feed = self.feeds.get(name)
        if feed is None:
            return
        feed.joining.pop(conn, None)
        if not feed.joining and not self.router.subscriber_count(name):
            feed.idle_since = time.monotonic()

    def _subscribe_now(self, conn: Subscriber, ref: str | None, payload: Subscribe) -> bool:
        """Handle a SUBSCRIBE at once when no broker round trip is needed: every channel
        followed already and nothing to fetch. False when it must wait."""
        since = payload.since or {}
        for name in payload.channels:
            feed = self.feeds.get(name)
            if feed is None or feed.epoch is None or feed.fetching:
                return False
            wanted = since.get(name)
            if wanted is not None and (wanted.epoch != feed.epoch or wanted.offset != feed.offset):
                return False  # history to fetch, or a client ahead of this node
        wanted_names = self.router.admit_channels(conn, ref, payload.channels)
        if wanted_names is None:
            return True
        for name in wanted_names:
            self.router.remove_member(conn, name)
            self._feed(name).joining[conn] = []
            conn.channels.add(name)
        self._complete(conn, ref, wanted_names, since, {})
        return True

    async def _memberships_task(self, conn: Subscriber, queued: _Memberships) -> None:
        try:
            while queued.waiting and not queued.gone:
                ref, payload = queued.waiting.popleft()
                if isinstance(payload, Unsubscribe):
                    self.router.unsubscribe_now(conn, ref, payload)
                else:
                    await self._subscribe(conn, ref, payload, queued)
        finally:
            if self._memberships.get(conn) is queued:
                del self._memberships[conn]

    async def _subscribe(self, conn: Subscriber, ref: str | None, payload: Subscribe, queued: _Memberships) -> None:
        names = self.router.admit_channels(conn, ref, payload.channels)
        if names is None:
            return
        held = []
        for name in names:
            if self.router.remove_member(conn, name):
                held.append(name)
            self._feed(name).joining[conn] = []
            conn.channels.add(name)
        since = payload.since or {}
        histories: dict[str, list[Publication] | None] = {}
        try:
            with trio.fail_after(self.timeout * 2):
                for name in names:
                    await self.feeds[name].established.wait()
                for name in names:
                    feed = self.feeds[name]
                    wanted = since.get(name)
                    if wanted is None:
                        continue
                    if wanted.epoch != feed.epoch or wanted.offset > feed.offset:
                        await self._reach(feed, Position(wanted.offset, wanted.epoch))
                    if wanted.epoch == feed.epoch and wanted.offset < feed.offset:
                        histories[name] = await self.engine.history(name, Position(wanted.offset, wanted.epoch))
        except (BrokerError, trio.TooSlowError) as exc:
            if not queued.gone:
                self._abandon(conn, ref, names, held, exc)
            return
        if not queued.gone:
            self._complete(conn, ref, names, since, histories)

    async def _reach(self, feed: Feed, wanted: Position) -> None:
        """A client knows a position this node has not delivered yet: when the broker's
        stream did reach it, wait until this node catches up (its live stream lags, or it
        has not seen a new epoch yet), so the client is not told of a gap it does not have."""
        current = await self.engine.position(feed.name)
        if current.epoch != wanted.epoch or current.offset < wanted.offset:
            return  # the stream never reached it (or its epoch is gone): a real gap
        self._catch_up(feed)
        while feed.epoch != wanted.epoch or feed.offset < wanted.offset:
            await feed.wait_moved()

    def _abandon(self, conn: Subscriber, ref: str | None, names: list[str], held: list[str], exc: BaseException) -> None:
        """The broker did not answer: the SUBSCRIBE takes no effect. Channels the
        connection held before get the frames kept meanwhile and stay held."""
        self.counters["subscribeErrors"] += 1
        for name in names:
            feed = self.feeds.get(name)
            kept = feed.joining.pop(conn, None) if feed is not None else None
            if name in held and kept is not None:
                if not all(self.router.send(conn, frame) for _, _, frame in kept):
                    return
                self.router.add_member(conn, name)
            else:
                conn.channels.discard(name)
                self.leave(conn, name)
        reason = "the broker did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
        error = ProtocolError(ErrorCode.UNAVAILABLE, f"cannot subscribe now, {reason}; retry", ref=ref)
        self.router.send(conn, error_frame(error))

    def _complete(
        self,
        conn: Subscriber,
        ref: str | None,
        names: list[str],
        since: dict[str, Any],
        histories: dict[str, list[Publication] | None],
    ) -> None:
        """ACK, replay, then live: one synchronous step (spec section 7.1)."""
        positions: dict[str, ChannelPosition] = {}
        replays: list[bytes] = []
        for name in names:
            feed = self.feeds[name]
            kept = feed.joining.pop(conn, None)
            assert feed.epoch is not None
            latest = feed.offset
            frames: list[bytes] = []
            recovered = False
            wanted = since.get(name)
            if wanted is not None and wanted.epoch == feed.epoch and wanted.offset <= latest:
                if wanted.offset == latest:
                    recovered = True
                else:
                    replay = _replay(wanted.offset, latest, feed.epoch, histories.get(name), kept or [])
                    recovered = replay is not None
                    frames = replay or []
            positions[name] = ChannelPosition(latest, feed.epoch, recovered, len(frames))
            replays.extend(frames)
            if kept is not None:
                self.router.add_member(conn, name)
        self.router.acknowledge_subscribe(conn, Ack(ref=ref, channels=positions), replays)

    # -- upkeep ------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Stop following channels nobody on this node used for a while."""
        horizon = now - IDLE_FEED_SECONDS
        for name, feed in list(self.feeds.items()):
            if feed.idle_since is not None and feed.idle_since <= horizon and not feed.joining:
                if self.router.subscriber_count(name):
                    feed.idle_since = None
                    continue
                del self.feeds[name]
                self._spawn(self._unfollow, name)

    async def _unfollow(self, name: str) -> None:
        try:
            await self.engine.unsubscribe(name)
        except BrokerError as exc:
            log.debug("unsubscribing %s: %s", name, exc)

    def statistics(self) -> dict[str, Any]:
        return {
            **self.engine.statistics(),
            "followedChannels": len(self.feeds),
            "waitingPublishes": self._publish_out.statistics().current_buffer_used,
            **self.counters,
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


def _replay(
    after: int, latest: int, epoch: str, history: list[Publication] | None, kept: list[tuple[int, str, bytes]]
) -> list[bytes] | None:
    """The frames of offsets after+1 .. latest, from history then the frames kept while the
    SUBSCRIBE waited; None unless they are all there, in order."""
    if history is None:
        return None
    frames: list[bytes] = []
    expected = after + 1
    for publication in history:
        if publication.offset > latest:
            break
        if publication.epoch != epoch or publication.offset != expected:
            return None
        frames.append(publication_frame(publication))
        expected += 1
    for offset, kept_epoch, frame in kept:
        if offset < expected:
            continue
        if offset > latest:
            break
        if kept_epoch != epoch or offset != expected:
            return None
        frames.append(frame)
        expected += 1
    return frames if expected == latest + 1 else None
