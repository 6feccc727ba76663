"""Channel names and the routing table: which channels each event is delivered on."""

from __future__ import annotations

import re
from typing import Any

from ._types import EventType

PUBLIC_CHANNELS = frozenset({"blocks", "dag", "validators", "transactions", "nodes", "alerts"})
"""Channels without a parameter."""

PARAMETER_PREFIXES = frozenset({"validator", "address", "node", "user"})
"""Channels of the form ``<prefix>:<parameter>``; ``user:<sub>`` is private to its owner."""

MAX_CHANNEL_LENGTH = 200
_PARAMETER = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


def channel_problem(name: str) -> str | None:
    """Why `name` is not a valid channel, or None when it is."""
    if len(name) > MAX_CHANNEL_LENGTH:
        return f"channel names are at most {MAX_CHANNEL_LENGTH} characters"
    if name in PUBLIC_CHANNELS:
        return None
    prefix, sep, parameter = name.partition(":")
    if not sep:
        known = ", ".join(sorted(PUBLIC_CHANNELS))
        return f"unknown channel {name!r}: expected one of {known} or <prefix>:<id>"
    if prefix not in PARAMETER_PREFIXES:
        known = ", ".join(sorted(PARAMETER_PREFIXES))
        return f"unknown channel prefix {prefix!r}: expected one of {known}"
    if not _PARAMETER.fullmatch(parameter):
        return "channel parameters are 1-128 characters of A-Z a-z 0-9 _ . -"
    return None


def is_private(channel: str) -> bool:
    """Whether only its owner (and admins) may read `channel`."""
    return channel.startswith("user:")


def private_owner(channel: str) -> str | None:
    """The subject that owns a private channel, or None for a shared one."""
    return channel[5:] if is_private(channel) else None


def channels_for(event_type: EventType, payload: Any) -> list[str]:
    """The channels an event is routed to, in a stable order, without repeats."""
    match event_type:
        case EventType.NEW_BLOCK:
            names = ["blocks"]
        case EventType.DAG_UPDATE:
            names = ["dag"]
        case EventType.VALIDATOR_EVENT:
            names = ["validators", f"validator:{payload.validator_id}"]
        case EventType.TX_RECEIVED:
            names = ["transactions", f"address:{payload.from_}", f"address:{payload.to}"]
        case EventType.NODE_STATUS:
            names = ["nodes", f"node:{payload.node_id}"]
        case EventType.ALERT_TRIGGERED:
            names = ["alerts"]
    unique = list(dict.fromkeys(names))
    return [name for name in unique if channel_problem(name) is None]
