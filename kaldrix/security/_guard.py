"""The gateway's abuse defences in one place: who may open a connection, and how much it may send.

A Guard holds the block list, the trusted proxies, the Origin policy, the handshake
rate limit, the connection count and the authentication-failure count per client, and
hands out one MessageRate per connection. It does no I/O and takes the time as an
argument; the server asks it before each upgrade and tells it what happened after.
Limits, counts and bans key on the client (an IPv4 address, or an IPv6 /64).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

from ..config import ConfigError
from ..protocol import MAX_CHANNEL_LENGTH
from ._addresses import client_key, parse_network
from ._blocklist import Block, Blocklist
from ._origin import OriginPolicy, check_allowlist_entry
from ._proxies import TrustedProxies
from ._ratelimit import MessageRate, SlidingWindow

if TYPE_CHECKING:
    from ..config import Config

BAN_REASON = "repeated authentication failures"


@attrs.frozen
class Refusal:
    """A handshake the gateway turns away before the upgrade."""

    status: int
    reason: str
    """Sent to the client and written to the audit log."""
    event: str
    """The audit event name."""
    retry_after: int | None = None
    """Whole seconds, for the Retry-After header of a 429."""


class Guard:
    """Admission and rate decisions for one gateway. Every limit of 0 is off."""

    def __init__(
        self,
        *,
        blocked_addresses: tuple[str, ...] = (),
        trusted_proxies: tuple[str, ...] = (),
        allowed_origins: tuple[str, ...] = (),
        allow_missing_origin: bool = True,
        handshake_rate_limit: int = 100,
        handshake_rate_window: float = 60.0,
        max_connections_per_ip: int = 0,
        message_rate: float = 0.0,
        message_burst: int = 1,
        rate_limit_strikes: int = 20,
        auth_failure_limit: int = 0,
        auth_failure_window: float = 60.0,
        auth_ban_duration: float = 600.0,
    ) -> None:
        self.blocklist = Blocklist(blocked_addresses)
        self.proxies = TrustedProxies(trusted_proxies)
        self.origins = OriginPolicy(allowed_origins, allow_missing=allow_missing_origin)
        self.handshakes = SlidingWindow(handshake_rate_limit, handshake_rate_window) if handshake_rate_limit else None
        self.max_connections_per_ip = max_connections_per_ip
        self.message_rate = message_rate
        self.message_burst = message_burst
        self.rate_limit_strikes = rate_limit_strikes
        self.auth_failures = SlidingWindow(auth_failure_limit, auth_failure_window) if auth_failure_limit else None
        self.auth_ban_duration = auth_ban_duration
        self._connections: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: Config) -> Guard:
        """The guard the settings describe; ConfigError names a setting that cannot be used."""
        check_settings(config)
        return cls(
            blocked_addresses=config.blocked_addresses,
            trusted_proxies=config.trusted_proxies,
            allowed_origins=config.allowed_origins,
            allow_missing_origin=config.allow_missing_origin,
            handshake_rate_limit=config.handshake_rate_limit,
            handshake_rate_window=config.handshake_rate_window,
            max_connections_per_ip=config.max_connections_per_ip,
            message_rate=config.message_rate,
            message_burst=config.message_burst,
            rate_limit_strikes=config.rate_limit_strikes,
            auth_failure_limit=config.auth_failure_limit,
            auth_failure_window=config.auth_failure_window,
            auth_ban_duration=config.auth_ban_duration,
        )

    # -- handshakes ------------------------------------------------------------------

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address: the socket peer, or X-Forwarded-For behind a trusted proxy."""
        return self.proxies.client_address(peer, forwarded_for)

    def admit(self, address: str, *, origin: str | None, host: str | None, now: float) -> Refusal | None:
        """None to let `address` upgrade now, else why not. An admitted handshake counts
        towards the handshake rate limit (refused ones do not)."""
        block = self.blocklist.match(address, now)
        if block is not None:
            return Refusal(403, "this address is blocked", "handshake_blocked")
        if reason := self.origins.refusal(origin, host):
            return Refusal(403, reason, "origin_refused")
        key = client_key(address)
        if self.max_connections_per_ip and self._connections.get(key, 0) >= self.max_connections_per_ip:
            return Refusal(429, "too many connections from this address", "too_many_connections")
        if self.handshakes is not None:
            wait = self.handshakes.acquire(key, now)
            if wait > 0.0:
                return Refusal(429, "too many handshakes from this address", "handshake_rate_limited", math.ceil(wait))
        return None

    def connected(self, address: str) -> None:
        key = client_key(address)
        self._connections[key] = self._connections.get(key, 0) + 1

    def disconnected(self, address: str) -> None:
        key = client_key(address)
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
        else:
            self._connections.pop(key, None)

    def connection_count(self, address: str) -> int:
        return self._connections.get(client_key(address), 0)

    # -- connections -------------------------------------------------------------------

    def new_message_rate(self, now: float) -> MessageRate | None:
        """A fresh budget for one connection, or None when messages are not limited."""
        if not self.message_rate:
            return None
        return MessageRate(self.message_rate, self.message_burst, self.rate_limit_strikes, now)

    def blocked(self, address: str, now: float) -> Block | None:
        return self.blocklist.match(address, now)

    def auth_failed(self, address: str, now: float) -> Block | None:
        """Count a failed authentication; the temporary ban it triggers, if any."""
        if self.auth_failures is None:
            return None
        key = client_key(address)
        self.auth_failures.acquire(key, now)
        if self.auth_failures.count(key, now) < self.auth_failures.limit:
            return None
        self.auth_failures.forget(key)
        return self.blocklist.block(key, reason=BAN_REASON, now=now, duration=self.auth_ban_duration)

    # -- the block list ----------------------------------------------------------------

    def block(self, spec: str, *, reason: str, now: float, duration: float | None = None) -> Block:
        """Block an address or CIDR (ValueError when `spec` is neither)."""
        return self.blocklist.block(spec, reason=reason, now=now, duration=duration)

    def unblock(self, spec: str) -> bool:
        """Lift the entry for exactly `spec`, and forget the failures counted against it."""
        removed = self.blocklist.unblock(spec)
        if self.auth_failures is not None:
            self.auth_failures.forget(client_key(str(parse_network(spec).network_address)))
        return removed


def check_settings(config: Config) -> None:
    """Raise ConfigError for a security setting that cannot be used, naming it."""
    for name in ("blocked_addresses", "trusted_proxies"):
        for entry in getattr(config, name):
            try:
                parse_network(entry)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    for entry in config.allowed_origins:
        try:
            check_allowlist_entry(entry)
        except ValueError as exc:
            raise ConfigError(f"allowed_origins: {exc}") from None
    for name in ("handshake_rate_limit", "max_connections_per_ip", "auth_failure_limit"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}: expected 0 (no limit) or a positive integer")
    for name in ("message_burst", "rate_limit_strikes"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: expected a positive integer")
    if not (math.isfinite(config.message_rate) and config.message_rate >= 0):
        raise ConfigError("message_rate: expected 0 (no limit) or a positive number of messages per second")
    for name in ("handshake_rate_window", "auth_failure_window", "auth_ban_duration"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}: expected a positive number of seconds")
    if not 1 <= config.max_channel_length <= MAX_CHANNEL_LENGTH:
        raise ConfigError(f"max_channel_length: expected 1 to {MAX_CHANNEL_LENGTH} (the protocol's own limit)")
