"""Server configuration: one attrs class, filled from defaults, a TOML file, the
environment (``KALDRIX_*``) and command-line flags, in that order of precedence.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs

from .protocol._converter import describe_failure


@attrs.frozen
class Config:
    """Everything `kaldrix serve` can be told. Durations are in seconds."""

    host: str = "127.0.0.1"
    port: int = 3000
    # chain simulator
    simulate: bool = True
    sim_rate: float = 0.0
    """Total simulated events per second to aim for (0: the chain's natural pace, about 9/s)."""
    sim_block_interval: float = 2.0
    sim_seed: int | None = None
    # logging
    log_level: str = "basic"
    log_file: str | None = None
    log_format: str = "text"
    # history and delivery
    history_size: int = 1000
    history_ttl: float = 300.0
    dedup_window: float = 120.0
    outbox_size: int = 4096
    # the broker: where channels' offsets, epochs, history and dedup ids live
    broker: str = "memory"
    """``memory`` (this process alone) or ``redis://[:password@]host:port/db`` (many nodes share channels)."""
    redis_prefix: str = "kx"
    """Prefix of every Redis key and Pub/Sub name, so several deployments can share one Redis."""
    broker_timeout: float = 2.0
    """Seconds a broker request may take before it fails (and the broker counts as down)."""
    broker_meta_ttl: float = 30 * 24 * 3600.0
    """Seconds a quiet channel keeps its offset and epoch in Redis (then it starts over; 0: forever)."""
    broker_keepalive: float = 5.0
    """Seconds the live link to Redis may stay silent before it is checked (a hung Redis is
    noticed within this plus broker_timeout)."""
    broker_reconnect_max: float = 5.0
    """Longest wait between reconnect attempts to Redis (exponential backoff with jitter)."""
    max_message_size: int = 1 << 20
    max_channels_per_connection: int = 256
    max_batch_size: int = 500
    # liveness and timeouts
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    handshake_timeout: float = 10.0
    auth_timeout: float = 10.0
    close_timeout: float = 2.0
    shutdown_timeout: float = 5.0
    # reliability: slow consumers, channel heartbeats, graceful drain
    outbox_max_bytes: int = 8 << 20
    """Bytes queued per connection before it is closed as a slow consumer (4008), beside outbox_size."""
    channel_heartbeat: float = 15.0
    """Seconds a subscribed channel may be quiet before its subscribers get a HEARTBEAT (0: never)."""
    drain_close_code: int = 1001
    """Close code for every client on SIGTERM: 1001 (final shutdown) or 1012 (restart); SIGINT always 1001."""
    # security
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway: float = 30.0
    require_auth: bool = False
    allow_anonymous_publish: bool = False
    # security: abuse limits, blocking, proxies, Origin (kaldrix.security.Guard; 0 turns a limit off)
    handshake_rate_limit: int = 100
    """WebSocket handshakes per client address within handshake_rate_window; more get HTTP 429."""
    handshake_rate_window: float = 60.0
    max_connections_per_ip: int = 1000
    """Open connections per client address (an IPv6 /64 counts as one); more get HTTP 429."""
    message_rate: float = 100.0
    """Messages per second a connection may send, on average (token bucket); producers are exempt."""
    message_burst: int = 200
    """Messages a connection may send at once before message_rate applies."""
    rate_limit_strikes: int = 20
    """RATE_LIMITED answers within 10 s after which the connection is closed with 4029."""
    max_channel_length: int = 200
    """Longest channel name accepted in SUBSCRIBE and PUBLISH (at most the protocol's 200)."""
    auth_failure_limit: int = 10
    """Failed authentications from one address within auth_failure_window before a temporary ban."""
    auth_failure_window: float = 60.0
    auth_ban_duration: float = 600.0
    blocked_addresses: tuple[str, ...] = ()
    """Addresses and CIDR ranges (IPv4, IPv6) refused with 403 from the start."""
    trusted_proxies: tuple[str, ...] = ()
    """Proxies (addresses, CIDRs) whose X-Forwarded-For header names the client."""
    allowed_origins: tuple[str, ...] = ()
    """Origins browsers may connect from (https://a.example, https://*.example, *); empty: any."""
    allow_missing_origin: bool = True
    """Accept handshakes without an Origin header (non-browser clients)."""
    # metrics and alerts (the seed's samplingInterval, maxSamples and alert thresholds)
    sampling_interval: float = 5.0
    """Seconds between metrics samples and alert checks."""
    max_samples: int = 1000
    """Metrics samples kept in memory (a bounded ring)."""
    alert_delivery_latency_ms: float = 100.0
    """Alert when the average delivery latency of a sampling interval is above this (0: never)."""
    alert_failed_connections: int = 10
    """Alert when more connections than this fail within a sampling interval (0: never)."""
    alert_slow_consumers: int = 10
    """Alert when more slow consumers than this are closed within a sampling interval (0: never)."""
    alert_errors: int = 100
    """Alert when more ERROR replies than this are sent within a sampling interval (0: never)."""
    alert_memory_mb: float = 2048.0
    """Alert when the server's resident memory is above this many MiB (0: never)."""
    record_latency: bool = True
    """Time every delivery into the latency histogram (off: counters only; to measure its cost)."""
    direct_writes: bool = True
    """Write frames straight into sockets that can take them (off: always via the writer task)."""

    @property
    def open_mode(self) -> bool:
        """No way to verify tokens: anyone may connect (development only)."""
        return self.jwt_secret is None and self.jwt_public_key is None


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the setting."""


_converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)
_FIELDS = {field.name: field for field in attrs.fields(Config)}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_text(name: str, text: str) -> Any:
    """Turn an environment string into the field's type."""
    kind = str(_FIELDS[name].type)
    if kind.startswith("bool"):
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise ConfigError(f"KALDRIX_{name.upper()}: expected true or false, got {text!r}")
        return lowered in _TRUE
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind.startswith("int"):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"KALDRIX_{name.upper()}: expected an integer, got {text!r}") from None
    if kind.startswith("float"):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"KALDRIX_{name.upper()}: expected a number, got {text!r}") from None
    return text


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name in _FIELDS:
        key = f"KALDRIX_{name.upper()}"
        if key in environ:
            values[name] = _from_text(name, environ[key])
    return values


