"""A believable KALDRIX chain without I/O: blocks, transactions, DAG, validators and nodes.

The simulator owns a schedule of what happens when, never a clock: the caller hands it
a time and gets back the events due since the previous call. So a test runs an hour of
chain in milliseconds, and the same seed gives the same chain however the calls are
spaced. Everything a subscriber could cross-check holds: heights are contiguous, hashes
link, a confirmed transaction was pending first and sits in exactly one block, the DAG
only references nodes that exist, and an offline node raises an alert.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs

from kaldrix.protocol import (
    AlertSeverity,
    DagMetadata,
    DagUpdateType,
    Envelope,
    NodeState,
    Transaction,
    TransactionStatus,
    ValidatorEventType,
    ValidatorMetadata,
    build_alert_triggered_message,
    build_dag_update_message,
    build_new_block_message,
    build_node_status_message,
    build_tx_received_message,
    build_validator_event_message,
    format_timestamp,
)

GENESIS_HASH = "0x" + "0" * 64
ACCOUNTS: tuple[str, ...] = tuple(
    "0x" + hashlib.sha256(f"kaldrix-account-{i}".encode()).hexdigest()[:40] for i in range(48)
)
"""The fixed pool of addresses, the same for every seed, so `address:<a>` channels stay busy."""
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1", "sa-east-1")
_REGION_LATENCY = {"us-east-1": 8.0, "us-west-2": 22.0, "eu-west-1": 35.0,
                   "eu-central-1": 40.0, "ap-southeast-1": 95.0, "sa-east-1": 70.0}
_NODE_VERSIONS = ("1.4.2", "1.4.3", "1.5.0")
_ERC20_TRANSFER = "0xa9059cbb"

TRANSFER_GAS = 21_000
BLOCK_GAS_LIMIT = 30_000_000
_CALL_GAS_LIMITS = (60_000, 100_000, 150_000, 250_000)
NATURAL_TX_RATE = 1.5
"""Transactions per second at the natural pace."""
NATURAL_DAG_RATE = 1.0
"""New DAG nodes per second at the natural pace."""
FAIL_PROBABILITY = 0.04
NODE_REPORT_INTERVAL = 10.0
REWARD_EPOCH = 10
"""Blocks between two rounds of rewards."""
_DAG_WINDOW = 256
"""DAG nodes remembered for new edges and paths; older ones only live in subscribers' views."""
_MAX_TIPS = 32


def block_hash(height: int, previous_hash: str, tx_ids: list[str]) -> str:
    """The hash of a block: anyone holding the NEW_BLOCK can recompute and check it."""
    text = f"{height}:{previous_hash}:{','.join(tx_ids)}"
    return "0x" + hashlib.sha256(text.encode()).hexdigest()


def _units(value: int, decimals: int) -> str:
    """An integer count of 10**-decimals units as a decimal string without float rounding."""
    whole, fraction = divmod(value, 10**decimals)
    if not fraction:
        return str(whole)
    return f"{whole}.{fraction:0{decimals}d}".rstrip("0")


@attrs.define
class _Validator:
    id: str
    stake: int
    proposed: int = 0
    voted: int = 0
    missed: int = 0

    def metadata(self) -> ValidatorMetadata:
        expected = self.proposed + self.voted + self.missed
        uptime = 100.0 if not expected else round(100.0 * (expected - self.missed) / expected, 2)
        return ValidatorMetadata(uptime=uptime, proposed_blocks=self.proposed, missed_blocks=self.missed)


@attrs.define
class _Node:
    id: str
    region: str
    version: str
    peers: int
    memory: int
    uptime_at_start: int
    started: float
    offline: bool = False
    sync_from: int = 0
    sync_until: float = 0.0


@attrs.define
class _Vertex:
    id: str
    index: int
    layer: int
    weight: float
    parents: list[str]
    children: int = 0

    def metadata(self) -> DagMetadata:
        return DagMetadata(weight=self.weight, layer=self.layer,
                           parent_count=len(self.parents), child_count=self.children)


@attrs.define
class _PendingTx:
    fields: dict[str, Any]
    gas_used: int
    fails: bool


