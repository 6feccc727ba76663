"""Scalar wire types: timestamps, decimal amounts, and the enums of the seed.

Timestamps and amounts stay strings on the wire and in the classes (so a message
round-trips byte for byte); the converter checks their form when it structures them.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime
from typing import NewType

Timestamp = NewType("Timestamp", str)
"""An RFC 3339 date-time, for example ``2025-08-07T10:00:00Z``."""

DecimalAmount = NewType("DecimalAmount", str)
"""A non-negative decimal number as a string (``"1000"``, ``"0.25"``): no float rounding."""

Count = NewType("Count", int)
"""A non-negative integer: heights, offsets, sizes, gas."""

PROTOCOL_VERSION = "1.0.0"

_DECIMAL = re.compile(r"^(0|[1-9][0-9]*)(\.[0-9]+)?$")
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


def check_timestamp(value: object) -> Timestamp:
    """Return `value` if it is an RFC 3339 date-time string, else raise ValueError."""
    if not isinstance(value, str):
        raise TypeError("expected an RFC 3339 timestamp string")
    if not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 timestamp (2025-08-07T10:00:00Z)")
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("expected an RFC 3339 timestamp (not a real date)") from None
    return Timestamp(value)


def check_decimal(value: object) -> DecimalAmount:
    """Return `value` if it is a non-negative decimal string, else raise ValueError."""
    if not isinstance(value, str):
        raise TypeError("expected a decimal string such as \"1000\"")
    if not _DECIMAL.fullmatch(value):
        raise ValueError("expected a non-negative decimal string such as \"1000\"")
    return DecimalAmount(value)


def check_count(value: object) -> Count:
    """Return `value` if it is a non-negative integer (not a bool), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return Count(value)


def format_timestamp(moment: datetime) -> Timestamp:
    """Format an aware datetime as RFC 3339 UTC with microseconds (the envelope form)."""
    return Timestamp(moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def now_timestamp() -> Timestamp:
    """The current time in the envelope form."""
    return format_timestamp(datetime.now(UTC))


def parse_timestamp(value: str) -> datetime:
    """Parse an RFC 3339 string back into an aware datetime."""
    return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))


class TransactionStatus(enum.StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    FAILED = "failed"


class DagUpdateType(enum.StrEnum):
    NODE_ADDED = "NODE_ADDED"
    NODE_REMOVED = "NODE_REMOVED"
    EDGE_ADDED = "EDGE_ADDED"
    EDGE_REMOVED = "EDGE_REMOVED"
    PATH_UPDATED = "PATH_UPDATED"


class ValidatorEventType(enum.StrEnum):
    JOINED = "JOINED"
    LEFT = "LEFT"
    SLASHED = "SLASHED"
    REWARDED = "REWARDED"
    PROPOSED = "PROPOSED"
    VOTED = "VOTED"


class NodeState(enum.StrEnum):
    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"
    SYNCING = "SYNCING"
    ERROR = "ERROR"


class AlertSeverity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class EventType(enum.StrEnum):
    """The chain events a producer publishes and a subscriber receives."""

    NEW_BLOCK = "NEW_BLOCK"
    DAG_UPDATE = "DAG_UPDATE"
    VALIDATOR_EVENT = "VALIDATOR_EVENT"
    TX_RECEIVED = "TX_RECEIVED"
    NODE_STATUS = "NODE_STATUS"
    ALERT_TRIGGERED = "ALERT_TRIGGERED"


class CommandType(enum.StrEnum):
    """Messages a client sends."""

    AUTH = "AUTH"
    SUBSCRIBE = "SUBSCRIBE"
    UNSUBSCRIBE = "UNSUBSCRIBE"
    PUBLISH = "PUBLISH"
    PING = "PING"
    REQUEST_METRICS = "REQUEST_METRICS"
    ADMIN = "ADMIN"


class AdminAction(enum.StrEnum):
    """What an ADMIN command does (admin role)."""

    BLOCK = "block"
    UNBLOCK = "unblock"
    LIST = "list"


class ReplyType(enum.StrEnum):
    """Control messages the server sends (events aside)."""

    WELCOME = "WELCOME"
    ACK = "ACK"
    ERROR = "ERROR"
    PONG = "PONG"
    METRICS_RESPONSE = "METRICS_RESPONSE"
    HEARTBEAT = "HEARTBEAT"
