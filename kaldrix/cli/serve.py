"""Run the gateway: WebSocket at /ws, ops HTTP (/healthz, /readyz) on the same port.

Settings come from defaults < --config FILE (TOML) < KALDRIX_* environment < flags.
Ctrl-C or SIGTERM closes every client with 1001 and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import trio

from ..config import LOG_LEVELS, ConfigError, load_config

log = logging.getLogger("kaldrix.server")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 3000; 0 picks a free one)")
    parser.add_argument("--no-simulate", dest="simulate", action="store_const", const=False, help="do not run the chain simulator")
    parser.add_argument("--sim-rate", type=float, help="simulated events per second (default: the chain's natural pace)")
    parser.add_argument("--sim-seed", type=int, help="seed for a reproducible simulated chain")
    parser.add_argument("--log-level", choices=sorted(LOG_LEVELS), help="basic (info), detailed or verbose (debug), ...")
    parser.add_argument("--log-file", help="write logs to this file instead of stderr")
    parser.add_argument("--log-format", choices=("text", "json"), help="log line format (default text)")
    parser.add_argument("--jwt-secret", help="HS256 secret for client tokens (env KALDRIX_JWT_SECRET)")
    parser.add_argument("--jwt-public-key", metavar="FILE", help="PEM public key for RS256/ES256 tokens")
    parser.add_argument("--require-auth", action="store_const", const=True, help="refuse clients without a valid token")
    parser.add_argument(
        "--allow-anonymous-publish", action="store_const", const=True, help="let clients without a token PUBLISH (development)"
    )
    parser.add_argument("--history-size", type=int, help="events kept per channel for recovery (default 1000)")
    parser.add_argument("--history-ttl", type=float, help="seconds an event stays recoverable (default 300)")
    parser.add_argument("--outbox-size", type=int, help="frames queued per client before it is a slow consumer (default 4096)")
    parser.add_argument("--ping-interval", type=float, help="seconds between WebSocket pings (default 20)")
    parser.add_argument("--ping-timeout", type=float, help="seconds a ping may go unanswered (default 20)")


_FLAGS = (
    "host", "port", "simulate", "sim_rate", "sim_seed", "log_level", "log_file", "log_format",
    "jwt_secret", "jwt_public_key", "require_auth", "allow_anonymous_publish", "history_size",
    "history_ttl", "outbox_size", "ping_interval", "ping_timeout",
)


def run(args: argparse.Namespace) -> int:
    from .._logging import configure_logging

    overrides: dict[str, Any] = {name: getattr(args, name) for name in _FLAGS}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"kaldrix serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    try:
        trio.run(_serve, config)
    except (OSError, ExceptionGroup) as exc:
        cause = _first_os_error(exc)
        if cause is None:
            raise
        print(f"kaldrix serve: cannot listen on {config.host}:{config.port}: {cause.strerror or cause}", file=sys.stderr)
        return 1
    return 0


def _first_os_error(exc: BaseException) -> OSError | None:
    """The OSError (a taken port, a bad address) inside nursery exception groups."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _first_os_error(inner)) is not None:
                return found
    return None


async def _serve(config: Any) -> None:
    from ..server import Gateway

    gateway = Gateway(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            async for signum in signals:
                log.info("%s: closing every client with 1001", signal.Signals(signum).name)
                await gateway.shutdown(1001)
                break
    log.info("stopped")
