"""The gateway: one root nursery holding the router, the listener, every connection,
the simulator and the metrics sampler.

    Gateway.run ── root nursery
     ├─ connection timers (every client's pings and auth deadlines; kaldrix.server._timers)
     ├─ router task (owns subscriptions)          ◀── inbox ── connections, simulator
     ├─ broker link (with a shared broker: Redis; kaldrix.server._broker_link)
     ├─ listener (trio.serve_tcp) → per connection: HTTP answer, or WebSocket nursery
     ├─ simulator (optional)
     └─ metrics sampler
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import trio
from trio_websocket import wrap_server_stream

from .. import __version__
from ..alerts import run_alerts
from ..broker import MemoryBroker
from ..broker._base import Broker
from ..config import Config
from ..metrics import Metrics
from ..protocol import (
    Command,
    CommandType,
    Envelope,
    Publish,
    as_published,
)
from ..security import AuthError, Guard, Principal, TokenVerifier
from . import _admission, _drain, _ops
from ._broker_link import BrokerLink
from ._connection import Connection
from ._heartbeat import run_channel_timers, sweep_interval
from ._http import BadRequest, ReplayStream, RequestHead, Response, read_head, respond
from ._router import Router, RouterRequest
from ._timers import ConnectionTimers

log = logging.getLogger("kaldrix.server")

ROUTER_INBOX_SIZE = 4096
WEBSOCKET_PATHS = ("/", "/ws")


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "unknown", 0
    return host, port


def _redis_engine(config: Config) -> Broker:
    from ..broker._redis import RedisEngine  # imported only when used: coredis is slow to import

    return RedisEngine(
        config.broker,
        prefix=config.redis_prefix,
        history_size=config.history_size,
        history_ttl=config.history_ttl,
        dedup_window=config.dedup_window,
        meta_ttl=config.broker_meta_ttl,
        command_timeout=config.broker_timeout,
        keepalive=config.broker_keepalive,
        reconnect_base=min(0.1, config.broker_reconnect_max),
        reconnect_max=config.broker_reconnect_max,
    )


def _redacted(url: str) -> str:
    """A broker URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Gateway:
    """A kaldrix server. Start it with ``await nursery.start(gateway.run)``.

    Args:
        config: every setting (see kaldrix.config.Config).
        broker: with ``config.broker == "memory"``, where offsets and history live; a new
            MemoryBroker when None. Passing the broker of a previous gateway restarts a
            node without losing history.
        engine: a shared broker engine (kaldrix.broker); by default the Redis engine
            when ``config.broker`` is a redis:// URL, none for memory.
    """

    def __init__(self, config: Config, *, broker: MemoryBroker | None = None, engine: Broker | None = None) -> None:
        self.config = config
        self.metrics = Metrics(max_samples=config.max_samples, record_latency=config.record_latency)
        if engine is None and config.broker != "memory":
            engine = _redis_engine(config)
        self.engine = engine
        self.broker: MemoryBroker | None = None
        self.link: BrokerLink | None = None
        if engine is None:
            self.broker = broker or MemoryBroker(
                history_size=config.history_size,
                history_ttl=config.history_ttl,
                dedup_window=config.dedup_window,
            )
        self.router = Router(self.broker, self.metrics, max_channels_per_connection=config.max_channels_per_connection)
        if engine is not None:
            engine.on_latency = self.metrics.record_broker
            self.link = self.router.link = BrokerLink(
                self.router, engine, self.metrics, timeout=config.broker_timeout, join_limit=config.outbox_size
            )
        self.verifier = TokenVerifier.from_config(config)
        self.guard = Guard.from_config(config)
        self.router_inbox, self._router_inbox_reader = trio.open_memory_channel[RouterRequest](ROUTER_INBOX_SIZE)
        self.connections: set[Connection] = set()
        self.draining = False
        self.drain: _drain.Drain | None = None
        self.port: int | None = None
        self._listen_scope = trio.CancelScope()
        self._root_scope: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()

    @property
    def open_mode(self) -> bool:
        """True when no JWT key is configured: anyone may connect (development)."""
        return self.verifier.open_mode

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"ws://{host}:{self.port}/ws"

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `shutdown` or cancellation; `task_status.started(self)` once listening."""
        async with trio.open_nursery() as root:
            self._root_scope = root.cancel_scope
            await root.start(self._run_timers)
            await root.start(self.router.run, self._router_inbox_reader)
            if self.link is not None:
                await root.start(self.link.run)
                if not self.link.ready:
                    log.warning("the broker at %s is not reachable yet; not ready until it is", _redacted(self.config.broker))
            listeners = await root.start(self._listen, root)
            self.port = listeners[0].socket.getsockname()[1]
            if self.config.simulate:
                from ..sim import run_simulator

                await root.start(
                    functools.partial(
                        run_simulator,
                        self.publish_events,
                        seed=self.config.sim_seed,
                        block_interval=self.config.sim_block_interval,
                        rate=self.config.sim_rate,
                    )
                )
            root.start_soon(self._sample_metrics)
            await root.start(
                functools.partial(
                    run_channel_timers,
                    self.router,
                    heartbeat=self.config.channel_heartbeat,
                    sweep_every=sweep_interval(self.config.history_ttl, self.config.dedup_window),
                )
            )
            await root.start(run_alerts, self.metrics, self.config, self.publish_events)
            log.info("kaldrix %s listening on %s (http://%s:%s/healthz)", __version__, self.url, self.config.host, self.port)
            if self.open_mode:
                log.warning(
                    "OPEN MODE: no JWT secret or public key configured; anyone can connect%s. "
                    "Set --jwt-secret or --jwt-public-key in production.",
                    " and publish" if self.config.allow_anonymous_publish else "",
                )
            task_status.started(self)

    async def _run_timers(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Every connection's ping and auth deadlines, in one task (kaldrix.server._timers)."""
        self.timers = ConnectionTimers()
        await self.timers.run(task_status=task_status)

    async def _listen(self, handler_nursery: trio.Nursery, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with self._listen_scope:
            await trio.serve_tcp(
                self._handle_tcp,
                self.config.port,
                host=self.config.host,
                handler_nursery=handler_nursery,
                task_status=task_status,
            )

    async def shutdown(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Stop accepting, close every client with `code`, wait for them (bounded), stop."""
        await _drain.drain(self, code, reason)
        if self._root_scope is not None:
            self._root_scope.cancel()

    async def publish_events(self, events: list[Envelope]) -> None:
        """In-process producers (the simulator) publish through the router like anyone."""
        command = Command(CommandType.PUBLISH, Publish(events=[as_published(e) for e in events]))
        await self.router_inbox.send(RouterRequest(command=command))

    def metrics_snapshot(self, kind: str = "all") -> dict[str, Any]:
        """The getMetrics-style snapshot, with the router's and broker's counts."""
        snapshot = self.metrics.snapshot(kind)
        if kind == "all":
            snapshot["router"] = {
                "subscribedChannels": self.router.channel_count,
                "subscriptions": self.router.subscriber_count(),
                **self.broker_statistics(),
            }
        return snapshot

    def broker_statistics(self) -> dict[str, Any]:
        """The broker's counts: the memory broker's, or the shared engine's and the link's."""
        if self.link is not None:
            return self.link.statistics()
        assert self.broker is not None
        return {"engine": "memory", "ready": True, **self.broker.statistics()}

    @property
    def broker_ready(self) -> bool:
        """Whether publishing and live delivery work now (the memory broker always does)."""
        return self.link is None or self.link.ready

    async def _sample_metrics(self) -> None:
        while True:
            await trio.sleep(self.config.sampling_interval)
            self.metrics.sample(time.monotonic())

    # -- per TCP connection -----------------------------------------------------------

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        accepted_at = time.monotonic()
        peer_host, peer_port = _peer(stream)
        remote = _show(peer_host, peer_port)
        try:
            await self._serve_stream(stream, peer_host, peer_port, accepted_at)
        except Exception:
            log.exception("connection from %s failed", remote)
            self.metrics.connection_failed()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_stream(self, stream: trio.SocketStream, peer_host: str, peer_port: int, accepted_at: float) -> None:
        head: RequestHead | None = None
        with trio.move_on_after(self.config.handshake_timeout):
            try:
                head = await read_head(stream)
            except BadRequest as exc:
                await respond(stream, Response.json(400, {"error": str(exc)}))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if head is None:
            self.metrics.connection_failed()
            await stream.aclose()
            return
        if not head.is_websocket_upgrade:
            await respond(stream, await _ops.answer_stream(self, head, stream, peer_host), head_only=head.method == "HEAD")
            return
        if head.path not in WEBSOCKET_PATHS:
            await respond(stream, Response.json(404, {"error": f"no WebSocket endpoint at {head.path}; use /ws"}))
            return
        if self.draining:
            await respond(stream, Response.json(503, {"error": "server is shutting down"}, headers=(("Retry-After", "1"),)))
            return
        client_host = _admission.client_address(self, head, peer_host)
        refusal = _admission.admit(self, head, client_host)
        if refusal is not None:
            await respond(stream, refusal)
            return
        handshake = self._handshake_principal(head)
        replay = ReplayStream(stream, head.raw)
        del head  # a connection may stay open for days: it keeps nothing of its request head
        with _admission.counted(self, client_host):
            await self._serve_websocket(stream, replay, handshake, _show(client_host, peer_port), accepted_at)

    async def _serve_websocket(
        self,
        stream: trio.SocketStream,
        replay: ReplayStream,
        handshake: tuple[Principal | None, str | None],
        remote: str,
        accepted_at: float,
    ) -> None:
        principal, auth_error = handshake
        async with trio.open_nursery() as nursery:
            ws = None
            with trio.move_on_after(self.config.handshake_timeout):
                # Twice our limit: messages in between get ERROR TOO_LARGE before the 1009
                # close; trio-websocket closes with 1009 on its own beyond that.
                request = await wrap_server_stream(nursery, replay, max_message_size=2 * self.config.max_message_size)
                ws = await request.accept()
            if ws is None:
                self.metrics.connection_failed()
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
            conn = Connection(self, ws, remote=remote, principal=principal, auth_error=auth_error)
            self.connections.add(conn)
            _drain.admit_late(self, conn)
            _admission.admit_late(self, conn)
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self.metrics.connection_opened()
            self.metrics.record_connect(time.monotonic() - accepted_at)
            try:
                await conn.run()
            finally:
                self.connections.discard(conn)
                self.metrics.connection_closed()
                if not self.connections:
                    self._idle.set()
                nursery.cancel_scope.cancel()

    def _handshake_principal(self, head: RequestHead) -> tuple[Principal | None, str | None]:
        """Who the handshake's token says the client is, or why it is refused."""
        token = None
        authorization = head.headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        elif head.query.get("token"):
            token = unquote(head.query["token"][0])
        if token is None:
            return None, None
        if self.verifier.open_mode:
            return None, None
        try:
            return self.verifier.verify(token), None
        except AuthError as exc:
            return None, exc.reason
