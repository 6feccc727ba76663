"""The Redis engine: many nodes, one ordered stream per channel.

Offsets, epochs, history and the dedup window live in Redis (see `_redis_scripts`), so
every node numbers a channel's events from the same counter and any node can recover a
client. Publishing is one Lua script call per batch of events, which numbers, stores
and announces them atomically; requests travel in pipelines (`_redis_pipeline`).

Live delivery uses Redis Pub/Sub on one connection per node, subscribed only to the
channels this node's clients use. Redis delivers a connection's messages in the order
the scripts ran, so each channel reaches the handler in offset order.

What it guarantees, and what it leaves to the node:

- After `subscribe(channel)` returns, every publication committed later reaches the
  handler, in offset order, for as long as the Pub/Sub connection lives.
- When that connection drops, `ready` turns False, calls raise `BrokerUnavailable`
  at once, and `run` reconnects with exponential backoff and full jitter. Once back it
  subscribes every channel of interest again, turns `ready` True and calls
  `handler.on_resync()` before any new publication: publications of the outage were
  not delivered and must be recovered from `history` (or reported lost, when the epoch
  changed: Redis restarted without persistence, and every channel started over at 1).
- Nothing is delivered twice by the broker: each committed publication is announced
  once, and a repeated event id is stored and announced only the first time.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import coredis
import trio
from coredis.retry import NoRetryPolicy

from ._base import BrokerCounters, BrokerEvent, BrokerHandler, BrokerUnavailable, Publication, PublishOutcome
from ._memory import Position
from ._records import RecordError, decode_live
from ._redis_pipeline import HistoryRequest, Pipeliner, PositionRequest, PublishRequest, Request, is_outage
from ._redis_scripts import Keys, Limits

log = logging.getLogger("kaldrix.broker")

MAX_LIVE_LAG = 10.0
"""Seconds a live publication may have waited (since the publishing node accepted it)
before this node counts as fallen behind: it drops what it was about to deliver and
catches up from history instead, which writes many events per client write, and the
stale messages still queued are then dropped cheaply as duplicates. At most once per
this many seconds, so clocks that disagree by more cannot cause a storm of catch-ups."""
DEFAULT_META_TTL = 30 * 24 * 3600.0
"""Seconds a channel's offset and epoch outlive its last event (then it starts over)."""


