"""Plain-JSON checks of what the server sends, written from the wire contract alone."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from ._outcome import ScenarioFailed

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_SHOWN = 400
"""Frames quoted in a failure are cut to about this many characters."""


def show(frame: Any) -> str:
    """A frame as compact JSON for a failure message, cut when long."""
    text = frame if isinstance(frame, str) else json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text)} characters)"


def is_rfc3339(value: Any) -> bool:
    if not isinstance(value, str) or not _RFC3339.match(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(condition: bool, reason: str, frame: Any = None) -> None:
    """Fail the scenario with `reason` (and the offending frame) unless `condition`."""
    if not condition:
        raise ScenarioFailed(reason if frame is None else f"{reason}; got {show(frame)}")


def envelope_problem(frame: Any) -> str | None:
    """Why a server frame is not a v1 envelope, or None."""
    if not isinstance(frame, dict):
        return "expected a JSON object"
    if not isinstance(frame.get("type"), str):
        return "`type` must be a string"
    if not isinstance(frame.get("payload"), dict):
        return "`payload` must be an object"
    if not isinstance(frame.get("id"), str) or not frame["id"]:
        return "`id` must be a non-empty string"
    if not is_rfc3339(frame.get("timestamp")):
        return "`timestamp` must be an RFC 3339 date-time"
    version = frame.get("version")
    if not isinstance(version, str) or not version.startswith("1."):
        return "`version` must be a 1.x version string"
    return None


def event_problem(frame: dict[str, Any]) -> str | None:
    """Why a delivered event lacks its channel, offset or epoch, or None."""
    if not isinstance(frame.get("channel"), str):
        return "an event must carry `channel` (string)"
    if not is_int(frame.get("offset")) or frame["offset"] < 1:
        return "an event must carry `offset` (integer >= 1)"
    if not isinstance(frame.get("epoch"), str) or not frame["epoch"]:
        return "an event must carry `epoch` (non-empty string)"
    return None