class ChainSimulator:
    """A KALDRIX chain that advances only when told the time.

    Args:
      seed: makes the chain (every payload) reproducible; None draws a fresh one.
      block_interval: seconds between blocks.
      rate: total events per second to aim for (benchmarks); 0 keeps the natural pace,
        where a block every `block_interval` and its surroundings set the rate. Extra
        events are transactions and DAG updates, evenly spaced, under every invariant.
      validators: size of the active validator set (kept constant through churn).
      nodes: chain nodes reporting their status.
      wall_start: the wall-clock moment of the first `advance`; payload timestamps are
        this plus simulated time. Defaults to the real time of the first call.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        block_interval: float = 2.0,
        rate: float = 0.0,
        validators: int = 7,
        nodes: int = 5,
        wall_start: datetime | None = None,
    ) -> None:
        if block_interval <= 0:
            raise ValueError("block_interval must be > 0")
        if rate < 0:
            raise ValueError("rate must be >= 0")
        if validators < 1 or nodes < 1:
            raise ValueError("validators and nodes must be >= 1")
        self._rng = random.Random(seed)
        self._salt = f"{self._rng.getrandbits(64):016x}"
        self._interval = block_interval
        self._rate = rate
        self._initial_validators = validators
        self._initial_nodes = nodes
        self._wall_start = wall_start
        self._t0: float | None = None
        self._last = float("-inf")
        self._schedule: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._out: list[Envelope] = []
        self._stamp_cache: tuple[float, str] = (float("nan"), "")
        self._second_cache: tuple[int, str] = (-1, "")
        self._committed = 0
        """Events emitted or promised (a pending transaction owes its outcome)."""
        self._next_fill = 0
        # chain state
        self._height = 0
        self._head = GENESIS_HASH
        self._mempool: deque[_PendingTx] = deque()
        self._doomed: list[_PendingTx] = []
        self._nonces: dict[str, int] = {}
        self._validators: dict[str, _Validator] = {}
        self._validator_count = 0
        self._nodes: list[_Node] = []
        self._alerts = 0
        self._vertices: dict[str, _Vertex] = {}
        self._vertex_order: deque[str] = deque()
        self._tips: list[str] = []
        self._vertex_count = 0
        self._wall_micros = 0
        self._account_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(ACCOUNTS))))
        """Cumulative: a few accounts are busy, most are quiet, as on a real chain."""
        expected_tx_per_block = (NATURAL_TX_RATE + rate / 3) * block_interval
        needed = 2 * expected_tx_per_block * max(_CALL_GAS_LIMITS)
        self._gas_limit = max(BLOCK_GAS_LIMIT, -(-int(needed) // 1_000_000) * 1_000_000)

    # -- driving ---------------------------------------------------------------------

    def advance(self, now: float) -> list[Envelope]:
        """The events that happened up to `now` (seconds, monotonic), oldest first."""
        if self._t0 is None:
            self._start(now)
        if now < self._last:
            return []
        self._last = now
        schedule = self._schedule
        while True:
            fill_at = self._fill_time()
            if schedule and schedule[0][0] <= now and schedule[0][0] <= fill_at:
                at, _, action = heapq.heappop(schedule)
                action(at)
            elif fill_at <= now:
                self._next_fill += 1
                self._fill(fill_at)
            else:
                break
        out, self._out = self._out, []
        return out

    def _start(self, now: float) -> None:
        self._t0 = now
        if self._wall_start is None:
            self._wall_start = datetime.now(UTC)
        self._wall_micros = round(self._wall_start.timestamp() * 1_000_000)
        for _ in range(self._initial_validators):
            self._join(now)
        self._add_vertex(now, genesis=True)
        rng = self._rng
        for i in range(self._initial_nodes):
            node = _Node(
                id=f"node-{i + 1}", region=REGIONS[i % len(REGIONS)], version=rng.choice(_NODE_VERSIONS),
                peers=rng.randint(12, 40), memory=rng.randint(2, 6) << 30,
                uptime_at_start=rng.randint(3_600, 30 * 86_400), started=now,
            )
            self._nodes.append(node)
            self._report(node, now)
            phase = NODE_REPORT_INTERVAL * (i + 1) / self._initial_nodes
            self._every(now + phase, NODE_REPORT_INTERVAL, lambda t, node=node: self._report(node, t))
        self._every(now + self._interval, self._interval, self._produce_block)
        self._at(now + rng.expovariate(NATURAL_TX_RATE), self._natural_tx)
        self._at(now + rng.expovariate(NATURAL_DAG_RATE), self._natural_vertex)
        self._at(now + rng.uniform(30, 120), self._slash)
        self._at(now + rng.uniform(60, 240), self._churn)
        self._at(now + rng.uniform(30, 120), self._outage)

    def _at(self, when: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._schedule, (when, next(self._seq), action))

    def _every(self, first: float, period: float, action: Callable[[float], None]) -> None:
        """Run `action` at first, first + period, ... (computed from the start: no drift)."""
        def tick(at: float, k: int = 0) -> None:
            action(at)
            self._at(first + (k + 1) * period, lambda t: tick(t, k + 1))

        self._at(first, tick)

    def _fill_time(self) -> float:
        if not self._rate:
            return float("inf")
        assert self._t0 is not None
        return self._t0 + (self._next_fill + 1) / self._rate

    def _fill(self, at: float) -> None:
        """One evenly spaced slot of rate mode: add an event only if the chain is short of the rate."""
        assert self._t0 is not None
        if self._committed >= self._rate * (at - self._t0):
            return
        if self._rng.random() < 0.5:
            self._new_tx(at)
        elif self._rng.random() >= 0.25 or not self._add_edge(at):
            self._add_vertex(at)

    def _emit(self, envelope: Envelope, *, counted: bool = True) -> None:
        self._out.append(envelope)
        self._committed += counted

    def _stamp(self, at: float) -> str:
        """Payload time of simulated moment `at` (RFC 3339 UTC, microseconds).

        Formatting a datetime costs more than building the rest of an event, so the
        date-and-seconds part is formatted once per second and a block's events,
        which share one moment, share one string.
        """
        if self._stamp_cache[0] == at:
            return self._stamp_cache[1]
        assert self._wall_start is not None and self._t0 is not None
        micros = self._wall_micros + round((at - self._t0) * 1_000_000)
        second, fraction = divmod(micros, 1_000_000)
        if self._second_cache[0] != second:
            moment = datetime.fromtimestamp(second, UTC)
            self._second_cache = (second, format_timestamp(moment)[:19])
        stamp = f"{self._second_cache[1]}.{fraction:06d}Z"
        self._stamp_cache = (at, stamp)
        return stamp

    # -- transactions ----------------------------------------------------------------

    def _natural_tx(self, at: float) -> None:
        self._new_tx(at)
        self._at(at + self._rng.expovariate(NATURAL_TX_RATE), self._natural_tx)

    def _new_tx(self, at: float) -> None:
        rng = self._rng
        sender, receiver = rng.choices(ACCOUNTS, cum_weights=self._account_weights, k=2)
        if sender == receiver:
            receiver = ACCOUNTS[(ACCOUNTS.index(sender) + 1) % len(ACCOUNTS)]
        nonce = self._nonces.get(sender, 0)
        self._nonces[sender] = nonce + 1
        call = rng.random() < 0.3
        gas_limit = rng.choice(_CALL_GAS_LIMITS) if call else TRANSFER_GAS
        amount = _units(int(10 ** rng.uniform(3, 11)), 6)
        fields: dict[str, Any] = {
            "tx_id": "0x" + hashlib.sha256(f"{self._salt}:{sender}:{nonce}:{receiver}:{amount}".encode()).hexdigest(),
            "from_": sender,
            "to": receiver,
            "amount": amount,
            "gas_price": _units(rng.randint(10, 600), 1),
            "gas_limit": gas_limit,
            "nonce": nonce,
        }
        if call:
            fields["data"] = _ERC20_TRANSFER + f"{rng.getrandbits(128):032x}"
        pending = _PendingTx(fields, rng.randint(TRANSFER_GAS, gas_limit), rng.random() < FAIL_PROBABILITY)
        (self._doomed if pending.fails else self._mempool).append(pending)
        self._emit(build_tx_received_message(**fields, status=TransactionStatus.PENDING, timestamp=self._stamp(at)))
        self._committed += 1  # its outcome, confirmed or failed, is owed

    # -- blocks and validators -------------------------------------------------------

    def _produce_block(self, at: float) -> None:
        rng = self._rng
        stamp = self._stamp(at)
        height = self._height + 1
        active = list(self._validators.values())
        proposer = rng.choices(active, [v.stake for v in active])[0]
        proposer.proposed += 1
        self._validator_event(at, ValidatorEventType.PROPOSED, proposer, block_height=height)
        for validator in active:
            if validator is proposer:
                continue
            if rng.random() < 0.97:
                validator.voted += 1
                self._validator_event(at, ValidatorEventType.VOTED, validator, block_height=height)
            else:
                validator.missed += 1
        included: list[_PendingTx] = []
        gas = 0
        while self._mempool and gas + self._mempool[0].fields["gas_limit"] <= self._gas_limit:
            pending = self._mempool.popleft()
            gas += pending.fields["gas_limit"]
            included.append(pending)
        confirmed = [
            Transaction(**p.fields, status=TransactionStatus.CONFIRMED, timestamp=stamp) for p in included
        ]
        tx_ids = [p.fields["tx_id"] for p in included]
        digest = block_hash(height, self._head, tx_ids)
        self._emit(build_new_block_message(
            block_id=digest, height=height, hash=digest, previous_hash=self._head,
            transactions=confirmed, validator=proposer.id,
            signature="0x" + hashlib.sha512(f"{proposer.id}:{digest}".encode()).hexdigest()[:130],
            size=508 + sum(110 + len(p.fields.get("data", "")) // 2 for p in included),
            gas_used=sum(p.gas_used for p in included), gas_limit=self._gas_limit, timestamp=stamp,
        ))
        self._height, self._head = height, digest
        for pending in included:
            self._emit(build_tx_received_message(
                **pending.fields, status=TransactionStatus.CONFIRMED, timestamp=stamp), counted=False)
        for pending in self._doomed:
            self._emit(build_tx_received_message(
                **pending.fields, status=TransactionStatus.FAILED, timestamp=stamp), counted=False)
        self._doomed.clear()
        if height % REWARD_EPOCH == 0:
            for validator in active:
                reward = validator.stake // 20_000 + rng.randint(1, 50)
                validator.stake += reward
                self._validator_event(at, ValidatorEventType.REWARDED, validator, reward=str(reward))
        if rng.random() < 0.25:
            self._update_path(at)

    def _validator_event(self, at: float, kind: ValidatorEventType, validator: _Validator, **extra: Any) -> None:
        extra.setdefault("block_height", self._height)
        self._emit(build_validator_event_message(
            event_type=kind, validator_id=validator.id, stake=str(validator.stake),
            metadata=validator.metadata(), timestamp=self._stamp(at), **extra,
        ))

    def _join(self, at: float) -> None:
        self._validator_count += 1
        validator = _Validator(id=f"validator_{self._validator_count}",
                               stake=self._rng.randrange(1_000_000, 5_000_000, 1_000))
        self._validators[validator.id] = validator
        self._validator_event(at, ValidatorEventType.JOINED, validator)

    def _slash(self, at: float) -> None:
        validator = self._rng.choice(list(self._validators.values()))
        penalty = max(1, validator.stake // 100)
        validator.stake -= penalty
        validator.missed += 1
        self._validator_event(at, ValidatorEventType.SLASHED, validator, penalty=str(penalty))
        self._at(at + self._rng.uniform(60, 240), self._slash)

    def _churn(self, at: float) -> None:
        """One validator leaves and a newcomer takes its seat, keeping the set's size."""
        leaving = self._validators.pop(self._rng.choice(list(self._validators)))
        self._validator_event(at, ValidatorEventType.LEFT, leaving)
        self._join(at)
        self._at(at + self._rng.uniform(120, 300), self._churn)

    # -- DAG -------------------------------------------------------------------------

    def _natural_vertex(self, at: float) -> None:
        self._add_vertex(at)
        if self._rng.random() < 0.3:
            self._add_edge(at)
        self._at(at + self._rng.expovariate(NATURAL_DAG_RATE), self._natural_vertex)

    def _add_vertex(self, at: float, *, genesis: bool = False) -> bool:
        rng = self._rng
        parents: list[str] = []
        if not genesis:
            want = rng.choice((1, 2, 2, 3))
            pool = self._tips[-8:] or list(self._vertex_order)[-8:]
            parents = rng.sample(pool, min(want, len(pool)))
            for parent in parents:
                self._vertices[parent].children += 1
            self._tips = [tip for tip in self._tips if tip not in parents]
        self._vertex_count += 1
        vertex = _Vertex(
            id="0x" + hashlib.sha256(f"{self._salt}:dag:{self._vertex_count}".encode()).hexdigest()[:32],
            index=self._vertex_count,
            layer=1 + max((self._vertices[p].layer for p in parents), default=-1),
            weight=1.0 if genesis else round(rng.uniform(0.5, 3.0), 2),
            parents=parents,
        )
        self._vertices[vertex.id] = vertex
        self._vertex_order.append(vertex.id)
        if len(self._vertex_order) > _DAG_WINDOW:
            del self._vertices[self._vertex_order.popleft()]
        self._tips = [*self._tips[-(_MAX_TIPS - 1):], vertex.id]
        self._dag_event(at, DagUpdateType.NODE_ADDED, vertex, parents)
        return True

    def _add_edge(self, at: float) -> bool:
        """A recent node also approves an older, lower-layer one: no cycles, layers unchanged."""
        order = self._vertex_order
        for _ in range(4):
            child = self._vertices[order[self._rng.randrange(max(0, len(order) - 16), len(order))]]
            low = max(0, len(order) - 64)
            parent = self._vertices[order[self._rng.randrange(low, len(order))]]
            if parent.index < child.index and parent.layer < child.layer and parent.id not in child.parents:
                child.parents.append(parent.id)
                parent.children += 1
                self._dag_event(at, DagUpdateType.EDGE_ADDED, child, [parent.id])
                return True
        return False

    def _update_path(self, at: float) -> None:
        """The heaviest known path from the newest node back towards genesis, one layer a step."""
        vertex = self._vertices[self._vertex_order[-1]]
        path: list[str] = []
        current = vertex
        while current.parents and len(path) < 8:
            known = [self._vertices[p] for p in current.parents if p in self._vertices]
            step = max(known, key=lambda v: v.layer, default=None)
            if step is None or step.layer != current.layer - 1:
                break
            path.append(step.id)
            current = step
        if path:
            self._dag_event(at, DagUpdateType.PATH_UPDATED, vertex, path)

    def _dag_event(self, at: float, kind: DagUpdateType, vertex: _Vertex, related: list[str]) -> None:
        self._emit(build_dag_update_message(
            update_type=kind, node_id=vertex.id, related_nodes=list(related),
            metadata=vertex.metadata(), timestamp=self._stamp(at),
        ))

    # -- nodes -----------------------------------------------------------------------

    def _report(self, node: _Node, at: float) -> None:
        if node.offline:
            return
        rng = self._rng
        syncing = at < node.sync_until
        if syncing:
            progress = (at - node.started) / (node.sync_until - node.started)
            height = node.sync_from + int((self._height - node.sync_from) * progress)
        else:
            height = max(0, self._height - (rng.random() < 0.15))
        self._emit(build_node_status_message(
            node_id=node.id, status=NodeState.SYNCING if syncing else NodeState.ONLINE,
            version=node.version, uptime=node.uptime_at_start + int(at - node.started),
            block_height=height, peers=max(1, node.peers + rng.randint(-2, 2)),
            memory_usage=node.memory + rng.randint(-64, 64) * (1 << 20),
            cpu_usage=round(rng.uniform(40, 95) if syncing else rng.uniform(5, 60), 1),
            network_latency=round(_REGION_LATENCY[node.region] * rng.uniform(0.8, 1.5), 1),
            region=node.region, last_update=self._stamp(at),
        ))

    def _outage(self, at: float) -> None:
        """A node stops answering: it reports OFFLINE, an alert fires, and it returns later."""
        candidates = [n for n in self._nodes if not n.offline and at >= n.sync_until]
        if not candidates:
            self._at(at + 30, self._outage)
            return
        node = self._rng.choice(candidates)
        node.offline = True
        self._emit(build_node_status_message(
            node_id=node.id, status=NodeState.OFFLINE, version=node.version, uptime=0,
            block_height=self._height, peers=0, region=node.region, last_update=self._stamp(at),
        ))
        self._alert(at, "node_offline", AlertSeverity.CRITICAL, node,
                    f"Node {node.id} ({node.region}) is offline: no heartbeat since block {self._height}")
        self._at(at + self._rng.uniform(20, 60), lambda t: self._recover(node, t))

    def _recover(self, node: _Node, at: float) -> None:
        node.offline = False
        node.started = at
        node.uptime_at_start = 0
        node.sync_from = max(0, self._height - self._rng.randint(5, 30))
        node.sync_until = at + self._rng.uniform(10, 30)
        self._report(node, at)
        self._alert(at, "node_recovered", AlertSeverity.INFO, node,
                    f"Node {node.id} ({node.region}) is back and syncing from block {node.sync_from}")
        self._at(at + self._rng.uniform(60, 240), self._outage)

    def _alert(self, at: float, kind: str, severity: AlertSeverity, node: _Node, message: str) -> None:
        self._alerts += 1
        self._emit(build_alert_triggered_message(
            type=kind, severity=severity, message=message, source=node.id,
            alert_id=f"alert_{self._salt[:8]}_{self._alerts}", timestamp=self._stamp(at),
            metadata={"region": node.region, "blockHeight": self._height},
        ))
