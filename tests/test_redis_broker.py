"""The broker engines: one suite over memory and Redis, then what only Redis does.

Redis tests run against a real redis-server (see redis_support): one per module for
most tests, each test under its own key prefix, and a private one for the tests that
kill it.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from kaldrix.broker._base import BrokerEvent, BrokerUnavailable, Publication
from kaldrix.broker._memory import Position
from kaldrix.broker._memory_engine import MemoryEngine
from kaldrix.broker._records import RecordError, decode_live, encode_event, encode_live
from kaldrix.broker._redis import RedisEngine

from .redis_support import RedisServer, redis_binary, running_redis

TIMEOUT = 5.0
_numbers = itertools.count(1)


class Recorder:
    """The handler a node registers: keeps what the broker delivered."""

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self.resyncs = 0

    def on_publications(self, publications: Sequence[Publication]) -> None:
        self.publications.extend(publications)

    def on_resync(self) -> None:
        self.resyncs += 1

    def seen(self, channel: str) -> list[tuple[int, str]]:
        return [(p.offset, p.event.id) for p in self.publications if p.channel == channel]


class Node:
    def __init__(self, engine: Any, recorder: Recorder) -> None:
        self.engine = engine
        self.recorder = recorder


async def eventually(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


def event(event_id: str | None = None, *, height: int | None = None, event_type: str = "NEW_BLOCK") -> BrokerEvent:
    number = next(_numbers)
    return BrokerEvent(
        type=event_type,
        id=event_id or f"ev-{number}-{uuid.uuid4().hex[:8]}",
        timestamp="2025-08-07T10:00:00.000000Z",
        payload=orjson.dumps({"height": number if height is None else height, "note": "a\nb \u00e9"}),
        accepted_at=time.time(),
    )


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    with running_redis(tmp_path) as server:
        yield server


def _redis_engine(server: RedisServer, prefix: str, **settings: Any) -> RedisEngine:
    settings.setdefault("reconnect_base", 0.02)
    settings.setdefault("reconnect_max", 0.2)
    settings.setdefault("command_timeout", 2.0)
    return RedisEngine(server.url, prefix=prefix, **settings)


@pytest.fixture(params=["memory", "redis"])
async def start_node(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[StartNode]:
    """Start a node's engine of the parametrized kind inside the test's nursery."""
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    prefix = f"kx-test-{uuid.uuid4().hex[:10]}"

    async def start(**settings: Any) -> Node:
        if server is None:
            engine: Any = MemoryEngine(**settings)
        else:
            engine = _redis_engine(server, prefix, **settings)
        recorder = Recorder()
        await nursery.start(engine.run, recorder)
        assert engine.ready
        return Node(engine, recorder)

    yield start


# -- one suite over every engine ------------------------------------------------------


async def test_offsets_are_gap_free_from_one_per_channel(start_node: StartNode) -> None:
    broker = (await start_node()).engine
    first = await broker.position("blocks")
    assert first.offset == 0
    outcomes = [await broker.publish(event(), ["blocks"]) for _ in range(3)]
    assert [o.offsets for o in outcomes] == [{"blocks": 1}, {"blocks": 2}, {"blocks": 3}]
    both = await broker.publish(event(), ["blocks", "dag"])
    assert both.offsets == {"blocks": 4, "dag": 1} and not both.duplicate
    assert await broker.position("blocks") == Position(4, first.epoch)
    assert (await broker.position("dag")).offset == 1


async def test_live_delivery_only_for_subscribed_channels(start_node: StartNode) -> None:
    node = await start_node()
    broker, seen = node.engine, node.recorder
    await broker.subscribe("blocks")
    kept = event()
    await broker.publish(kept, ["blocks", "dag"])
    await broker.publish(event(), ["dag"])
    await eventually(lambda: len(seen.publications) == 1)
    (publication,) = seen.publications
    epoch = (await broker.position("blocks")).epoch
    assert publication == Publication("blocks", 1, epoch, kept)

    await broker.unsubscribe("blocks")
    await broker.publish(event(), ["blocks"])
    await broker.subscribe("dag")
    await broker.publish(event(), ["dag"])
    await eventually(lambda: len(seen.publications) == 2)
    await trio.sleep(0.05)
    assert [(p.channel, p.offset) for p in seen.publications] == [("blocks", 1), ("dag", 3)]


async def test_history_since_a_position(start_node: StartNode) -> None:
    broker = (await start_node()).engine
    events = [event() for _ in range(5)]
    for item in events:
        await broker.publish(item, ["blocks"])
    epoch = (await broker.position("blocks")).epoch
    missed = await broker.history("blocks", Position(2, epoch))
    assert missed is not None
    assert [(p.offset, p.epoch, p.event) for p in missed] == [(n + 1, epoch, events[n]) for n in range(2, 5)]
    assert await broker.history("blocks", Position(5, epoch)) == []
    assert await broker.history("blocks", Position(6, epoch)) is None
    assert await broker.history("blocks", Position(2, "another-epoch")) is None
    assert await broker.history("never-used", Position(0, "another-epoch")) is None


async def test_history_is_trimmed_by_size(start_node: StartNode) -> None:
    broker = (await start_node(history_size=3)).engine
    for _ in range(5):
        await broker.publish(event(), ["blocks"])
    epoch = (await broker.position("blocks")).epoch
    assert await broker.history("blocks", Position(1, epoch)) is None
    recent = await broker.history("blocks", Position(2, epoch))
    assert recent is not None and [p.offset for p in recent] == [3, 4, 5]


async def test_history_expires_by_age(start_node: StartNode) -> None:
    broker = (await start_node(history_ttl=0.3)).engine
    await broker.publish(event(), ["blocks"])
    epoch = (await broker.position("blocks")).epoch
    assert await broker.history("blocks", Position(0, epoch)) is not None
    await trio.sleep(0.45)
    assert await broker.history("blocks", Position(0, epoch)) is None
    assert await broker.history("blocks", Position(1, epoch)) == []


async def test_a_repeated_event_id_is_acknowledged_not_delivered(start_node: StartNode) -> None:
    node = await start_node()
    broker = node.engine
    await broker.subscribe("blocks")
    original = event("same-id")
    first = await broker.publish(original, ["blocks", "dag"])
    again = await broker.publish(event("same-id"), ["blocks"])
    assert again.duplicate and again.offsets == first.offsets == {"blocks": 1, "dag": 1}
    await eventually(lambda: len(node.recorder.publications) == 1)
    await trio.sleep(0.05)
    assert [p.event for p in node.recorder.publications] == [original]
    assert (await broker.position("blocks")).offset == 1
    batch = await broker.publish_many([(event("twice"), ["blocks"]), (event("twice"), ["blocks"])])
    assert [o.duplicate for o in batch] == [False, True]
    assert batch[0].offsets == batch[1].offsets == {"blocks": 2}


async def test_ids_the_node_made_up_are_not_kept_for_dedup(start_node: StartNode) -> None:
    broker = (await start_node()).engine
    made_up = attrs.evolve(event("made-up"), idempotent=False)
    assert (await broker.publish(made_up, ["blocks"])).offsets == {"blocks": 1}
    again = await broker.publish(made_up, ["blocks"])
    assert not again.duplicate and again.offsets == {"blocks": 2}


async def test_the_dedup_window_ends(start_node: StartNode) -> None:
    broker = (await start_node(dedup_window=0.2)).engine
    assert not (await broker.publish(event("late"), ["blocks"])).duplicate
    await trio.sleep(0.3)
    again = await broker.publish(event("late"), ["blocks"])
    assert not again.duplicate and again.offsets == {"blocks": 2}


async def test_a_batch_keeps_its_order(start_node: StartNode) -> None:
    node = await start_node()
    broker = node.engine
    await broker.subscribe("transactions")
    events = [event() for _ in range(40)]
    outcomes = await broker.publish_many([(item, ["transactions"]) for item in events])
    assert [o.offsets["transactions"] for o in outcomes] == list(range(1, 41))
    await eventually(lambda: len(node.recorder.publications) == 40)
    assert node.recorder.seen("transactions") == [(n + 1, item.id) for n, item in enumerate(events)]


# -- the record format ---------------------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_events = st.builds(
    BrokerEvent,
    type=_text,
    id=_text,
    timestamp=_text,
    payload=st.binary(max_size=200),
    accepted_at=st.floats(allow_nan=False, allow_infinity=False),
)


@given(
    epoch=st.text(alphabet="0123456789abcdef", min_size=1, max_size=16),
    numbered=st.lists(st.tuples(st.integers(1, 2**53), _events), max_size=6),
)
def test_live_messages_round_trip_whatever_the_payload(epoch: str, numbered: list[tuple[int, BrokerEvent]]) -> None:
    data = encode_live(epoch, [(offset, encode_event(item)) for offset, item in numbered])
    assert decode_live("blocks", data) == [Publication("blocks", offset, epoch, item) for offset, item in numbered]


def test_a_cut_live_message_is_refused() -> None:
    data = encode_live("e1", [(1, encode_event(event()))])
    with pytest.raises(RecordError):
        decode_live("blocks", data[:-3])
    with pytest.raises(RecordError):
        decode_live("blocks", b"no epoch line")


def test_without_redis_server_the_tests_skip_but_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KALDRIX_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run"):
        redis_binary()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        redis_binary()


# -- two nodes on one Redis ---------------------------------------------------------------


@pytest.fixture
async def start_redis_node(redis_server: RedisServer, nursery: trio.Nursery) -> StartNode:
    prefix = f"kx-test-{uuid.uuid4().hex[:10]}"

    async def start(server: RedisServer = redis_server, **settings: Any) -> Node:
        engine = _redis_engine(server, settings.pop("prefix", prefix), **settings)
        recorder = Recorder()
        await nursery.start(engine.run, recorder)
        return Node(engine, recorder)

    return start


async def test_two_nodes_share_offsets_and_the_live_stream(start_redis_node: StartNode) -> None:
    a, b = await start_redis_node(), await start_redis_node()
    await a.engine.subscribe("blocks")
    await b.engine.subscribe("blocks")
    sent = []
    for n in range(10):
        item = event()
        sent.append(item.id)
        outcome = await (a if n % 2 else b).engine.publish(item, ["blocks"])
        assert outcome.offsets == {"blocks": n + 1}
    expected = [(n + 1, event_id) for n, event_id in enumerate(sent)]
    await eventually(lambda: len(a.recorder.publications) == 10 and len(b.recorder.publications) == 10)
    assert a.recorder.seen("blocks") == b.recorder.seen("blocks") == expected
    assert await a.engine.position("blocks") == await b.engine.position("blocks")


async def test_dedup_holds_across_nodes(start_redis_node: StartNode) -> None:
    a, b = await start_redis_node(), await start_redis_node()
    first = await a.engine.publish(event("from-a"), ["alerts"])
    second = await b.engine.publish(event("from-a"), ["alerts"])
    assert second.duplicate and second.offsets == first.offsets == {"alerts": 1}


async def test_concurrent_publishers_on_two_nodes_stay_gap_free_and_ordered(start_redis_node: StartNode) -> None:
    a, b, watcher = await start_redis_node(), await start_redis_node(), await start_redis_node()
    await watcher.engine.subscribe("transactions")
    outcomes: dict[str, int] = {}

    async def publish(node: Node) -> None:
        item = event()
        outcomes[item.id] = (await node.engine.publish(item, ["transactions"])).offsets["transactions"]

    async with trio.open_nursery() as publishers:
        for n in range(200):
            publishers.start_soon(publish, a if n % 2 else b)
    assert sorted(outcomes.values()) == list(range(1, 201))
    await eventually(lambda: len(watcher.recorder.publications) == 200)
    live = watcher.recorder.seen("transactions")
    assert [offset for offset, _ in live] == list(range(1, 201))
    assert all(outcomes[event_id] == offset for offset, event_id in live)
    epoch = (await a.engine.position("transactions")).epoch
    replay = await b.engine.history("transactions", Position(0, epoch))
    assert replay is not None and [(p.offset, p.event.id) for p in replay] == live
    assert a.engine.counters.round_trips < 200  # requests were pipelined


async def test_history_is_bounded_inside_redis(start_redis_node: StartNode, redis_server: RedisServer) -> None:
    node = await start_redis_node(prefix="kx-bounds", history_size=5, history_ttl=60)
    await node.engine.publish_many([(event(), ["nodes"]) for _ in range(12)])
    assert redis_server.command("XLEN", "kx-bounds:{nodes}:history") == 5
    ttl = redis_server.command("PTTL", "kx-bounds:{nodes}:history")
    assert isinstance(ttl, int) and 0 < ttl <= 60_000
    assert redis_server.command("HGET", "kx-bounds:{nodes}:meta", "offset") == "12"


async def test_prefixes_keep_deployments_apart(start_redis_node: StartNode) -> None:
    one, other = await start_redis_node(prefix="kx-one"), await start_redis_node(prefix="kx-other")
    await one.engine.publish(event(), ["dag"])
    assert (await other.engine.position("dag")).offset == 0


# -- Redis going away ------------------------------------------------------------------------


async def test_a_redis_restart_without_persistence(start_redis_node: StartNode, private_redis: RedisServer) -> None:
    a, b = await start_redis_node(private_redis), await start_redis_node(private_redis)
    await b.engine.subscribe("blocks")
    await a.engine.publish(event(), ["blocks"])
    await a.engine.publish(event(), ["blocks"])
    before = await a.engine.position("blocks")
    await eventually(lambda: len(b.recorder.publications) == 2)

    private_redis.kill()
    await eventually(lambda: not a.engine.ready and not b.engine.ready)
    with pytest.raises(BrokerUnavailable):
        await a.engine.publish(event(), ["blocks"])
    with pytest.raises(BrokerUnavailable):
        await a.engine.position("blocks")
    with pytest.raises(BrokerUnavailable):
        await b.engine.subscribe("alerts")  # kept, and subscribed once Redis is back
    assert a.engine.counters.publish_errors == 1

    private_redis.start()
    await eventually(lambda: a.engine.ready and b.engine.ready)
    assert a.recorder.resyncs == b.recorder.resyncs == 1
    after = await a.engine.position("blocks")
    assert after.offset == 0 and after.epoch != before.epoch
    assert await a.engine.history("blocks", before) is None
    outcome = await a.engine.publish(event(), ["blocks", "alerts"])
    assert outcome.offsets == {"blocks": 1, "alerts": 1}
    await eventually(lambda: len(b.recorder.publications) == 4)
    alerts = await b.engine.position("alerts")
    assert [(p.channel, p.offset, p.epoch) for p in b.recorder.publications[2:]] == [
        ("blocks", 1, after.epoch),
        ("alerts", 1, alerts.epoch),
    ]
    assert [p.offset for p in b.recorder.publications[:2]] == [1, 2]  # nothing twice


async def test_a_node_starts_while_redis_is_down(start_redis_node: StartNode, private_redis: RedisServer) -> None:
    private_redis.kill()
    node = await start_redis_node(private_redis)  # started, not ready, retrying
    assert not node.engine.ready
    with pytest.raises(BrokerUnavailable):
        await node.engine.publish(event(), ["dag"])
    private_redis.start()
    await eventually(lambda: node.engine.ready)
    assert (await node.engine.publish(event(), ["dag"])).offsets == {"dag": 1}
    assert node.engine.statistics()["reconnects"] >= 1


async def test_a_hung_redis_is_detected_and_a_retry_is_numbered_once(
    start_redis_node: StartNode, private_redis: RedisServer
) -> None:
    node = await start_redis_node(private_redis, command_timeout=0.3)
    await node.engine.publish(event(), ["dag"])
    unsure = event("sent-while-hung")
    private_redis.pause()
    try:
        with pytest.raises(BrokerUnavailable):
            await node.engine.publish(unsure, ["dag"])
        await eventually(lambda: not node.engine.ready)
    finally:
        private_redis.resume()
    await eventually(lambda: node.engine.ready)
    # Redis may have run the publish it got before it hung: the retry, same id, says so.
    retry = await node.engine.publish(unsure, ["dag"])
    assert retry.offsets == {"dag": 2}
    assert (await node.engine.position("dag")).offset == 2