class RedisEngine:
    """A node's view of channels kept in Redis.

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS).
        prefix: prefix of every key and Pub/Sub name, so deployments can share a Redis.
        history_size, history_ttl, dedup_window: as for the memory broker.
        meta_ttl: seconds a quiet channel keeps its offset and epoch (0: forever).
        command_timeout: seconds a request may take before it fails as unavailable.
        connect_timeout: seconds to wait for a TCP connection to Redis.
        keepalive: seconds of Pub/Sub silence before it is checked with a PING.
        reconnect_base, reconnect_max: backoff bounds between reconnect attempts.
        rng: source of backoff jitter.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "kx",
        history_size: int = 1000,
        history_ttl: float = 300.0,
        dedup_window: float = 120.0,
        meta_ttl: float = DEFAULT_META_TTL,
        command_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        keepalive: float = 5.0,
        reconnect_base: float = 0.1,
        reconnect_max: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.reconnect_base = reconnect_base
        self.reconnect_max = reconnect_max
        self._rng = rng or random.Random()
        self.counters = BrokerCounters()
        self.on_latency: Callable[[str, float], None] | None = None
        """Called with ("publish" | "position" | "history", seconds) after each request."""
        limits = Limits(
            history_size=history_size,
            history_ttl_ms=int(history_ttl * 1000),
            meta_ttl_ms=int(meta_ttl * 1000),
            dedup_ms=int(dedup_window * 1000),
        )
        self._pipeliner = Pipeliner(self.keys, limits, self.counters, timeout=command_timeout)
        self._pipeliner.on_outage = self._suspect_outage
        self._ready = False
        self._client: Any = None
        self._pubsub: Any = None
        self._interest: set[str] = set()
        self._subscriptions = trio.Lock()
        self._suspect = trio.Event()
        self._sessions = 0
        self.live_lag = 0.0
        """Seconds the latest live publication had waited when this node took it."""
        self._next_overrun = 0.0

    @property
    def ready(self) -> bool:
        return self._ready

    # -- running ------------------------------------------------------------------

    async def run(self, handler: BrokerHandler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Connect to Redis and deliver live publications to `handler` until cancelled."""
        client = coredis.Redis.from_url(
            self.url,
            connect_timeout=self.connect_timeout,
            stream_timeout=self.command_timeout,
            retry_policy=NoRetryPolicy(),
            client_name="kaldrix",
        )
        try:
            async with client:
                self._client = client
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._pipeliner.run, client)
                    await nursery.start(self._live, handler)
                    task_status.started()
        finally:
            self._ready = False
            self._client = self._pubsub = None
            self._pipeliner.fail_waiting(BrokerUnavailable("the Redis broker stopped"))

    async def _live(self, handler: BrokerHandler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a Pub/Sub session up, reconnecting with backoff when it drops."""
        started = False

        def announce() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        attempt = 0
        while True:
            sessions = self._sessions
            try:
                await self._session(handler, announce)
            except BaseException as raised:
                exc = _failure_in(raised)
                if exc is None:
                    raise  # a cancellation, nothing else
                if self._sessions > sessions:
                    attempt = 0  # it was up: start the backoff over
                if not is_outage(exc):
                    log.exception("the Redis live session failed; reconnecting")
                elif attempt == 0:
                    log.warning("Redis at %s is unreachable (%s); reconnecting", self.url, _describe(exc))
            announce()
            delay = self._rng.uniform(0.0, min(self.reconnect_max, self.reconnect_base * 2.0 ** min(attempt, 32)))
            attempt += 1
            self.counters.reconnects += 1
            await trio.sleep(delay)

    async def _session(self, handler: BrokerHandler, announce: Callable[[], None]) -> None:
        """One Pub/Sub connection's life: subscribe, resync, deliver until it fails."""
        client = self._client
        pubsub_options: dict[str, Any] = {
            "retry_policy": NoRetryPolicy(),
            "ignore_subscribe_messages": True,
            "subscription_timeout": self.command_timeout,
            "max_idle_seconds": self.keepalive,
        }
        # Connecting, the handshake and subscribing must all end in time: a Redis that
        # accepts connections but never answers (stopped, half-open) is down too.
        setup = trio.CancelScope(deadline=trio.current_time() + self.command_timeout)
        try:
            with setup:
                await self._session_body(handler, announce, client, pubsub_options, setup)
            if setup.cancelled_caught:
                raise TimeoutError(f"Redis at {self.url} did not answer within {self.command_timeout}s")
        except* anyio.ClosedResourceError:
            # coredis unsubscribes on the way out; when the pool's connection closed
            # first (shutdown, or the connection dropped) there is nobody to tell.
            pass
        finally:
            self._ready = False
            self._pubsub = None

    async def _session_body(
        self,
        handler: BrokerHandler,
        announce: Callable[[], None],
        client: Any,
        pubsub_options: dict[str, Any],
        setup: trio.CancelScope,
    ) -> None:
        async with client.pubsub(**pubsub_options) as pubsub:
            await client.ping()
            async with self._subscriptions:
                self._pubsub = pubsub
                channels = sorted(self._interest)
                if channels:
                    await pubsub.subscribe(*[self.keys.live(name) for name in channels])
            setup.deadline = math.inf
            resync = self._sessions > 0 or bool(channels)
            self._sessions += 1
            self._ready = True
            self._suspect = trio.Event()
            if self._sessions > 1:
                log.info("Redis at %s is back; resubscribed %d channels", self.url, len(channels))
            if resync:
                self.counters.resyncs += 1
                try:
                    handler.on_resync()
                except Exception:
                    log.exception("the broker handler failed to resync")
            announce()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, client)
                while True:
                    message = await pubsub.get_message()
                    self._dispatch(handler, [message, *_waiting_messages(pubsub)])

    async def _watch(self, client: Any) -> None:
        """Check Redis at once when a request failed, so `ready` does not lag."""
        while True:
            await self._suspect.wait()
            self._suspect = trio.Event()
            with trio.fail_after(self.command_timeout):
                await client.ping()

    def _suspect_outage(self) -> None:
        self._suspect.set()

    def _dispatch(self, handler: BrokerHandler, messages: list[Any]) -> None:
        """Hand over what arrived, each channel's publications together and in order:
        when this node fell behind, its clients then get several events per write."""
        arrived: dict[str, list[Publication]] = {}
        for message in messages:
            if message is None or message.get("type") != "message":
                continue
            channel = self.keys.channel_of(message["channel"])
            if channel not in self._interest:
                continue  # unsubscribed while the message was on its way
            try:
                publications = decode_live(channel, message["data"])
            except RecordError:
                log.warning("dropped a malformed live message on %s", channel, exc_info=True)
                continue
            arrived.setdefault(channel, []).extend(publications)
        if not arrived:
            return
        newest = max(publications[-1].event.accepted_at for publications in arrived.values())
        self.live_lag = lag = max(0.0, time.time() - newest)
        if lag > MAX_LIVE_LAG and time.monotonic() >= self._next_overrun:
            self._next_overrun = time.monotonic() + MAX_LIVE_LAG
            self._overrun(handler, lag)
            return
        for channel, publications in arrived.items():
            try:
                handler.on_publications(publications)
            except Exception:
                log.exception("the broker handler failed on %s offsets %d-%d", channel, publications[0].offset, publications[-1].offset)
            self.counters.delivered += len(publications)

    def _overrun(self, handler: BrokerHandler, lag: float) -> None:
        """This node fell too far behind its live stream: let the handler catch up from
        history, as after a reconnect (what it was about to deliver is in history)."""
        self.counters.overruns += 1
        self.counters.resyncs += 1
        log.warning("live events from Redis reach this node %.1fs late: it fell behind; catching up from history", lag)
        try:
            handler.on_resync()
        except Exception:
            log.exception("the broker handler failed to resync")

    # -- publishing and reading ------------------------------------------------------

    async def publish(self, event: BrokerEvent, channels: Sequence[str]) -> PublishOutcome:
        return (await self.publish_many([(event, channels)]))[0]

    async def publish_many(self, batch: Sequence[tuple[BrokerEvent, Sequence[str]]]) -> list[PublishOutcome]:
        if not batch:
            return []
        if not self._ready:
            self.counters.publish_errors += len(batch)
        request = PublishRequest(list(batch))
        result: list[PublishOutcome] = await self._submit("publish", request)
        return result

    async def position(self, channel: str) -> Position:
        result: Position = await self._submit("position", PositionRequest(channel))
        return result

    async def history(self, channel: str, since: Position) -> list[Publication] | None:
        result: list[Publication] | None = await self._submit("history", HistoryRequest(channel, since))
        return result

    async def _submit(self, operation: str, request: Request) -> Any:
        if not self._ready:
            await trio.lowlevel.checkpoint()
            raise BrokerUnavailable(f"Redis at {self.url} is not connected")
        try:
            return await self._pipeliner.submit(request)
        finally:
            seconds = time.perf_counter() - request.arrived
            if operation == "publish":
                self.counters.record_publish(seconds)
            if self.on_latency is not None:
                self.on_latency(operation, seconds)

    # -- live interest ---------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        self._interest.add(channel)
        async with self._subscriptions:
            pubsub = self._pubsub
            if pubsub is None:
                raise BrokerUnavailable(f"Redis at {self.url} is not connected; {channel} follows on reconnect")
            try:
                with trio.fail_after(self.command_timeout):
                    await pubsub.subscribe(self.keys.live(channel))
            except Exception as exc:
                if not is_outage(exc):
                    raise
                raise BrokerUnavailable(f"could not subscribe to {channel}: {_describe(exc)}") from exc

    async def unsubscribe(self, channel: str) -> None:
        self._interest.discard(channel)
        async with self._subscriptions:
            pubsub = self._pubsub
            if pubsub is None:
                return
            try:
                with trio.fail_after(self.command_timeout):
                    await pubsub.unsubscribe(self.keys.live(channel))
            except Exception as exc:
                # Its messages are filtered out already, and a reconnect forgets it.
                if not is_outage(exc):
                    raise

    # -- upkeep ---------------------------------------------------------------------

    def sweep(self) -> int:
        """Nothing to do: Redis expires history and dedup ids itself."""
        return 0

    def statistics(self) -> dict[str, Any]:
        return {
            "engine": "redis",
            "ready": self._ready,
            "liveChannels": len(self._interest),
            "queued": self._pipeliner.queued,
            "liveBacklog": _backlog(self._pubsub),
            "liveLagSeconds": round(self.live_lag, 3),
            **self.counters.as_dict(),
        }