def _from_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    flat = dict(data.pop("kaldrix", {}))
    flat.update(data)
    return {key.replace("-", "_"): value for key, value in flat.items()}


def load_config(
    file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults < file < environment < overrides into a checked Config."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(_from_file(file))
    values.update(_from_environment(os.environ if environ is None else environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    try:
        config = _converter.structure(values, Config)
    except Exception as exc:  # noqa: BLE001 - reported with the setting's name
        path, message = describe_failure(exc, path="config")
        raise ConfigError(f"{path}: {message}") from None
    _check(config)
    return config


def _check(config: Config) -> None:
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}")
    if config.log_format not in ("text", "json"):
        raise ConfigError("log_format: expected text or json")
    for name in ("history_size", "outbox_size", "max_message_size", "max_channels_per_connection"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: expected a positive integer")
    if config.outbox_max_bytes < 1:
        raise ConfigError("outbox_max_bytes: expected a positive integer")
    if config.channel_heartbeat < 0:
        raise ConfigError("channel_heartbeat: expected a number of seconds >= 0 (0 turns heartbeats off)")
    if config.drain_close_code not in (1001, 1012):
        raise ConfigError("drain_close_code: expected 1001 (shutdown) or 1012 (restart)")
    if config.require_auth and config.open_mode:
        raise ConfigError("require_auth needs jwt_secret or jwt_public_key: nobody could authenticate")
    from .security import check_settings  # here: kaldrix.security imports this module

    check_settings(config)
    if config.broker != "memory" and not config.broker.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"broker: expected memory or a redis://host:port/db URL, got {config.broker!r}")
    if not (config.broker_timeout > 0 and config.broker_keepalive > 0 and config.broker_reconnect_max > 0):
        raise ConfigError("broker_timeout, broker_keepalive, broker_reconnect_max: expected positive numbers of seconds")
    if config.broker_meta_ttl < 0:
        raise ConfigError("broker_meta_ttl: expected a number of seconds >= 0 (0: forever)")
    if not 0 <= config.port <= 65535:
        raise ConfigError("port: expected 0-65535")
    # metrics and alerts
    if not config.sampling_interval > 0 or config.max_samples < 1:
        raise ConfigError("sampling_interval and max_samples: expected positive numbers")


LOG_LEVELS = {
    # the seed's names, then the standard ones
    "basic": "INFO",
    "detailed": "DEBUG",
    "verbose": "DEBUG",
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "error": "ERROR",
}
