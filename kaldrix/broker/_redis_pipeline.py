"""Group commit for the Redis engine: every request waiting now goes in one pipeline.

A command sent on its own costs a round trip and the client's per-command work (a few
hundred microseconds here); in a pipeline it costs a few tens. So callers queue their
requests and one task sends whatever has gathered as a single pipeline, one at a time:
under load the batches grow by themselves, and when idle a request leaves at once.

Consecutive publishes merge into one script call (up to `max_events` events or
`max_bytes` of records), which also makes one Pub/Sub message per channel for all of
them. Requests run in the order they were queued, and only one pipeline is in flight,
so what a caller publishes is numbered in the order it asked, across batches.

Each pipeline starts with SCRIPT LOAD of the scripts it uses: Redis caches scripts
in memory only, and loading on the same connection first means no call of the batch
can meet an empty script cache (after a restart) while a later one succeeds.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
import trio
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import ReadOnlyError, RedisError

from ._base import BrokerCounters, BrokerError, BrokerEvent, BrokerUnavailable, Publication, PublishOutcome
from ._memory import Position
from ._records import RecordError, decode_event, encode_event
from ._redis_scripts import (
    HISTORY_SCRIPT,
    POSITION_SCRIPT,
    PUBLISH_SCRIPT,
    Keys,
    Limits,
    Script,
    publish_call,
)

log = logging.getLogger("kaldrix.broker")

_OUTAGES: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # also BusyLoadingError: Redis is loading its dataset
    ReadOnlyError,  # a replica after a failover
    TimeoutError,
    trio.TooSlowError,
    OSError,
    trio.BrokenResourceError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` (or every exception of a group) means Redis cannot be reached."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_outage(inner) for inner in exc.exceptions)
    return isinstance(exc, _OUTAGES)


@attrs.define(eq=False)
class Request:
    """One caller's wait for a result from Redis."""

    done: trio.Event = attrs.field(factory=trio.Event, init=False)
    result: Any = attrs.field(default=None, init=False)
    error: BaseException | None = attrs.field(default=None, init=False)
    arrived: float = attrs.field(factory=time.perf_counter, init=False)

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def resolve(self, result: Any) -> None:
        if not self.done.is_set():
            self.result = result
            self.done.set()

    async def outcome(self) -> Any:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


@attrs.define(eq=False)
class PublishRequest(Request):
    items: Sequence[tuple[BrokerEvent, Sequence[str]]]
    records: list[bytes] = attrs.field(init=False)
    outcomes: list[PublishOutcome | None] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.records = [encode_event(event) for event, _ in self.items]
        self.outcomes = [None] * len(self.items)


@attrs.define(eq=False)
class PositionRequest(Request):
    channel: str


@attrs.define(eq=False)
class HistoryRequest(Request):
    channel: str
    since: Position


@attrs.define(eq=False)
class _PublishCall:
    """One PUBLISH script call: events of one or more consecutive publish requests."""

    parts: list[tuple[PublishRequest, int]] = attrs.Factory(list)
    size: int = 0


_Unit = _PublishCall | PositionRequest | HistoryRequest


def _plan(batch: Sequence[Request], max_events: int, max_bytes: int) -> list[_Unit]:
    """The script calls for `batch`, in its order."""
    units: list[_Unit] = []
    current: _PublishCall | None = None
    for request in batch:
        if not isinstance(request, PublishRequest):
            current = None
            units.append(request)  # type: ignore[arg-type]
            continue
        for index, record in enumerate(request.records):
            if current is None or len(current.parts) >= max_events or current.size + len(record) > max_bytes:
                current = _PublishCall()
                units.append(current)
            current.parts.append((request, index))
            current.size += len(record)
    return units


