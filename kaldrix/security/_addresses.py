"""IP addresses and networks as the security checks see them.

Every check keys on the same normal form: an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``,
what a dual-stack socket reports for an IPv4 peer) counts as its IPv4 address, so a client
cannot slip past a block on ``1.2.3.4`` by arriving over IPv6. Sets of networks are
matched with one dictionary look-up per prefix length in use, not one comparison per entry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

IPV6_SUBSCRIBER_PREFIX = 64
"""An IPv6 client usually owns a whole /64 and can pick a new address in it at will, so
rate limits, connection counts and bans treat a /64 as one client."""

T = TypeVar("T")


def parse_address(text: str) -> Address | None:
    """The address in `text` (``1.2.3.4``, ``2001:db8::1``, ``[2001:db8::1]``), or None."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmapped(address)


def parse_network(text: str) -> Network:
    """The network in `text`: a CIDR (``10.0.0.0/8``, ``2001:db8::/32``) or one address.

    Host bits are cleared (``10.1.2.3/8`` is ``10.0.0.0/8``). Raises ValueError naming `text`.
    """
    stripped = text.strip()
    single = parse_address(stripped)
    if single is not None:
        return ipaddress.ip_network(single)
    try:
        network = ipaddress.ip_network(stripped, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR range: {text!r}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


def client_key(address: str) -> str:
    """What limits and bans count per: the address itself, or its /64 for IPv6."""
    parsed = parse_address(address)
    if parsed is None:
        return address
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/{IPV6_SUBSCRIBER_PREFIX}", strict=False))
    return str(parsed)


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class NetworkMap(Generic[T]):
    """Networks, each with a value; finds the most specific network holding an address."""

    def __init__(self) -> None:
        # (version, prefix length) -> {network bits shifted down: (network, value)}
        self._by_prefix: dict[tuple[int, int], dict[int, tuple[Network, T]]] = {}

    def __len__(self) -> int:
        return sum(len(table) for table in self._by_prefix.values())

    def __iter__(self) -> Iterator[tuple[Network, T]]:
        for table in self._by_prefix.values():
            yield from table.values()

    def set(self, network: Network, value: T) -> None:
        key = (network.version, network.prefixlen)
        bits = int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
        self._by_prefix.setdefault(key, {})[bits] = (network, value)

    def get(self, network: Network) -> T | None:
        """The value stored for exactly `network`."""
        table = self._by_prefix.get((network.version, network.prefixlen), {})
        found = table.get(int(network.network_address) >> (network.max_prefixlen - network.prefixlen))
        return None if found is None else found[1]

    def remove(self, network: Network) -> bool:
        key = (network.version, network.prefixlen)
        table = self._by_prefix.get(key)
        bits = int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
        if not table or table.pop(bits, None) is None:
            return False
        if not table:
            del self._by_prefix[key]
        return True

    def matches(self, address: Address) -> Iterator[tuple[Network, T]]:
        """Every network holding `address`, most specific first."""
        value = int(address)
        width = address.max_prefixlen
        keys = sorted((k for k in self._by_prefix if k[0] == address.version), key=lambda k: -k[1])
        for key in keys:
            found = self._by_prefix[key].get(value >> (width - key[1]))
            if found is not None:
                yield found


class NetworkSet:
    """A set of networks with a fast 'does any of them hold this address?'."""

    def __init__(self, specs: Iterable[str] = ()) -> None:
        self._map: NetworkMap[None] = NetworkMap()
        for spec in specs:
            self._map.set(parse_network(spec), None)

    def __bool__(self) -> bool:
        return len(self._map) > 0

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            address = parse_address(address)
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return next(self._map.matches(_unmapped(address)), None) is not None
