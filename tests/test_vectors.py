"""The conformance vectors in spec/vectors are the spec: the codec must agree with each.

Every vector's frame goes through `decode_command`, which must give the vector's verdict,
error code and field path. Where the frame is a command, its generated JSON Schema must
give the same verdict too, except where a JSON Schema cannot express the rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from kaldrix.protocol import CommandType, ErrorCode, EventType, ProtocolError, decode_command
from kaldrix.protocol._jsonschema import generate_schemas, schema_file_name

VECTOR_DIR = Path(__file__).resolve().parents[1] / "spec" / "vectors"

KNOWN_DEFECTS: dict[str, str] = {}
"""Vectors the codec gets wrong today; each test turns into a failure once it is fixed."""

SCHEMA_CANNOT_TELL = {
    "subscribe-since-other-channel": "`since` keys must be among `channels`: not expressible in JSON Schema",
    "timestamp-not-a-date": "a pattern cannot check the calendar (February 30)",
    "node-status-bad-last-update": "a pattern cannot check the clock (hour 25)",
    "new-block-height-float-notation": "JSON Schema counts 1001.0 as an integer; the codec refuses it",
    "subscribe-channel-trailing-newline": "Python's re lets $ match before a final newline (an ECMA-262 validator refuses it)",
    "validator-event-reward-trailing-newline": "Python's re lets $ match before a final newline (an ECMA-262 validator refuses it)",
}
"""Vectors on which a JSON Schema validator cannot reach the codec's verdict."""


def _load() -> list[tuple[str, dict[str, Any]]]:
    loaded = []
    for path in sorted(VECTOR_DIR.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        loaded.extend((path.name, vector) for vector in document["vectors"])
    return loaded


VECTORS = _load()


def _params(known: dict[str, str]) -> list[Any]:
    return [
        pytest.param(
            vector,
            id=vector["name"],
            marks=[pytest.mark.xfail(reason=known[vector["name"]], strict=True)] if vector["name"] in known else [],
        )
        for _, vector in VECTORS
    ]


@pytest.mark.parametrize("vector", _params(KNOWN_DEFECTS))
def test_decode_command_gives_the_vectors_verdict(vector: dict[str, Any]) -> None:
    result = decode_command(vector["frame"])
    if vector["verdict"] == "accept":
        assert not isinstance(result, ProtocolError), f"refused: {result}"
    else:
        assert isinstance(result, ProtocolError), f"accepted: {result}"
        assert (result.code, result.path) == (vector["code"], vector.get("path")), str(result)
        assert result.message


_SCHEMAS = {
    str(command): Draft202012Validator(generate_schemas()[schema_file_name(str(command))])
    for command in CommandType
}


def _command_object(frame: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(frame)
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("type") in _SCHEMAS:
        return obj
    return None


@pytest.mark.parametrize("vector", _params({}))
def test_command_schema_agrees_with_the_vector(vector: dict[str, Any]) -> None:
    obj = _command_object(vector["frame"])
    if obj is None:
        pytest.skip("not a command: framing, envelope type or event-type checks come first")
    if vector["name"] in SCHEMA_CANNOT_TELL:
        pytest.skip(SCHEMA_CANNOT_TELL[vector["name"]])
    errors = [error.message for error in _SCHEMAS[obj["type"]].iter_errors(obj)]
    assert (not errors) == (vector["verdict"] == "accept"), errors


def test_vector_files_are_well_formed() -> None:
    names = [vector["name"] for _, vector in VECTORS]
    assert len(names) == len(set(names)), "vector names are unique"
    assert set(KNOWN_DEFECTS) <= set(names) and set(SCHEMA_CANNOT_TELL) <= set(names)
    for file_name, vector in VECTORS:
        assert {"name", "description", "frame", "verdict"} <= set(vector), (file_name, vector)
        assert isinstance(vector["frame"], str)
        if vector["verdict"] == "accept":
            assert "code" not in vector and "path" not in vector, vector["name"]
        else:
            assert vector["verdict"] == "reject", vector["name"]
            assert vector["code"] in ErrorCode.__members__, vector["name"]


def test_vectors_cover_every_command_and_event_type() -> None:
    seen: dict[str, set[str]] = {}
    for _, vector in VECTORS:
        obj = _command_object(vector["frame"])
        if obj is None:
            continue
        seen.setdefault(obj["type"], set()).add(vector["verdict"])
        event = obj.get("payload", {}).get("event") if obj["type"] == "PUBLISH" else None
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            seen.setdefault(event["type"], set()).add(vector["verdict"])
    for message_type in [*CommandType, *EventType]:
        assert seen.get(str(message_type)) == {"accept", "reject"}, message_type
