"""How a broker stores and ships events: compact bytes, not wire frames.

An event becomes one record (`encode_event`): a JSON header line ``[type, id,
timestamp, accepted_at]``, a newline, then the payload JSON untouched, so the payload
is never parsed again. orjson never writes a raw newline, so the first newline always
ends the header, whatever the payload holds.

A channel's live message carries one or more numbered records of one epoch
(`encode_live`): ``<epoch>\\n`` then, per record, ``<offset> <length>\\n<record>``.
The Redis publish script builds the same bytes in Lua; the memory engine stores them.
Length prefixes keep the framing independent of what the records contain.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from ._base import BrokerEvent, Publication


class RecordError(ValueError):
    """Bytes that are not a broker record: another writer, or a corrupted store."""


def encode_event(event: BrokerEvent) -> bytes:
    header = orjson.dumps([event.type, event.id, event.timestamp, event.accepted_at])
    return header + b"\n" + event.payload


def decode_event(record: bytes) -> BrokerEvent:
    header, newline, payload = record.partition(b"\n")
    if not newline:
        raise RecordError("record without a header line")
    try:
        event_type, event_id, timestamp, accepted_at = orjson.loads(header)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        raise RecordError(f"bad record header: {exc}") from exc
    return BrokerEvent(event_type, event_id, timestamp, payload, float(accepted_at))


def encode_live(epoch: str, records: Iterable[tuple[int, bytes]]) -> bytes:
    parts = [epoch.encode(), b"\n"]
    for offset, record in records:
        parts.append(b"%d %d\n" % (offset, len(record)))
        parts.append(record)
    return b"".join(parts)


def decode_live(channel: str, data: bytes) -> list[Publication]:
    """The publications of one live message, in the order they were numbered."""
    end = data.find(b"\n")
    if end < 0:
        raise RecordError("live message without an epoch line")
    epoch = data[:end].decode()
    publications = []
    at = end + 1
    size = len(data)
    try:
        while at < size:
            space = data.index(b" ", at)
            newline = data.index(b"\n", space)
            offset = int(data[at:space])
            start = newline + 1
            at = start + int(data[space + 1 : newline])
            if at > size:
                raise RecordError("live message cut short")
            publications.append(Publication(channel, offset, epoch, decode_event(data[start:at])))
    except ValueError as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"bad live message framing: {exc}") from exc
    return publications
