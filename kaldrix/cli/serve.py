"""Run the gateway: WebSocket at /ws, ops HTTP (/healthz, /readyz) on the same port.

Settings come from defaults < --config FILE (TOML) < KALDRIX_* environment < flags.
Ctrl-C or SIGTERM drains: no new clients, every client closed with 1001 (SIGTERM: the
`drain_close_code`, 1012 for a restart) after its queued frames, then exit 0.
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
    parser.add_argument(
        "--broker", metavar="URL", help="memory (default: this node alone) or redis://host:port/db (nodes share channels)"
    )
    parser.add_argument("--redis-prefix", metavar="PREFIX", help="prefix of every Redis key (default kx)")
    parser.add_argument("--history-size", type=int, help="events kept per channel for recovery (default 1000)")
    parser.add_argument("--history-ttl", type=float, help="seconds an event stays recoverable (default 300)")
    parser.add_argument("--outbox-size", type=int, help="frames queued per client before it is a slow consumer (default 4096)")
    parser.add_argument("--ping-interval", type=float, help="seconds between WebSocket pings (default 20)")
    parser.add_argument("--ping-timeout", type=float, help="seconds a ping may go unanswered (default 20)")
    parser.add_argument("--outbox-max-bytes", type=int, help="bytes queued per client before it is a slow consumer (default 8 MiB)")
    parser.add_argument("--channel-heartbeat", type=float, help="seconds of quiet before a channel's HEARTBEAT (default 15; 0: off)")
    parser.add_argument(
        "--drain-close-code", type=int, choices=(1001, 1012), help="close code on SIGTERM: 1001 shutdown (default), 1012 restart"
    )
    parser.add_argument("--shutdown-timeout", type=float, help="seconds clients get to flush and close on shutdown (default 5)")
    parser.add_argument("--report", action="store_true", help="print the performance report on stdout at shutdown")
    _security_flags(parser.add_argument_group("security"))


def _list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _security_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--trusted-proxies", type=_list, metavar="LIST", help="proxies (addresses, CIDRs) whose X-Forwarded-For names the client")
    group.add_argument("--blocked-addresses", type=_list, metavar="LIST", help="addresses and CIDRs refused with 403 from the start")
    group.add_argument("--allowed-origins", type=_list, metavar="LIST", help="Origins browsers may connect from (default: any)")
    group.add_argument("--deny-missing-origin", dest="allow_missing_origin", action="store_const", const=False,
                       help="refuse handshakes without an Origin header")
    group.add_argument("--handshake-rate-limit", type=int, metavar="N", help="handshakes per address per window (default 100; 0: off)")
    group.add_argument("--handshake-rate-window", type=float, metavar="S", help="seconds of the handshake window (default 60)")
    group.add_argument("--max-connections-per-ip", type=int, metavar="N", help="open connections per address (default 1000; 0: off)")
    group.add_argument("--message-rate", type=float, metavar="N", help="messages per second per connection, producers exempt (default 100; 0: off)")
    group.add_argument("--message-burst", type=int, metavar="N", help="messages a connection may send at once (default 200)")
    group.add_argument("--max-message-size", type=int, metavar="BYTES", help="largest client message (default 1 MiB)")
    group.add_argument("--max-channels-per-connection", type=int, metavar="N", help="subscriptions per connection (default 256)")
    group.add_argument("--auth-failure-limit", type=int, metavar="N", help="failed authentications per address per minute before a ban (default 10; 0: off)")
    group.add_argument("--auth-ban-duration", type=float, metavar="S", help="seconds a ban lasts (default 600)")


_FLAGS = (
    "host", "port", "simulate", "sim_rate", "sim_seed", "log_level", "log_file", "log_format",
    "jwt_secret", "jwt_public_key", "require_auth", "allow_anonymous_publish", "broker", "redis_prefix", "history_size",
    "history_ttl", "outbox_size", "ping_interval", "ping_timeout",
    "outbox_max_bytes", "channel_heartbeat", "drain_close_code", "shutdown_timeout",
    "trusted_proxies", "blocked_addresses", "allowed_origins", "allow_missing_origin", "handshake_rate_limit",
    "handshake_rate_window", "max_connections_per_ip", "message_rate", "message_burst", "max_message_size",
    "max_channels_per_connection", "auth_failure_limit", "auth_ban_duration",
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
        trio.run(_serve, config, getattr(args, "report", False))
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


async def _serve(config: Any, report: bool = False) -> None:
    from ..server import Gateway

    gateway = Gateway(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            async for signum in signals:
                # SIGTERM is how supervisors stop or restart a node; Ctrl-C is a final stop.
                code = config.drain_close_code if signum == signal.SIGTERM else 1001
                reason = "server restarting" if code == 1012 else "server shutting down"
                log.info("%s: closing every client with %d", signal.Signals(signum).name, code)
                await gateway.shutdown(code, reason)
                break
    log.info("stopped")
    if report:
        sys.stdout.write(gateway.metrics.report())
