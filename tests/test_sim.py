"""The simulated chain: every invariant a subscriber could cross-check, over long spans."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from kaldrix.protocol import (
    Envelope,
    EventType,
    NodeState,
    ValidatorEventType,
    converter,
    decode_message,
    parse_timestamp,
)
from kaldrix.sim import ChainSimulator, run_simulator
from kaldrix.sim._chain import ACCOUNTS, GENESIS_HASH, NODE_REPORT_INTERVAL, REGIONS, block_hash

WALL_START = datetime(2025, 8, 7, 10, 0, tzinfo=UTC)
HEX64 = re.compile(r"^0x[0-9a-f]{64}$")
ADDRESS = re.compile(r"^0x[0-9a-f]{40}$")
DECIMAL = re.compile(r"^(0|[1-9][0-9]*)(\.[0-9]+)?$")
HEX = re.compile(r"^0x[0-9a-f]+$")


def run_chain(seconds: float, *, step: float = 0.5, start: float = 1000.0, **options: Any) -> list[Envelope]:
    """Advance a simulator over `seconds` of fake monotonic time (instant: it is sans-IO)."""
    options.setdefault("wall_start", WALL_START)
    simulator = ChainSimulator(**options)
    events: list[Envelope] = []
    steps = round(seconds / step)
    for k in range(steps + 1):
        events += simulator.advance(start + k * step)
    return events


def moment(event: Envelope) -> datetime:
    """When the event happened on the chain (its payload time)."""
    payload = event.payload
    return parse_timestamp(payload.last_update if event.type == EventType.NODE_STATUS else payload.timestamp)


def of(events: list[Envelope], event_type: EventType) -> list[Any]:
    return [event.payload for event in events if event.type == event_type]


@pytest.fixture(scope="module")
def chain() -> list[Envelope]:
    """Ten minutes of chain at the natural pace."""
    return run_chain(600, seed=7)


# -- invariant checks, shared by the natural pace, rate mode and any seed ---------------


def check_order(events: list[Envelope]) -> None:
    times = [moment(event) for event in events]
    assert times == sorted(times)
    assert times[0] == WALL_START


def check_blocks(events: list[Envelope], block_interval: float) -> None:
    blocks = of(events, EventType.NEW_BLOCK)
    assert [block.height for block in blocks] == list(range(1, len(blocks) + 1))
    previous = GENESIS_HASH
    active: set[str] = set()
    for event in events:
        payload = event.payload
        if event.type == EventType.VALIDATOR_EVENT and payload.event_type == ValidatorEventType.JOINED:
            active.add(payload.validator_id)
        elif event.type == EventType.VALIDATOR_EVENT and payload.event_type == ValidatorEventType.LEFT:
            active.discard(payload.validator_id)
        elif event.type == EventType.NEW_BLOCK:
            assert HEX64.match(payload.hash)
            assert payload.previous_hash == previous
            assert payload.hash == block_hash(payload.height, previous, [tx.tx_id for tx in payload.transactions])
            assert payload.block_id
            assert payload.validator in active
            assert HEX.match(payload.signature)
            assert payload.size > 0
            assert 0 <= payload.gas_used <= payload.gas_limit
            assert payload.gas_used >= 21_000 * len(payload.transactions)
            previous = payload.hash
    gaps = {parse_timestamp(b.timestamp) - parse_timestamp(a.timestamp) for a, b in itertools.pairwise(blocks)}
    for gap in gaps:
        assert abs(gap - timedelta(seconds=block_interval)) < timedelta(milliseconds=1)
    assert abs(parse_timestamp(blocks[0].timestamp) - WALL_START - timedelta(seconds=block_interval)) < timedelta(milliseconds=1)


def check_transactions(events: list[Envelope]) -> None:
    pending: dict[str, Any] = {}
    resolved: dict[str, str] = {}
    in_blocks: Counter[str] = Counter()
    nonces: dict[str, list[int]] = defaultdict(list)
    for event in events:
        payload = event.payload
        if event.type == EventType.NEW_BLOCK:
            for tx in payload.transactions:
                assert tx.status == "confirmed"
                assert tx.tx_id in pending and tx.tx_id not in resolved, "a block holds only pending transactions"
                in_blocks[tx.tx_id] += 1
        elif event.type == EventType.TX_RECEIVED:
            assert ADDRESS.match(payload.from_) and ADDRESS.match(payload.to)
            assert payload.from_ in ACCOUNTS and payload.to in ACCOUNTS and payload.from_ != payload.to
            assert DECIMAL.match(payload.amount) and DECIMAL.match(payload.gas_price)
            assert payload.gas_limit >= 21_000
            assert HEX64.match(payload.tx_id)
            if payload.status == "pending":
                assert payload.tx_id not in pending
                pending[payload.tx_id] = payload
                nonces[payload.from_].append(payload.nonce)
                continue
            assert payload.tx_id in pending, "an outcome follows a pending announcement"
            assert payload.tx_id not in resolved, "a transaction is resolved once"
            first = pending[payload.tx_id]
            assert (payload.from_, payload.to, payload.amount, payload.nonce) == (first.from_, first.to, first.amount, first.nonce)
            resolved[payload.tx_id] = payload.status
            if payload.status == "confirmed":
                assert in_blocks[payload.tx_id] == 1, "confirmed after its block, in exactly one block"
            else:
                assert payload.status == "failed"
                assert in_blocks[payload.tx_id] == 0
    assert all(count == 1 for count in in_blocks.values())
    assert set(in_blocks) == {tx for tx, status in resolved.items() if status == "confirmed"}
    for sender, seen in nonces.items():
        assert seen == list(range(len(seen))), sender
    block_times = [parse_timestamp(block.timestamp) for block in of(events, EventType.NEW_BLOCK)]
    for tx_id, tx in pending.items():
        if tx_id not in resolved:
            assert parse_timestamp(tx.timestamp) > block_times[-2], "the chain keeps up: no transaction waits two blocks"


def check_dag(events: list[Envelope]) -> None:
    parents: dict[str, list[str]] = {}
    children: Counter[str] = Counter()
    layers: dict[str, int] = {}
    weights: dict[str, float] = {}
    order: dict[str, int] = {}
    for update in of(events, EventType.DAG_UPDATE):
        node, related, meta = update.node_id, update.related_nodes, update.metadata
        if update.update_type == "NODE_ADDED":
            assert node not in parents
            assert all(other in parents for other in related), "only earlier nodes are referenced"
            assert len(set(related)) == len(related)
            assert bool(related) == bool(parents), "only the first node has no parents"
            parents[node] = list(related)
            order[node] = len(order)
            for other in related:
                children[other] += 1
            layers[node] = 1 + max((layers[other] for other in related), default=-1)
            weights[node] = meta.weight
            assert meta.parent_count == len(related) and meta.child_count == 0
        elif update.update_type == "EDGE_ADDED":
            (target,) = related
            assert node in parents and target in parents
            assert target not in parents[node]
            assert order[target] < order[node], "edges point to older nodes"
            assert layers[target] < layers[node]
            parents[node].append(target)
            children[target] += 1
        else:
            assert update.update_type == "PATH_UPDATED"
            path = [node, *related]
            for child, parent in itertools.pairwise(path):
                assert parent in parents[child]
                assert layers[parent] == layers[child] - 1
        assert meta.layer == layers[node]
        assert meta.weight == weights[node] > 0
        assert meta.parent_count == len(parents[node])
        assert meta.child_count == children[node]


def check_validators(events: list[Envelope], validators: int) -> None:
    stakes: dict[str, int] = {}
    left: set[str] = set()
    height = 0
    votes: set[tuple[str, int]] = set()
    proposer_of: dict[int, str] = {}
    for event in events:
        payload = event.payload
        if event.type == EventType.NEW_BLOCK:
            height = payload.height
            assert proposer_of[height] == payload.validator
            assert len(stakes) == validators, "churn keeps the set's size"
            continue
        if event.type != EventType.VALIDATOR_EVENT:
            continue
        kind, who, stake = payload.event_type, payload.validator_id, int(payload.stake)
        assert DECIMAL.match(payload.stake) and payload.metadata is not None
        assert payload.block_height is not None and who not in left
        if kind == ValidatorEventType.JOINED:
            assert who not in stakes
        else:
            assert who in stakes
        if kind == ValidatorEventType.PROPOSED:
            assert payload.block_height == height + 1
            proposer_of[payload.block_height] = who
        elif kind == ValidatorEventType.VOTED:
            assert payload.block_height == height + 1 and proposer_of[payload.block_height] != who
            assert (who, payload.block_height) not in votes
            votes.add((who, payload.block_height))
        elif kind == ValidatorEventType.REWARDED:
            assert DECIMAL.match(payload.reward) and stake == stakes[who] + int(payload.reward) > stakes[who]
        elif kind == ValidatorEventType.SLASHED:
            assert DECIMAL.match(payload.penalty) and stake == stakes[who] - int(payload.penalty) < stakes[who]
        else:
            assert kind in (ValidatorEventType.JOINED, ValidatorEventType.LEFT)
            assert stake == stakes.get(who, stake) > 0
            assert payload.block_height == height
        if kind == ValidatorEventType.LEFT:
            del stakes[who]
            left.add(who)
        else:
            stakes[who] = stake
    joined_at_start = [
        e.payload for e in events
        if e.type == EventType.VALIDATOR_EVENT and moment(e) == WALL_START
    ]
    assert len(joined_at_start) == validators
    assert all(p.event_type == ValidatorEventType.JOINED and p.block_height == 0 for p in joined_at_start)


def check_nodes(events: list[Envelope], nodes: int) -> None:
    last: dict[str, Any] = {}
    height = 0
    offline_alert_due: str | None = None
    for event in events:
        payload = event.payload
        if offline_alert_due is not None:
            assert event.type == EventType.ALERT_TRIGGERED, "an alert comes with the OFFLINE report"
            assert (payload.type, payload.severity, payload.source) == ("node_offline", "critical", offline_alert_due)
            assert offline_alert_due in payload.message
            offline_alert_due = None
            continue
        if event.type == EventType.NEW_BLOCK:
            height = payload.height
        if event.type == EventType.ALERT_TRIGGERED:
            assert payload.type == "node_recovered" and last[payload.source].status == NodeState.SYNCING
        if event.type != EventType.NODE_STATUS:
            continue
        node, previous = payload.node_id, last.get(payload.node_id)
        assert payload.region in REGIONS and payload.version
        if payload.status == NodeState.OFFLINE:
            assert previous is not None and previous.status != NodeState.OFFLINE
            offline_alert_due = node
        else:
            assert payload.peers > 0 and payload.memory_usage > 0
            assert 0 < payload.cpu_usage <= 100 and payload.network_latency > 0
            assert payload.block_height <= height
            if payload.status == NodeState.ONLINE:
                assert payload.block_height >= height - 1, "an online node tracks the chain"
            else:
                assert payload.status == NodeState.SYNCING
            if previous is None:
                pass
            elif previous.status == NodeState.OFFLINE:
                assert payload.status == NodeState.SYNCING, "back from offline, a node syncs first"
            else:
                assert payload.uptime >= previous.uptime
                gap = parse_timestamp(payload.last_update) - parse_timestamp(previous.last_update)
                assert gap <= timedelta(seconds=NODE_REPORT_INTERVAL + 0.001)
                if gap >= timedelta(seconds=1):
                    assert payload.uptime > previous.uptime
        last[node] = payload
    assert offline_alert_due is None
    assert len(last) == nodes


def check_all(events: list[Envelope], *, block_interval: float = 2.0, validators: int = 7, nodes: int = 5) -> None:
    check_order(events)
    check_blocks(events, block_interval)
    check_transactions(events)
    check_dag(events)
    check_validators(events, validators)
    check_nodes(events, nodes)


# -- the natural pace ---------------------------------------------------------------


def test_a_long_chain_keeps_every_invariant(chain: list[Envelope]) -> None:
    check_all(chain)
    assert len(of(chain, EventType.NEW_BLOCK)) == 300
    outcomes = Counter(tx.status for tx in of(chain, EventType.TX_RECEIVED) if tx.status != "pending")
    assert outcomes["confirmed"] > 10 * outcomes["failed"] > 0, "a few transactions fail"


def test_every_kind_of_event_appears(chain: list[Envelope]) -> None:
    kinds = Counter()
    for event in chain:
        payload = event.payload
        detail = {
            EventType.DAG_UPDATE: lambda p: p.update_type,
            EventType.VALIDATOR_EVENT: lambda p: p.event_type,
            EventType.TX_RECEIVED: lambda p: p.status,
            EventType.NODE_STATUS: lambda p: p.status,
            EventType.ALERT_TRIGGERED: lambda p: p.type,
        }.get(EventType(event.type), lambda p: "")(payload)
        kinds[event.type, str(detail)] += 1
    assert set(kinds) >= {
        ("NEW_BLOCK", ""),
        ("TX_RECEIVED", "pending"), ("TX_RECEIVED", "confirmed"), ("TX_RECEIVED", "failed"),
        ("DAG_UPDATE", "NODE_ADDED"), ("DAG_UPDATE", "EDGE_ADDED"), ("DAG_UPDATE", "PATH_UPDATED"),
        *(("VALIDATOR_EVENT", kind.value) for kind in ValidatorEventType),
        ("NODE_STATUS", "ONLINE"), ("NODE_STATUS", "SYNCING"), ("NODE_STATUS", "OFFLINE"),
        ("ALERT_TRIGGERED", "node_offline"),
    }


def test_blocks_carry_transactions_and_addresses_repeat(chain: list[Envelope]) -> None:
    blocks = of(chain, EventType.NEW_BLOCK)
    assert sum(len(block.transactions) for block in blocks) > len(blocks)
    senders = Counter(tx.from_ for tx in of(chain, EventType.TX_RECEIVED) if tx.status == "pending")
    assert senders.most_common(1)[0][1] >= 20, "busy addresses give their channels steady traffic"


def test_every_event_decodes_back_unchanged(chain: list[Envelope]) -> None:
    for event in chain:
        assert decode_message(event.encode()) == event


def test_the_same_seed_gives_the_same_chain_however_it_is_polled() -> None:
    def payloads(events: list[Envelope]) -> list[tuple[str, Any]]:
        return [(event.type, converter.unstructure(event.payload)) for event in events]

    steady = run_chain(120, seed=3, step=0.5)
    simulator = ChainSimulator(seed=3, wall_start=WALL_START)
    jittery: list[Envelope] = []
    now, pace = 50.0, random.Random(0)
    while now <= 170.0:
        jittery += simulator.advance(now)
        now += pace.choice((0.01, 0.3, 1.7, 4.0))
    jittery += simulator.advance(170.0)
    assert payloads(steady) == payloads(jittery)
    assert payloads(run_chain(120, seed=4)) != payloads(steady)
    assert len({event.id for event in steady}) == len(steady), "message ids stay unique"


def test_time_never_runs_backwards() -> None:
    simulator = ChainSimulator(seed=1)
    assert simulator.advance(10.0)
    assert simulator.advance(30.0)
    assert simulator.advance(20.0) == []
    assert simulator.advance(30.0) == []


@pytest.mark.parametrize(
    "options",
    [{"block_interval": 0}, {"rate": -1}, {"validators": 0}, {"nodes": 0}],
)
def test_impossible_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChainSimulator(**options)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    block_interval=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    validators=st.integers(1, 9),
    nodes=st.integers(1, 6),
)
def test_any_seed_and_shape_keeps_every_invariant(seed: int, block_interval: float, validators: int, nodes: int) -> None:
    events = run_chain(120, seed=seed, block_interval=block_interval, validators=validators, nodes=nodes)
    check_all(events, block_interval=block_interval, validators=validators, nodes=nodes)


# -- rate mode ----------------------------------------------------------------------


def test_rate_mode_fills_to_the_rate_evenly_and_keeps_every_invariant() -> None:
    rate, seconds = 200.0, 40
    events = run_chain(seconds, seed=11, rate=rate)
    check_all(events)
    assert len(events) / seconds == pytest.approx(rate, rel=0.1)
    kinds = Counter(event.type for event in events)
    assert kinds["TX_RECEIVED"] + kinds["DAG_UPDATE"] > 0.8 * len(events)
    windows = Counter(int((moment(event) - WALL_START).total_seconds() // 4) for event in events)
    for window in range(1, seconds // 4):
        assert windows[window] == pytest.approx(4 * rate, rel=0.3), window
    pending = [moment(e) for e in events if e.type == EventType.TX_RECEIVED and e.payload.status == "pending"]
    per_second = Counter(int((t - WALL_START).total_seconds()) for t in pending)
    assert min(per_second[s] for s in range(seconds)) > 0.5 * len(pending) / seconds


def test_a_rate_below_the_natural_pace_adds_nothing() -> None:
    def payloads(events: list[Envelope]) -> list[tuple[str, Any]]:
        return [(event.type, converter.unstructure(event.payload)) for event in events]

    assert payloads(run_chain(60, seed=5, rate=0.5)) == payloads(run_chain(60, seed=5))


# -- the trio runner ----------------------------------------------------------------


async def test_runner_publishes_the_chain_in_order(autojump_clock: trio.testing.MockClock) -> None:
    batches: list[tuple[float, list[Envelope]]] = []

    async def publish(events: list[Envelope]) -> None:
        batches.append((trio.current_time(), events))
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        started_at = trio.current_time()
        await nursery.start(lambda task_status: run_simulator(publish, seed=9, task_status=task_status))
        await trio.sleep(61)
        nursery.cancel_scope.cancel()

    assert all(events for _, events in batches)
    assert [at for at, _ in batches] == sorted(at for at, _ in batches)
    events = [event for _, events in batches for event in events]
    times = [moment(event) for event in events]
    assert times == sorted(times)
    heights = [block.height for block in of(events, EventType.NEW_BLOCK)]
    assert heights == list(range(1, 31))
    for at, batch in batches:
        for block in of(batch, EventType.NEW_BLOCK):
            due = started_at + 2.0 * block.height
            assert due <= at < due + 0.1 + 1e-6, "a block is published within one tick of its time"
    assert {event.type for event in events} >= {"NEW_BLOCK", "TX_RECEIVED", "DAG_UPDATE", "VALIDATOR_EVENT", "NODE_STATUS"}


async def test_runner_refuses_a_bad_tick_before_starting() -> None:
    async def publish(events: list[Envelope]) -> None:
        raise AssertionError("nothing to publish")

    with pytest.raises(ValueError, match="tick"):
        await run_simulator(publish, tick=0)


async def test_runner_in_rate_mode_publishes_about_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    published: list[Envelope] = []

    async def publish(events: list[Envelope]) -> None:
        published.extend(events)

    with trio.move_on_after(10):
        await run_simulator(publish, seed=2, rate=200)
    assert len(published) / 10 == pytest.approx(200, rel=0.15)
    check_transactions(published)