def _backlog(pubsub: Any) -> int:
    """How many live messages wait to be handled (0 when not known)."""
    stream = getattr(pubsub, "_receive_stream", None)
    statistics = getattr(stream, "statistics", None)
    return int(statistics().current_buffer_used) if statistics is not None else 0


def _waiting_messages(pubsub: Any) -> list[Any]:
    """The live messages coredis has already read and queued, taken without waiting.

    coredis reads the Pub/Sub connection eagerly into an unbounded queue and hands out one
    message per `get_message`; taking what is queued at once lets a node that fell behind
    write several events per client write. This reaches into coredis (pinned to 6.x);
    without the queue it finds, it takes nothing.
    """
    receive = getattr(getattr(pubsub, "_receive_stream", None), "receive_nowait", None)
    waiting = []
    try:
        for _ in range(_backlog(pubsub) if receive is not None else 0):
            waiting.append(receive())
    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
        pass
    return waiting


def _failure_in(raised: BaseException) -> Exception | None:
    """The failure a session ended with, or None when it was only cancelled.

    When a connection drops, coredis' own tasks can end in a group that holds the
    connection error beside the Cancelled of its internal scopes. Those Cancelled are not
    ours to pass on: trio's cancellation is level-triggered, so if an outer scope really
    was cancelled, the next checkpoint (the backoff sleep) raises it again.
    """
    if isinstance(raised, BaseExceptionGroup):
        _, rest = raised.split(trio.Cancelled)
        if rest is None:
            return None
        if isinstance(rest, Exception):  # a group of Exceptions only is an ExceptionGroup
            return rest
        raise raised
    if isinstance(raised, Exception):
        return raised
    return None


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
