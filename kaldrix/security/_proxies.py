"""The client's address behind reverse proxies (X-Forwarded-For), trusted only when earned.

Each proxy appends the address it received the request from to X-Forwarded-For, so the
header reads ``client, proxy1, proxy2`` and the socket peer is the last proxy. Anything
left of an untrusted hop may have been written by the client itself. The header is
therefore read only when the socket peer is a trusted proxy, from the right, skipping
trusted proxies, and the first address that is not one is the client. A client cannot
spoof its way past a block or a rate limit by sending the header itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._addresses import NetworkSet, parse_address

MAX_FORWARDED_HOPS = 32
"""Entries of X-Forwarded-For looked at, from the right; a longer chain is not believed further."""


def _hop_address(entry: str) -> str | None:
    """The address in one X-Forwarded-For entry (``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80``)."""
    entry = entry.strip()
    if entry.startswith("["):
        end = entry.find("]")
        entry = entry[1:end] if end > 0 else entry
    elif entry.count(":") == 1:
        entry = entry.split(":", 1)[0]
    address = parse_address(entry)
    return None if address is None else str(address)


class TrustedProxies:
    """The proxies (addresses or CIDRs) whose X-Forwarded-For the gateway believes."""

    def __init__(self, specs: Iterable[str] = ()) -> None:
        self._networks = NetworkSet(specs)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str) -> bool:
        return address in self._networks

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """Who the client is, given the socket peer and the X-Forwarded-For header (if any)."""
        peer_address = parse_address(peer)
        normal_peer = peer if peer_address is None else str(peer_address)
        if not forwarded_for or not self.trusts(normal_peer):
            return normal_peer
        client = normal_peer
        for entry in reversed(forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]):
            hop = _hop_address(entry)
            if hop is None:
                # A trusted proxy wrote garbage: the last hop we could read is all we know.
                return client
            client = hop
            if not self.trusts(hop):
                return hop
        return client
