"""Payloads of the chain events: every field and enum value the seed lists.

Field names are snake_case here and camelCase on the wire (the converter renames
them). Fields the seed shows but a producer may not know are optional and are left
out of the wire form when unset.
"""

from __future__ import annotations

from typing import Any

import attrs

from ._types import (
    AlertSeverity,
    Count,
    DagUpdateType,
    DecimalAmount,
    EventType,
    NodeState,
    Timestamp,
    TransactionStatus,
    ValidatorEventType,
)


@attrs.frozen
class Transaction:
    """A transaction, inside a block or on its own (TX_RECEIVED)."""

    tx_id: str
    from_: str
    to: str
    amount: DecimalAmount
    timestamp: Timestamp
    status: TransactionStatus = TransactionStatus.PENDING
    gas_price: DecimalAmount | None = None
    gas_limit: Count | None = None
    nonce: Count | None = None
    data: str | None = None


@attrs.frozen
class NewBlock:
    """NEW_BLOCK: a block was added to the chain."""

    block_id: str
    height: Count
    timestamp: Timestamp
    hash: str | None = None
    previous_hash: str | None = None
    transactions: list[Transaction] = attrs.Factory(list)
    validator: str | None = None
    signature: str | None = None
    size: Count | None = None
    gas_used: Count | None = None
    gas_limit: Count | None = None


@attrs.frozen
class DagMetadata:
    weight: float | None = None
    layer: Count | None = None
    parent_count: Count | None = None
    child_count: Count | None = None


@attrs.frozen
class DagUpdate:
    """DAG_UPDATE: the DAG gained or lost a node, an edge or a path."""

    update_type: DagUpdateType
    node_id: str
    timestamp: Timestamp
    related_nodes: list[str] = attrs.Factory(list)
    metadata: DagMetadata | None = None


@attrs.frozen
class ValidatorMetadata:
    uptime: float | None = None
    proposed_blocks: Count | None = None
    missed_blocks: Count | None = None


@attrs.frozen
class ValidatorEvent:
    """VALIDATOR_EVENT: a validator joined, left, was slashed or rewarded, proposed or voted."""

    event_type: ValidatorEventType
    validator_id: str
    timestamp: Timestamp
    stake: DecimalAmount | None = None
    block_height: Count | None = None
    reward: DecimalAmount | None = None
    penalty: DecimalAmount | None = None
    metadata: ValidatorMetadata | None = None


@attrs.frozen
class TxReceived(Transaction):
    """TX_RECEIVED: a transaction reached the node (pending, then confirmed or failed)."""


@attrs.frozen
class NodeStatus:
    """NODE_STATUS: a chain node reports its health."""

    node_id: str
    status: NodeState
    last_update: Timestamp
    version: str | None = None
    uptime: Count | None = None
    block_height: Count | None = None
    peers: Count | None = None
    memory_usage: Count | None = None
    cpu_usage: float | None = None
    network_latency: float | None = None
    region: str | None = None


@attrs.frozen
class AlertTriggered:
    """ALERT_TRIGGERED: something needs a human (a node went offline, latency is high)."""

    type: str
    severity: AlertSeverity
    message: str
    timestamp: Timestamp
    alert_id: str | None = None
    source: str | None = None
    metadata: dict[str, Any] | None = None


EventPayload = NewBlock | DagUpdate | ValidatorEvent | TxReceived | NodeStatus | AlertTriggered

EVENT_PAYLOADS: dict[EventType, type[Any]] = {
    EventType.NEW_BLOCK: NewBlock,
    EventType.DAG_UPDATE: DagUpdate,
    EventType.VALIDATOR_EVENT: ValidatorEvent,
    EventType.TX_RECEIVED: TxReceived,
    EventType.NODE_STATUS: NodeStatus,
    EventType.ALERT_TRIGGERED: AlertTriggered,
}
"""Which payload class each event type carries."""
