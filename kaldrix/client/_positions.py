"""Where the client stands on each channel, and what to call a hole in the stream.

The table maps a channel to the (offset, epoch) of the last event the client saw.
A reconnect asks the server to replay from there; anything at or below it that
arrives anyway is dropped, and anything that cannot be filled becomes a Gap.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from ..protocol import ChannelPosition


class GapReason(enum.StrEnum):
    EPOCH_CHANGED = "epoch_changed"
    """The channel's history was lost (a new broker, a reset): offsets start over."""
    HISTORY_TRIMMED = "history_trimmed"
    """The server no longer holds the missed events (trimmed, expired, or rewound)."""
    OFFSET_SKIPPED = "offset_skipped"
    """An event arrived past the next expected offset."""


@attrs.frozen
class Gap:
    """Events of `channel` the client will never see.

    It saw up to `last_offset` of `epoch`; delivery continues after `new_offset` of
    `new_epoch`. Within one epoch the lost events are offsets last_offset+1..new_offset.
    """

    channel: str
    last_offset: int
    epoch: str
    new_offset: int
    new_epoch: str
    reason: GapReason

    @property
    def missed(self) -> int | None:
        """How many events were lost, when that is known (same epoch)."""
        return self.new_offset - self.last_offset if self.epoch == self.new_epoch else None


class Positions:
    """The rules for the last-offset table (kept in ClientState.last_offsets)."""

    def __init__(self, table: dict[str, tuple[int, str]]) -> None:
        self.table = table

    def since(self, channels: list[str]) -> dict[str, dict[str, Any]]:
        """The SUBSCRIBE `since` for the channels the client has a position on."""
        return {
            name: {"offset": self.table[name][0], "epoch": self.table[name][1]}
            for name in channels
            if name in self.table
        }

    def subscribed(self, channel: str, position: ChannelPosition) -> Gap | None:
        """Take in a SUBSCRIBE ACK; a Gap when the server could not replay what was missed."""
        previous = self.table.get(channel)
        if previous is None or position.recovered:
            # A first join starts from now; a recovered one is advanced by the replay.
            self.table.setdefault(channel, (position.offset, position.epoch))
            return None
        self.table[channel] = (position.offset, position.epoch)
        last, epoch = previous
        if (last, epoch) == (position.offset, position.epoch):
            return None
        reason = GapReason.EPOCH_CHANGED if epoch != position.epoch else GapReason.HISTORY_TRIMMED
        return Gap(channel, last, epoch, position.offset, position.epoch, reason)

    def admit(self, channel: str, offset: int, epoch: str) -> tuple[bool, Gap | None]:
        """Whether to deliver an event, and the Gap it reveals if any."""
        previous = self.table.get(channel)
        if previous is None:
            self.table[channel] = (offset, epoch)
            return True, None
        last, known_epoch = previous
        if epoch == known_epoch and offset <= last:
            return False, None
        self.table[channel] = (offset, epoch)
        if epoch != known_epoch:
            return True, Gap(channel, last, known_epoch, offset - 1, epoch, GapReason.EPOCH_CHANGED)
        if offset != last + 1:
            return True, Gap(channel, last, epoch, offset - 1, epoch, GapReason.OFFSET_SKIPPED)
        return True, None

    def forget(self, channel: str) -> None:
        self.table.pop(channel, None)
