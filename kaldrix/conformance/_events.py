"""Valid chain events as a producer writes them, in plain JSON (camelCase, decimal strings)."""

from __future__ import annotations

from typing import Any

EVENT_TIME = "2025-08-07T10:00:00Z"


def validator_event(validator_id: str, height: int, *, event_id: str | None = None) -> dict[str, Any]:
    """VALIDATOR_EVENT, routed to `validators` and `validator:<validator_id>`."""
    event: dict[str, Any] = {
        "type": "VALIDATOR_EVENT",
        "payload": {"eventType": "PROPOSED", "validatorId": validator_id, "timestamp": EVENT_TIME, "blockHeight": height},
    }
    if event_id is not None:
        event["id"] = event_id
    return event


def tx_event(tx_id: str, sender: str, receiver: str, *, event_id: str | None = None) -> dict[str, Any]:
    """TX_RECEIVED, routed to `transactions`, `address:<sender>` and `address:<receiver>`."""
    event: dict[str, Any] = {
        "type": "TX_RECEIVED",
        "payload": {
            "txId": tx_id,
            "from": sender,
            "to": receiver,
            "amount": "1000",
            "status": "pending",
            "timestamp": EVENT_TIME,
        },
    }
    if event_id is not None:
        event["id"] = event_id
    return event


def node_event(node_id: str, height: int, *, event_id: str | None = None) -> dict[str, Any]:
    """NODE_STATUS, routed to `nodes` and `node:<node_id>`; sent with a channel override here."""
    event: dict[str, Any] = {
        "type": "NODE_STATUS",
        "payload": {"nodeId": node_id, "status": "ONLINE", "lastUpdate": EVENT_TIME, "blockHeight": height},
    }
    if event_id is not None:
        event["id"] = event_id
    return event
