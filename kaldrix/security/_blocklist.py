"""Blocked addresses and networks, permanent or for a while (bans).

Entries are IPv4 or IPv6 networks (a single address is a /32 or /128). A temporary
entry expires on its own; it never shortens a permanent one on the same network.
Times are seconds on a monotonic clock, passed in by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from ._addresses import Network, NetworkMap, parse_address, parse_network


@attrs.frozen
class Block:
    """One entry of the block list."""

    network: Network
    reason: str
    expires_at: float | None = None
    """Monotonic time the entry lapses at; None for a permanent block."""

    @property
    def address(self) -> str:
        """The entry as people write it: ``203.0.113.7`` for one address, else the CIDR."""
        network = self.network
        if network.prefixlen == network.max_prefixlen:
            return str(network.network_address)
        return str(network)

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


class Blocklist:
    """Which client addresses the gateway refuses."""

    def __init__(self, permanent: Iterable[str] = (), *, reason: str = "configured") -> None:
        self._entries: NetworkMap[Block] = NetworkMap()
        for spec in permanent:
            self.block(spec, reason=reason, now=0.0)

    def __len__(self) -> int:
        return len(self._entries)

    def block(self, spec: str, *, reason: str, now: float, duration: float | None = None) -> Block:
        """Block the address or CIDR `spec` (for `duration` seconds, or for good).

        Raises ValueError when `spec` is not an address or network, or `duration` is not
        a positive number.
        """
        network = parse_network(spec)
        expires_at = None
        if duration is not None:
            if not (math.isfinite(duration) and duration > 0):
                raise ValueError("a block duration must be a positive number of seconds")
            expires_at = now + duration
        existing = self._entries.get(network)
        if existing is not None and existing.active(now):
            if existing.expires_at is None or (expires_at is not None and existing.expires_at >= expires_at):
                return existing
        entry = Block(network, reason, expires_at)
        self._entries.set(network, entry)
        return entry

    def unblock(self, spec: str) -> bool:
        """Remove the entry for exactly `spec`; False when there was none.

        An address inside a blocked range stays blocked: unblock the range itself.
        """
        return self._entries.remove(parse_network(spec))

    def match(self, address: str, now: float) -> Block | None:
        """The entry that blocks `address` at `now`, or None (also for unparsable addresses)."""
        parsed = parse_address(address)
        if parsed is None:
            return None
        lapsed = []
        found = None
        for network, entry in self._entries.matches(parsed):
            if entry.active(now):
                found = entry
                break
            lapsed.append(network)
        for network in lapsed:
            self._entries.remove(network)
        return found

    def entries(self, now: float) -> list[Block]:
        """Every active entry, permanent ones first, each group in address order."""
        lapsed = [network for network, entry in self._entries if not entry.active(now)]
        for network in lapsed:
            self._entries.remove(network)
        return sorted(
            (entry for _, entry in self._entries),
            key=lambda e: (e.expires_at is not None, e.network.version, e.network),
        )
