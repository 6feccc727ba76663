"""Builders for every event type (the seed's buildNewBlockMessage and friends).

Each takes the payload's fields as keyword arguments (snake_case), fills the payload's
own timestamp when it is left out, and returns an Envelope with a fresh `id`,
`timestamp` and `version`, ready to publish or encode.
"""

from __future__ import annotations

import enum
import functools
import typing
from typing import Any

from ._codec import Envelope, new_id
from ._control import PublishedEvent
from ._events import EVENT_PAYLOADS
from ._types import EventType, now_timestamp

_TIME_FIELD = {EventType.NODE_STATUS: "last_update"}


def build_event(event_type: EventType | str, /, *, message_id: str | None = None, **fields: Any) -> Envelope:
    """Build an event message of any type from its payload fields."""
    event_type = EventType(event_type)
    time_field = _TIME_FIELD.get(event_type, "timestamp")
    if time_field not in fields:
        fields[time_field] = now_timestamp()
    payload_cls = EVENT_PAYLOADS[event_type]
    for name, kind in _enum_fields(payload_cls).items():
        if isinstance(fields.get(name), str):
            fields[name] = kind(fields[name])
    payload = payload_cls(**fields)
    return Envelope(type=event_type.value, payload=payload, id=message_id or new_id())


@functools.cache
def _enum_fields(cls: type) -> dict[str, type[enum.Enum]]:
    """The payload fields whose type is an enum, so builders accept plain strings too."""
    hints = typing.get_type_hints(cls)
    return {
        name: kind for name, kind in hints.items() if isinstance(kind, type) and issubclass(kind, enum.Enum)
    }


def build_new_block_message(**fields: Any) -> Envelope:
    """NEW_BLOCK: block_id, height, hash, previous_hash, transactions, validator, ..."""
    return build_event(EventType.NEW_BLOCK, **fields)


def build_dag_update_message(**fields: Any) -> Envelope:
    """DAG_UPDATE: update_type, node_id, related_nodes, metadata."""
    return build_event(EventType.DAG_UPDATE, **fields)


def build_validator_event_message(**fields: Any) -> Envelope:
    """VALIDATOR_EVENT: event_type, validator_id, stake, block_height, reward, penalty, metadata."""
    return build_event(EventType.VALIDATOR_EVENT, **fields)


def build_tx_received_message(**fields: Any) -> Envelope:
    """TX_RECEIVED: tx_id, from_, to, amount, gas_price, gas_limit, nonce, data, status."""
    return build_event(EventType.TX_RECEIVED, **fields)


def build_node_status_message(**fields: Any) -> Envelope:
    """NODE_STATUS: node_id, status, version, uptime, block_height, peers, ..."""
    return build_event(EventType.NODE_STATUS, **fields)


def build_alert_triggered_message(**fields: Any) -> Envelope:
    """ALERT_TRIGGERED: type, severity, message, source, metadata."""
    return build_event(EventType.ALERT_TRIGGERED, **fields)


def as_published(message: Envelope) -> PublishedEvent:
    """The form a built event takes inside PUBLISH."""
    return PublishedEvent(type=EventType(message.type), payload=message.payload, id=message.id)