class Pipeliner:
    """Queues requests and sends them to Redis in pipelines, one pipeline at a time.

    Args:
        keys: key names.
        limits: history and dedup bounds passed to every publish.
        counters: where round trips, publishes and errors are counted.
        timeout: seconds a pipeline may take before its requests fail as unavailable.
        max_events, max_bytes: the largest publish script call (it blocks Redis while
            it runs, so it stays short).
        max_queued: requests waiting beyond it make callers wait (backpressure).
        max_pipeline: events (other requests count one) sent in one pipeline at most,
            so a backlog drains in bounded steps, each well within `timeout`.
    """

    def __init__(
        self,
        keys: Keys,
        limits: Limits,
        counters: BrokerCounters,
        *,
        timeout: float,
        max_events: int = 256,
        max_bytes: int = 1 << 20,
        max_queued: int = 10_000,
        max_pipeline: int = 4096,
    ) -> None:
        self.keys = keys
        self.limits = limits
        self.counters = counters
        self.timeout = timeout
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_pipeline = max_pipeline
        self._send, self._receive = trio.open_memory_channel[Request](max_queued)
        self.on_outage: Any = None
        """Called with no argument when a pipeline fails for want of Redis."""

    @property
    def queued(self) -> int:
        return self._send.statistics().current_buffer_used

    async def submit(self, request: Request) -> Any:
        """Queue `request` (now, unless the queue is full) and wait for its result."""
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            await self._send.send(request)
        return await request.outcome()

    def fail_waiting(self, error: BaseException) -> None:
        """Fail every queued request (Redis is gone; nobody should wait for it)."""
        while True:
            try:
                self._receive.receive_nowait().fail(error)
            except trio.WouldBlock:
                return

    async def run(self, client: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued requests through `client` (a coredis.Redis) until cancelled."""
        task_status.started()
        receive = self._receive
        while True:
            batch = [await receive.receive()]
            cost = _cost(batch[0])
            while cost < self.max_pipeline:
                try:
                    request = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(request)
                cost += _cost(request)
            try:
                await self._execute(client, batch)
            finally:
                error = BrokerUnavailable("the Redis request was interrupted")
                for request in batch:
                    request.fail(error)

    async def _execute(self, client: Any, batch: list[Request]) -> None:
        units = _plan(batch, self.max_events, self.max_bytes)
        new_epoch = _new_epoch()
        commands: list[tuple[_Unit, Any]] = []
        try:
            with trio.fail_after(self.timeout):
                async with client.pipeline(transaction=False, raise_on_error=False, timeout=self.timeout) as pipe:
                    for script in _scripts_of(units):
                        pipe.script_load(script.source)
                    for unit in units:
                        commands.append((unit, self._queue(pipe, unit, new_epoch)))
        except Exception as exc:
            self.counters.round_trips += 1
            if not is_outage(exc):
                log.exception("a Redis pipeline failed")
                self._fail(batch, BrokerError(f"Redis refused the request: {exc}"))
                return
            self._fail(batch, BrokerUnavailable(f"Redis is unreachable: {exc}"))
            if self.on_outage is not None:
                self.on_outage()
            return
        self.counters.round_trips += 1
        for unit, command in commands:
            try:
                reply = await command
            except RedisError as exc:
                self._fail_unit(unit, BrokerUnavailable(str(exc)) if is_outage(exc) else BrokerError(str(exc)))
                continue
            try:
                self._resolve(unit, reply)
            except (RecordError, ValueError, TypeError, IndexError) as exc:
                log.exception("unexpected reply from Redis for %s", type(unit).__name__)
                self._fail_unit(unit, BrokerError(f"unexpected reply from Redis: {exc}"))

    def _queue(self, pipe: Any, unit: _Unit, new_epoch: str) -> Any:
        keys, limits = self.keys, self.limits
        if isinstance(unit, _PublishCall):
            items = []
            for request, index in unit.parts:
                event, channels = request.items[index]
                items.append((request.records[index], event.id, event.idempotent, channels))
            key_list, args = publish_call(keys, limits, new_epoch, items)
            return pipe.evalsha(PUBLISH_SCRIPT.sha, keys=key_list, args=args)
        if isinstance(unit, PositionRequest):
            key_list = [keys.meta(unit.channel), keys.history(unit.channel)]
            return pipe.evalsha(POSITION_SCRIPT.sha, keys=key_list, args=[new_epoch, limits.meta_ttl_ms])
        key_list = [keys.meta(unit.channel), keys.history(unit.channel)]
        args = [unit.since.offset, unit.since.epoch, limits.history_ttl_ms]
        return pipe.evalsha(HISTORY_SCRIPT.sha, keys=key_list, args=args)

    def _resolve(self, unit: _Unit, reply: Any) -> None:
        if isinstance(unit, _PublishCall):
            for (request, index), answer in zip(unit.parts, reply, strict=True):
                duplicate = answer[:1] == b"d"
                request.outcomes[index] = PublishOutcome(orjson.loads(answer[1:]), duplicate=duplicate)
                if duplicate:
                    self.counters.duplicates += 1
                else:
                    self.counters.published += 1
            for request in {request for request, _ in unit.parts}:
                if all(outcome is not None for outcome in request.outcomes):
                    request.resolve(request.outcomes)
        elif isinstance(unit, PositionRequest):
            epoch, offset = reply
            unit.resolve(Position(int(offset), epoch.decode()))
        else:
            unit.resolve(_publications(unit.channel, unit.since.offset, reply))

    def _fail_unit(self, unit: _Unit, error: BrokerError) -> None:
        if isinstance(unit, _PublishCall):
            self._fail([request for request, _ in unit.parts], error)
        else:
            unit.fail(error)

    def _fail(self, requests: Sequence[Request], error: BrokerError) -> None:
        for request in requests:
            if isinstance(request, PublishRequest) and not request.done.is_set():
                self.counters.publish_errors += len(request.items)
            request.fail(error)


def _cost(request: Request) -> int:
    return len(request.items) if isinstance(request, PublishRequest) else 1


def _publications(channel: str, since: int, reply: list[Any]) -> list[Publication] | None:
    if not reply:
        return None
    epoch = reply[0].decode()
    return [
        Publication(channel, since + number, epoch, decode_event(record))
        for number, record in enumerate(reply[2:], start=1)
    ]


def _scripts_of(units: list[_Unit]) -> list[Script]:
    scripts: dict[str, Script] = {}
    for unit in units:
        if isinstance(unit, _PublishCall):
            scripts[PUBLISH_SCRIPT.sha] = PUBLISH_SCRIPT
        elif isinstance(unit, PositionRequest):
            scripts[POSITION_SCRIPT.sha] = POSITION_SCRIPT
        else:
            scripts[HISTORY_SCRIPT.sha] = HISTORY_SCRIPT
    return list(scripts.values())


def _new_epoch() -> str:
    # Only used when a channel has no epoch in Redis; one per pipeline is enough,
    # since epochs are only ever compared within one channel.
    return secrets.token_hex(6)
