"""Bytes <-> messages. Decoding never raises: a bad message becomes a ProtocolError."""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import orjson

from ._channels import channel_problem
from ._control import COMMAND_PAYLOADS, REPLY_PAYLOADS, Publish, Subscribe, Unsubscribe
from ._converter import converter, describe_failure
from ._errors import ErrorCode, ProtocolError
from ._events import EVENT_PAYLOADS
from ._types import (
    PROTOCOL_VERSION,
    CommandType,
    EventType,
    ReplyType,
    Timestamp,
    check_timestamp,
    now_timestamp,
)

_ALL_PAYLOADS: dict[str, type[Any]] = {
    **{str(k): v for k, v in EVENT_PAYLOADS.items()},
    **{str(k): v for k, v in COMMAND_PAYLOADS.items()},
    **{str(k): v for k, v in REPLY_PAYLOADS.items()},
}


def new_id() -> str:
    """A fresh message id."""
    return uuid.uuid4().hex


@attrs.frozen
class Command:
    """A client command that passed validation."""

    type: CommandType
    payload: Any
    id: str | None = None


@attrs.frozen
class Envelope:
    """Any message as it travels: the seed's envelope plus, on events, channel/offset/epoch."""

    type: str
    payload: Any
    id: str = attrs.Factory(new_id)
    timestamp: Timestamp = attrs.Factory(now_timestamp)
    version: str = PROTOCOL_VERSION
    channel: str | None = None
    offset: int | None = None
    epoch: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict of this message."""
        wire: dict[str, Any] = {
            "type": self.type,
            "payload": converter.unstructure(self.payload),
            "timestamp": self.timestamp,
            "id": self.id,
            "version": self.version,
        }
        if self.channel is not None:
            wire["channel"] = self.channel
            wire["offset"] = self.offset
            wire["epoch"] = self.epoch
        return wire

    def encode(self) -> bytes:
        """The UTF-8 JSON text of this message."""
        return orjson.dumps(self.to_wire())


def encode(message_type: str, payload: Any, *, message_id: str | None = None) -> bytes:
    """Encode a message with a fresh id and timestamp."""
    return Envelope(message_type, payload, id=message_id or new_id()).encode()


def _refuse(code: ErrorCode, message: str, path: str | None = None, ref: str | None = None) -> ProtocolError:
    return ProtocolError(code=code, message=message, path=path, ref=ref)


def _parse_object(data: str | bytes) -> dict[str, Any] | ProtocolError:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return _refuse(ErrorCode.INVALID_JSON, f"not valid JSON: {exc.msg}")
    if not isinstance(obj, dict):
        return _refuse(ErrorCode.INVALID_MESSAGE, "expected a JSON object")
    return obj


def _check_envelope(obj: dict[str, Any]) -> ProtocolError | None:
    ref = obj.get("id") if isinstance(obj.get("id"), str) else None
    if "id" in obj and not isinstance(obj["id"], str):
        return _refuse(ErrorCode.INVALID_MESSAGE, "expected a string", "id")
    if "type" not in obj:
        return _refuse(ErrorCode.INVALID_MESSAGE, "required field missing", "type", ref)
    if not isinstance(obj["type"], str):
        return _refuse(ErrorCode.INVALID_MESSAGE, "expected a string", "type", ref)
    if "payload" in obj and not isinstance(obj["payload"], dict):
        return _refuse(ErrorCode.INVALID_MESSAGE, "expected an object", "payload", ref)
    version = obj.get("version", PROTOCOL_VERSION)
    if not isinstance(version, str) or not version.startswith("1."):
        return _refuse(ErrorCode.INVALID_MESSAGE, "unsupported version: expected 1.x", "version", ref)
    if "timestamp" in obj:
        try:
            check_timestamp(obj["timestamp"])
        except (TypeError, ValueError) as exc:
            return _refuse(ErrorCode.INVALID_MESSAGE, str(exc), "timestamp", ref)
    return None


def _check_channels(payload: Any, ref: str | None) -> ProtocolError | None:
    if isinstance(payload, Subscribe | Unsubscribe):
        if not payload.channels:
            return _refuse(ErrorCode.INVALID_PAYLOAD, "expected at least one channel", "payload.channels", ref)
        for index, name in enumerate(payload.channels):
            if problem := channel_problem(name):
                return _refuse(ErrorCode.INVALID_CHANNEL, problem, f"payload.channels[{index}]", ref)
    if isinstance(payload, Subscribe) and payload.since:
        for name in payload.since:
            if name not in payload.channels:
                return _refuse(ErrorCode.INVALID_PAYLOAD, "not one of the channels subscribed to", f"payload.since.{name}", ref)
    if isinstance(payload, Publish):
        if (payload.event is None) == (payload.events is None):
            return _refuse(ErrorCode.INVALID_PAYLOAD, "expected exactly one of event or events", "payload", ref)
        if payload.events is not None and not payload.events:
            return _refuse(ErrorCode.INVALID_PAYLOAD, "expected at least one event", "payload.events", ref)
        if payload.channel is not None and (problem := channel_problem(payload.channel)):
            return _refuse(ErrorCode.INVALID_CHANNEL, problem, "payload.channel", ref)
    return None


def decode_command(data: str | bytes) -> Command | ProtocolError:
    """Turn one text frame from a client into a Command, or the ProtocolError to answer."""
    if isinstance(data, bytes | bytearray):
        return _refuse(ErrorCode.INVALID_MESSAGE, "binary frames are not accepted: send JSON text frames")
    obj = _parse_object(data)
    if isinstance(obj, ProtocolError):
        return obj
    if problem := _check_envelope(obj):
        return problem
    ref = obj.get("id")
    try:
        command_type = CommandType(obj["type"])
    except ValueError:
        hint = " (events are sent inside PUBLISH)" if obj["type"] in EventType.__members__ else ""
        return _refuse(ErrorCode.UNKNOWN_TYPE, f"unknown message type {obj['type']!r}{hint}", "type", ref)
    try:
        payload = converter.structure(obj.get("payload", {}), COMMAND_PAYLOADS[command_type])
    except Exception as exc:  # noqa: BLE001 - every structuring failure becomes an ERROR
        path, message = describe_failure(exc)
        return _refuse(ErrorCode.INVALID_PAYLOAD, message, path, ref)
    if problem := _check_channels(payload, ref):
        return problem
    return Command(type=command_type, payload=payload, id=ref)


def decode_message(data: str | bytes) -> Envelope | ProtocolError:
    """Decode any message of the protocol (either direction) into an Envelope.

    Clients use it on what the server sends; a type this version does not know keeps
    its payload as a plain dict so that newer servers do not break older clients.
    """
    obj = _parse_object(data)
    if isinstance(obj, ProtocolError):
        return obj
    if problem := _check_envelope(obj):
        return problem
    payload_cls = _ALL_PAYLOADS.get(obj["type"])
    raw_payload = obj.get("payload", {})
    try:
        payload = raw_payload if payload_cls is None else converter.structure(raw_payload, payload_cls)
    except Exception as exc:  # noqa: BLE001 - every structuring failure becomes an ERROR
        path, message = describe_failure(exc)
        return _refuse(ErrorCode.INVALID_PAYLOAD, message, path, obj.get("id"))
    return Envelope(
        type=obj["type"],
        payload=payload,
        id=obj.get("id") or "",
        timestamp=obj.get("timestamp") or "",
        version=obj.get("version", PROTOCOL_VERSION),
        channel=obj.get("channel"),
        offset=obj.get("offset"),
        epoch=obj.get("epoch"),
    )


def reply_type(message_type: str) -> ReplyType | None:
    """The ReplyType of a server control message, or None for events and unknown types."""
    try:
        return ReplyType(message_type)
    except ValueError:
        return None
