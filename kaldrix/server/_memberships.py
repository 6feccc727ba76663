"""SUBSCRIBE and UNSUBSCRIBE with a shared broker: joining channels without a gap
between history and live, in the order each connection sent its commands.

A SUBSCRIBE **joins** its channels: from the moment it is handled, live frames of those
channels are kept for the connection instead of sent; once each feed's position and the
requested history are known, the router sends the ACK, the replay (the history, then the
kept frames, up to the position in the ACK) and the connection becomes a subscriber, in
one step (spec section 7.1). When nothing needs the broker (every channel followed
already, no history to fetch) that happens at once, without a task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..broker import Position
from ..broker._base import Broker, BrokerError, Publication
from ..protocol import Ack, ChannelPosition, ErrorCode, ProtocolError, Subscribe, Unsubscribe
from ._feeds import Feeds, publication_frame
from ._frames import error_frame

if TYPE_CHECKING:
    from ._router import Router, Subscriber


@attrs.define(eq=False)
class _Queued:
    """A connection's SUBSCRIBE/UNSUBSCRIBE commands waiting behind one in flight."""

    waiting: deque[tuple[str | None, Subscribe | Unsubscribe]] = attrs.Factory(deque)
    gone: bool = False


class Memberships:
    """Carries out SUBSCRIBE and UNSUBSCRIBE for every connection of a node.

    Args:
        router: the node's router.
        following: the node's feeds.
        engine: the shared broker engine (for history).
        spawn: starts a short task in the broker link's nursery.
        timeout: seconds a broker request may take; a SUBSCRIBE waits at most twice that
            before ERROR UNAVAILABLE.
    """

    def __init__(self, router: Router, following: Feeds, engine: Broker, spawn: Callable[..., None], *, timeout: float) -> None:
        self.router = router
        self.following = following
        self.engine = engine
        self._spawn = spawn
        self.timeout = timeout
        self._queues: dict[Any, _Queued] = {}
        self.subscribe_errors = 0

    def handle(self, conn: Subscriber, ref: str | None, payload: Subscribe | Unsubscribe) -> None:
        """Carry out a SUBSCRIBE or UNSUBSCRIBE after the connection's earlier ones."""
        queued = self._queues.get(conn)
        if queued is not None:
            queued.waiting.append((ref, payload))
            return
        if isinstance(payload, Unsubscribe):
            self.router.unsubscribe_now(conn, ref, payload)
            return
        if self._subscribe_now(conn, ref, payload):
            return
        queued = self._queues[conn] = _Queued()
        queued.waiting.append((ref, payload))
        self._spawn(self._carry_out, conn, queued)

    def forget(self, conn: Subscriber) -> None:
        """The connection closed: drop what it was waiting for."""
        queued = self._queues.pop(conn, None)
        if queued is not None:
            queued.gone = True
            queued.waiting.clear()

    def _subscribe_now(self, conn: Subscriber, ref: str | None, payload: Subscribe) -> bool:
        """Handle a SUBSCRIBE at once when no broker round trip is needed: every channel
        followed already and nothing to fetch. False when it must wait."""
        since = payload.since or {}
        for name in payload.channels:
            feed = self.following.feeds.get(name)
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
            self.following.follow(name).joining[conn] = []
            conn.channels.add(name)
        self._complete(conn, ref, wanted_names, since, {})
        return True

    async def _carry_out(self, conn: Subscriber, queued: _Queued) -> None:
        try:
            while queued.waiting and not queued.gone:
                ref, payload = queued.waiting.popleft()
                if isinstance(payload, Unsubscribe):
                    self.router.unsubscribe_now(conn, ref, payload)
                else:
                    await self._subscribe(conn, ref, payload, queued)
        finally:
            if self._queues.get(conn) is queued:
                del self._queues[conn]

    async def _subscribe(self, conn: Subscriber, ref: str | None, payload: Subscribe, queued: _Queued) -> None:
        names = self.router.admit_channels(conn, ref, payload.channels)
        if names is None:
            return
        held = []
        for name in names:
            if self.router.remove_member(conn, name):
                held.append(name)
            self.following.follow(name).joining[conn] = []
            conn.channels.add(name)
        since = payload.since or {}
        histories: dict[str, list[Publication] | None] = {}
        try:
            with trio.fail_after(self.timeout * 2):
                for name in names:
                    await self.following.feeds[name].established.wait()
                for name in names:
                    feed = self.following.feeds[name]
                    wanted = since.get(name)
                    if wanted is None:
                        continue
                    if wanted.epoch != feed.epoch or wanted.offset > feed.offset:
                        await self.following.reach(feed, Position(wanted.offset, wanted.epoch))
                    if wanted.epoch == feed.epoch and wanted.offset < feed.offset:
                        histories[name] = await self.engine.history(name, Position(wanted.offset, wanted.epoch))
        except (BrokerError, trio.TooSlowError) as exc:
            if not queued.gone:
                self._abandon(conn, ref, names, held, exc)
            return
        if not queued.gone:
            self._complete(conn, ref, names, since, histories)

    def _abandon(self, conn: Subscriber, ref: str | None, names: list[str], held: list[str], exc: BaseException) -> None:
        """The broker did not answer: the SUBSCRIBE takes no effect. Channels the
        connection held before get the frames kept meanwhile and stay held."""
        self.subscribe_errors += 1
        for name in names:
            feed = self.following.feeds.get(name)
            kept = feed.joining.pop(conn, None) if feed is not None else None
            if name in held and kept is not None:
                if not all(self.router.send(conn, frame) for _, _, frame in kept):
                    return
                self.router.add_member(conn, name)
            else:
                conn.channels.discard(name)
                self.following.leave(conn, name)
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
            feed = self.following.feeds[name]
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
