"""The channels a node follows through a shared broker, each delivered once, in order.

A **feed** is one channel this node follows. It knows the last offset and epoch it
delivered, and delivers each live publication once, in offset order: a duplicate is
dropped, a gap is filled from the broker's history before anything after it, and a
channel whose history is gone continues from where the stream is (its subscribers are
told at once with a HEARTBEAT, and recover or learn of the gap as in spec section 7).

Feeds are the broker engine's handler (`on_publications`, `on_resync`); they hand frames
to the router, which never waits. The waiting (following a channel, fetching what was
missed) happens in short tasks of the broker link's nursery.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..broker import Position
from ..broker._base import Broker, BrokerError, Publication
from ..protocol import Heartbeat, ReplyType
from ._frames import event_frame, reply_frame

if TYPE_CHECKING:
    from ._router import Router, Subscriber

log = logging.getLogger("kaldrix.broker")

EARLY_LIMIT = 10_000
"""Live publications a feed keeps while it fetches what came before them; beyond it they
are dropped and fetched from history instead."""
IDLE_FEED_SECONDS = 30.0
"""A channel nobody on this node uses is followed this much longer (reconnects are cheap)."""


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


class Feeds:
    """Every channel this node follows, and the engine's live delivery into the router.

    Args:
        router: the node's router; feeds call its synchronous methods.
        engine: the shared broker engine.
        metrics: the node's Metrics.
        spawn: starts a short task in the broker link's nursery.
        timeout: seconds a broker request may take (a catch-up waits twice that).
        join_limit: live frames kept per joining connection before it is a slow consumer.
    """

    def __init__(
        self, router: Router, engine: Broker, metrics: Any, spawn: Callable[..., None], *, timeout: float, join_limit: int
    ) -> None:
        self.router = router
        self.engine = engine
        self.metrics = metrics
        self._spawn = spawn
        self.timeout = timeout
        self.join_limit = join_limit
        self.feeds: dict[str, Feed] = {}
        self._unfollowing: dict[str, trio.Event] = {}
        """Channels whose unsubscribe is under way (set when the feed was dropped)."""
        self._resynced = trio.Event()
        self.counters = {"duplicatesDropped": 0, "gapsFilled": 0, "gapsLost": 0}

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

    def follow(self, name: str) -> Feed:
        """The feed of `name`, following it from now on if this node did not yet."""
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
        unfollowing = self._unfollowing.get(feed.name)
        if unfollowing is not None:
            await unfollowing.wait()  # tasks start in any order: subscribe after that unsubscribe
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

    async def reach(self, feed: Feed, wanted: Position) -> None:
        """A client knows a position this node has not delivered yet: when the broker's
        stream did reach it, wait until this node catches up (its live stream lags, or it
        has not seen a new epoch yet), so the client is not told of a gap it does not have."""
        current = await self.engine.position(feed.name)
        if current.epoch != wanted.epoch or current.offset < wanted.offset:
            return  # the stream never reached it (or its epoch is gone): a real gap
        self._catch_up(feed)
        while feed.epoch != wanted.epoch or feed.offset < wanted.offset:
            await feed.wait_moved()

    def leave(self, conn: Subscriber, name: str) -> None:
        """`conn` no longer uses channel `name` (the router already removed it)."""
        feed = self.feeds.get(name)
        if feed is None:
            return
        feed.joining.pop(conn, None)
        if not feed.joining and not self.router.subscriber_count(name):
            feed.idle_since = time.monotonic()

    def sweep(self, now: float) -> None:
        """Stop following channels nobody on this node used for a while."""
        horizon = now - IDLE_FEED_SECONDS
        for name, feed in list(self.feeds.items()):
            # One still being established is left to finish: its subscribe must not end
            # after the unsubscribe.
            idle = feed.idle_since is not None and feed.idle_since <= horizon
            if idle and not feed.joining and feed.epoch is not None:
                if self.router.subscriber_count(name):
                    feed.idle_since = None
                    continue
                del self.feeds[name]
                done = self._unfollowing[name] = trio.Event()
                self._spawn(self._unfollow, name, done)

    async def _unfollow(self, name: str, done: trio.Event) -> None:
        try:
            await self.engine.unsubscribe(name)
        except BrokerError as exc:
            log.debug("unsubscribing %s: %s", name, exc)
        finally:
            done.set()
            if self._unfollowing.get(name) is done:
                del self._unfollowing[name]
