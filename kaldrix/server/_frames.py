"""Encoding server messages into ready-to-write WebSocket frames."""

from __future__ import annotations

from typing import Any

import orjson

from ..protocol import PROTOCOL_VERSION, Envelope, ErrorPayload, ProtocolError, ReplyType, new_id
from ._wire import text_frame


def event_frame(
    event_type: str, payload: bytes, event_id: str, timestamp: str, channel: str, offset: int, epoch: str
) -> bytes:
    """A delivered event as one frame; `payload` is its JSON, already encoded once."""
    return text_frame(
        orjson.dumps(
            {
                "type": event_type,
                "payload": orjson.Fragment(payload),
                "timestamp": timestamp,
                "id": event_id,
                "version": PROTOCOL_VERSION,
                "channel": channel,
                "offset": offset,
                "epoch": epoch,
            }
        )
    )


def reply_frame(reply: ReplyType, payload: Any) -> bytes:
    """A control message (WELCOME, ACK, ERROR, PONG, METRICS_RESPONSE) as one frame."""
    return text_frame(Envelope(reply.value, payload, id=new_id()).encode())


def error_frame(error: ProtocolError) -> bytes:
    """An ERROR frame for a refused message."""
    payload = ErrorPayload(code=error.code, message=error.message, ref=error.ref, path=error.path)
    return reply_frame(ReplyType.ERROR, payload)
