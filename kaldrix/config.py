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
    # security
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway: float = 30.0
    require_auth: bool = False
    allow_anonymous_publish: bool = False

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
    if config.require_auth and config.open_mode:
        raise ConfigError("require_auth needs jwt_secret or jwt_public_key: nobody could authenticate")
    if not 0 <= config.port <= 65535:
        raise ConfigError("port: expected 0-65535")


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
