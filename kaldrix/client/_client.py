"""KaldrixClient: the Python counterpart of the seed's useWebSocket hook, on trio.

    open_client(...) ── the caller's nursery
     └─ KaldrixClient.run ── its own nursery
         ├─ dispatcher (handlers, pacing, event streams)
         └─ connect loop ── per connection, a session nursery:
              trio-websocket reader, resume (SUBSCRIBE with since), keepalive PINGs,
              the channel watchdog, and the frame reader (this task)

The frame reader alone updates the last-offset table, so positions, dedup and gaps
follow the order of the wire. A lost connection, however it ended (network drop,
4008, 1001/1012, a restart), is retried with full-jitter backoff, the first retry
included, and resumed from the last offset seen on every channel. The watchdog
resubscribes a channel that went silent or whose HEARTBEAT shows a missed event.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed, connect_websocket_url

from ..protocol import (
    Ack,
    CloseCode,
    CommandType,
    Envelope,
    ErrorCode,
    ErrorPayload,
    Heartbeat,
    ProtocolError,
    PublishedEvent,
    ReplyType,
    as_published,
    channel_problem,
    converter,
    decode_message,
    new_id,
)
from ._backoff import backoff_delay
from ._dispatch import Dispatcher, EventStream, Handler
from ._errors import ClientClosed, CommandError, ConnectionLost
from ._options import ClientOptions, ClientState, make_options
from ._outcome import Outcome, failure, give_up_reason, read_welcome
from ._pacing import Pacer
from ._positions import Gap, Positions
from ._refresh import keep_token_fresh
from ._session import Session
from ._watchdog import stale_after

log = logging.getLogger("kaldrix.client")

CLOSE_TIMEOUT = 2.0
_CHANNEL_PATH = re.compile(r"^payload\.channels\[(\d+)\]$")


class KaldrixClient:
    """A subscriber and producer that stays connected and never loses its place.

    Start it with ``async with open_client(url, channels=[...]) as client`` or, inside
    your own nursery, ``await nursery.start(client.run)``.
    """

    def __init__(self, options: ClientOptions, channels: Iterable[str] = ()) -> None:
        self.options = options
        self.state = ClientState()
        self._urls = (options.url, *options.fallback_urls)
        self._url_index = 0
        self._channels: dict[str, None] = {}
        for name in channels:
            self._check_channel(name)
            self._channels[name] = None
        self._positions = Positions(self.state.last_offsets)
        self._dispatcher = Dispatcher(
            Pacer.from_settings(
                throttle=options.throttle_time if options.enable_throttle else None,
                debounce=options.debounce_time if options.enable_debounce else None,
            ),
            buffer_size=options.buffer_size,
        )
        self._inbound, self._inbound_reader = trio.open_memory_channel[Any](options.buffer_size)
        self._session: Session | None = None
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._started = False
        self._closing = False
        self._done = False
        self._stopped = trio.Event()
        self._token: str | None = None
        """The token of the current connection's handshake, refreshed before it expires."""

    # -- the application's API --------------------------------------------------------

    @property
    def channels(self) -> list[str]:
        """The channels the client is (or will be, once connected) subscribed to."""
        return list(self._channels)

    @property
    def is_closed(self) -> bool:
        return self._done

    def subscribe(self, event_type: str, handler: Handler) -> Any:
        """Call `handler` (sync or async) with each event of `event_type`, or of every event
        with "*". A control type (ERROR, METRICS_RESPONSE) gets the replies no call was
        waiting for. Paced by throttle/debounce when enabled. Returns the unsubscribe."""
        return self._dispatcher.subscribe(event_type, handler)

    def on_gap(self, handler: Handler) -> Any:
        """Call `handler` with a Gap whenever events were lost for good; returns the undo."""
        return self._dispatcher.on_gap(handler)

    def events(self, *, include_gaps: bool = False) -> EventStream:
        """Every event from now on, in order, unpaced (and Gaps, with `include_gaps`)."""
        return self._dispatcher.open_stream(include_gaps=include_gaps)

    async def wait_connected(self) -> None:
        """Wait until connected and subscribed; ClientClosed if the client gives up first."""
        await self._wait_session(ready=True)

    async def wait_closed(self) -> None:
        """Wait until the client has stopped (closed, or given up reconnecting)."""
        await self._stopped.wait()

    async def join(self, *channels: str) -> None:
        """Subscribe to more channels (also after every reconnect); CommandError if refused."""
        for name in channels:
            self._check_channel(name)
        for name in channels:
            self._channels.setdefault(name, None)
        while True:
            session = await self._wait_session(ready=True)
            missing = [name for name in channels if name not in session.subscribed]
            if not missing:
                return
            for name in missing:
                self._channels.setdefault(name, None)
            try:
                await self._subscribe_on(session, missing)
                return
            except ConnectionLost:
                continue
            except CommandError:
                for name in missing:
                    self._channels.pop(name, None)
                raise

    async def leave(self, *channels: str) -> None:
        """Unsubscribe; events of these channels already on their way are dropped."""
        session = self._session
        for name in channels:
            self._channels.pop(name, None)
            self._positions.forget(name)
            if session is not None:
                session.freshness.forget(name)
        if session is None or session.lost:
            return
        present = [name for name in channels if name in session.subscribed]
        if present:
            session.subscribed.difference_update(present)
            try:
                await session.request(CommandType.UNSUBSCRIBE, {"channels": present})
            except ConnectionLost:
                pass

    async def send(self, message_type: str, payload: Any = None) -> str:
        """Send any message (the seed's sendMessage); returns its id. Its ACK or ERROR, or
        a reply such as METRICS_RESPONSE, goes to handlers subscribed to that type."""
        session = await self._wait_session()
        return await session.send(message_type, payload if payload is not None else {})

    async def publish(self, *events: Envelope | PublishedEvent | Mapping[str, Any], channel: str | None = None) -> Ack:
        """Publish events (built Envelopes, PublishedEvents or wire dicts) and return the ACK.

        Every event gets an id if it has none, so a publish cut off by a lost connection
        is sent again after reconnecting, and the server's dedup window (which survives a
        restart that keeps the broker) keeps it from being applied twice.
        """
        if not events:
            raise ValueError("publish needs at least one event")
        wire = [_published(event) for event in events]
        payload: dict[str, Any] = {"event": wire[0]} if len(wire) == 1 else {"events": wire}
        if channel is not None:
            payload["channel"] = channel
        while True:
            session = await self._wait_session()
            try:
                return await session.request(CommandType.PUBLISH, payload)
            except ConnectionLost:
                continue

    async def ping(self) -> float:
        """Round-trip latency in milliseconds (also kept in state.message_latency)."""
        session = await self._wait_session()
        return self._record_latency(await session.ping())

    async def reconnect(self) -> None:
        """Drop the current connection and resume on a new one (after the usual jittered
        backoff), for instance after the network changed. Nothing is lost: every channel
        resumes from its last offset."""
        session = self._session
        if session is None or session.lost:
            return
        session.refusal = "reconnect requested"
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await session.ws.aclose()

    async def close(self) -> None:
        """Close the connection (1000) and stop; events not yet dispatched are dropped."""
        self._closing = True
        self._notify()
        try:
            session = self._session
            if session is None:
                pass
            elif trio.current_effective_deadline() == -math.inf:
                # Cancelled from outside: the task that would complete a close handshake
                # is cancelled too, so drop the socket at once instead of waiting for it.
                await session.ws.aclose()
            else:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await session.ws.aclose()
        finally:
            if self._scope is not None:
                self._scope.cancel()
            if not self._started:
                self._finish()

    # -- running ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, stay connected and dispatch until `close()` or giving up."""
        if self._started:
            raise RuntimeError("a KaldrixClient runs once")
        self._started = True
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._dispatcher.run, self._inbound_reader)
                    task_status.started()
                    try:
                        if not self._closing:
                            await self._keep_connected()
                    finally:
                        self._inbound.close()
        finally:
            self._finish()

    @property
    def url(self) -> str:
        """The node this client connects (or reconnects) to now."""
        return self._urls[self._url_index]

    def _finish(self) -> None:
        self._done = True
        self.state.is_connected = False
        self._dispatcher.close_streams()
        self._stopped.set()
        self._notify()

    async def _keep_connected(self) -> None:
        options = self.options
        state = self.state
        while not self._closing:
            outcome = await self._connect_once()
            if self._closing:
                return
            state.connection_error = outcome.error
            give_up = give_up_reason(outcome, options, state.reconnect_attempts)
            if give_up:
                state.connection_error = f"{outcome.error}; {give_up}"
                log.error("%s: %s", self.url, state.connection_error)
                self._done = True
                self._notify()
                return
            delay = backoff_delay(state.reconnect_attempts, options.reconnect_interval, options.max_reconnect_delay, options.rng)
            state.reconnect_attempts += 1
            failed_url = self.url
            self._url_index = (self._url_index + 1) % len(self._urls)
            log.warning("%s: %s; reconnecting to %s in %.2fs (attempt %d)", failed_url, outcome.error, self.url, delay, state.reconnect_attempts)
            await trio.sleep(delay)

    async def _connect_once(self) -> Outcome:
        """One connection from handshake to close; never raises (but for cancellation)."""
        try:
            headers = await self._handshake_headers()
            # trio-websocket's reader task lives here: it completes the close handshake.
            async with trio.open_nursery() as socket_nursery:
                try:
                    with trio.fail_after(self.options.connect_timeout):
                        ws = await connect_websocket_url(
                            socket_nursery,
                            self.url,
                            extra_headers=headers,
                            max_message_size=self.options.max_message_size,
                        )
                        welcome = await read_welcome(ws)
                    session = Session(ws, welcome, stale_after=stale_after(self.options.stale_after, welcome.channel_heartbeat))
                    return await self._serve(session)
                finally:
                    # Let the reader see the server's close and the TCP end, within bounds.
                    socket_nursery.cancel_scope.deadline = min(
                        socket_nursery.cancel_scope.deadline, trio.current_time() + CLOSE_TIMEOUT
                    )
        except Exception as exc:  # noqa: BLE001 - every failure to connect is retried or reported
            return failure(exc)

    async def _handshake_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(name.encode(), value.encode()) for name, value in self.options.headers.items()]
        token = self.options.token
        if callable(token):
            token = token()
            if inspect.isawaitable(token):
                token = await token
        if token:
            headers.append((b"Authorization", f"Bearer {token}".encode()))
        self._token = token or None
        return headers

    async def _serve(self, session: Session) -> Outcome:
        self._session = session
        self.state.is_connected = True
        self.state.session_id = session.session_id
        self._notify()
        log.info("%s: connected, session %s", self.url, session.session_id)
        reason: CloseReason | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._resume, session)
                if callable(self.options.token) and self._token:
                    nursery.start_soon(keep_token_fresh, session, self.options.token, self._token)
                if self.options.ping_interval is not None:
                    nursery.start_soon(self._keepalive, session)
                nursery.start_soon(self._watch_channels, session)
                reason = await self._read(session)
                nursery.cancel_scope.cancel()
        finally:
            session.close()
            self._session = None
            self.state.is_connected = False
            self._notify()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await session.ws.aclose()
        code = None if reason is None else reason.code
        text = "connection closed" if reason is None else f"connection closed: {reason.code} {reason.reason or reason.name}"
        if session.refusal:
            text = f"{text} ({session.refusal})"
        if session.fatal:
            return Outcome(session.fatal, code, fatal=True)
        return Outcome(text, code)

    async def _read(self, session: Session) -> CloseReason | None:
        """Read frames until the connection closes; the only writer of the offset table."""
        while True:
            try:
                data = await session.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason
            message = decode_message(data)
            if isinstance(message, ProtocolError):
                log.warning("%s: ignoring a message this client cannot read: %s", self.url, message)
                continue
            if message.channel is not None:
                await self._admit(session, message)
                continue
            if isinstance(message.payload, Heartbeat):
                self._take_heartbeat(session, message.payload)
            follow = session.resolve(message)
            if follow is not None:
                for item in follow:
                    await self._emit(session, item)
                continue
            if isinstance(message.payload, ErrorPayload):
                session.refusal = f"{message.payload.code}: {message.payload.message}"
                log.warning("%s: server error: %s", self.url, session.refusal)
            if message.type != ReplyType.WELCOME:
                await self._hand_off(session, message)

    async def _admit(self, session: Session, event: Envelope) -> None:
        channel = event.channel
        assert channel is not None
        if channel not in self._channels:
            return
        session.freshness.heard(channel, trio.current_time())
        if event.offset is None or event.epoch is None:
            await self._hand_off(session, event)
            return
        accept, gap = self._positions.admit(channel, event.offset, event.epoch)
        if gap is not None:
            await self._emit(session, gap)
        if accept:
            await self._hand_off(session, event)

    def _take_heartbeat(self, session: Session, heartbeat: Heartbeat) -> None:
        name = heartbeat.channel
        if name not in self._channels or name not in session.subscribed:
            return
        last = self.state.last_offsets.get(name)
        position = (heartbeat.offset, heartbeat.epoch)
        if session.freshness.heartbeat(name, position, last, trio.current_time()):
            log.warning("%s: HEARTBEAT on %s is at %s@%s but the last event seen is %s@%s: resubscribing",
                        self.url, name, *position, *(last or ("-", "-")))
            session.resync_wanted.set()

    async def _emit(self, session: Session, item: Any) -> None:
        if isinstance(item, Gap):
            # Never silent: a warning unless the application handles gaps itself.
            log.log(
                logging.INFO if self._dispatcher.has_gap_handlers else logging.WARNING,
                "%s: gap on %s: saw %s@%s, continuing after %s@%s (%s)",
                self.url, item.channel, item.last_offset, item.epoch, item.new_offset, item.new_epoch, item.reason,
            )
        await self._hand_off(session, item)

    async def _hand_off(self, session: Session, item: Any) -> None:
        """Give an item to the dispatcher. While a slow application makes the reader wait,
        the silence on the socket is ours, not the server's: the watchdog does not count it."""
        try:
            self._inbound.send_nowait(item)
            return
        except trio.WouldBlock:
            pass
        session.handing_off = True
        started = trio.current_time()
        try:
            await self._inbound.send(item)
        finally:
            session.handing_off = False
            session.freshness.paused(trio.current_time() - started)

    async def _resume(self, session: Session) -> None:
        """Join every channel again, from the last offset seen; then the session is ready."""
        self.state.connection_error = None
        while channels := [name for name in self._channels if name not in session.subscribed]:
            try:
                await self._subscribe_on(session, channels)
            except ConnectionLost:
                return
            except CommandError as exc:
                if exc.error.code == ErrorCode.UNAVAILABLE:
                    # The node cannot reach its broker: another attempt (or node) will.
                    await self._give_up_session(session, f"the server cannot resubscribe now: {exc}", "broker unavailable")
                    return
                match = _CHANNEL_PATH.match(exc.error.path or "")
                if match is None or int(match[1]) >= len(channels):
                    session.fatal = f"the server refused to resubscribe: {exc}"
                    log.error("%s: %s", self.url, session.fatal)
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await session.ws.aclose()
                    return
                refused = channels[int(match[1])]
                self._channels.pop(refused, None)
                self._positions.forget(refused)
                self.state.connection_error = f"cannot join {refused}: {exc}"
                log.error("%s: %s", self.url, self.state.connection_error)
        session.ready.set()
        self.state.reconnect_attempts = 0
        self._notify()

    async def _subscribe_on(self, session: Session, channels: list[str]) -> Ack:
        payload: dict[str, Any] = {"channels": channels}
        since = self._positions.since(channels)
        if since:
            payload["since"] = since

        def apply(ack: Ack) -> list[Any]:
            gaps = []
            now = trio.current_time()
            for name, position in (ack.channels or {}).items():
                session.subscribed.add(name)
                session.freshness.heard(name, now)
                if name in self._channels and (gap := self._positions.subscribed(name, position)):
                    gaps.append(gap)
            return gaps

        return await session.request(CommandType.SUBSCRIBE, payload, apply)

    async def _keepalive(self, session: Session) -> None:
        """PING now and then: measures latency, and notices a link that died silently."""
        assert self.options.ping_interval is not None
        while True:
            await trio.sleep(self.options.ping_interval)
            with trio.move_on_after(self.options.ping_timeout) as scope:
                try:
                    self._record_latency(await session.ping())
                except ConnectionLost:
                    return
            if scope.cancelled_caught:
                await self._give_up_session(session, f"no PONG within {self.options.ping_timeout}s", "ping timeout")
                return

    async def _watch_channels(self, session: Session) -> None:
        """Resubscribe (with since) channels that went silent too long or whose HEARTBEAT
        shows a missed event; replace the connection when that gets no answer in time."""
        freshness = session.freshness
        await session.ready.wait()
        patience = freshness.stale_after or self.options.connect_timeout
        while True:
            with trio.move_on_after(freshness.check_interval):
                await session.resync_wanted.wait()
            session.resync_wanted = trio.Event()
            held = [name for name in self._channels if name in session.subscribed]
            # While the application keeps the reader waiting, silence proves nothing.
            channels = freshness.due(held, trio.current_time(), silence=not session.handing_off)
            if not channels:
                continue
            self.state.resyncs += len(channels)
            log.warning("%s: resubscribing %s from the last offsets seen", self.url, ", ".join(channels))
            with trio.move_on_after(patience) as waited:
                try:
                    await self._subscribe_on(session, channels)
                except ConnectionLost:
                    return
                except CommandError as exc:
                    log.error("%s: resubscribing %s refused: %s", self.url, ", ".join(channels), exc)
            if waited.cancelled_caught:
                refusal = f"no answer to resubscribing {', '.join(channels)} within {patience}s"
                await self._give_up_session(session, refusal, "stalled subscription")
                return

    # -- helpers --------------------------------------------------------------------------

    async def _give_up_session(self, session: Session, refusal: str, close_reason: str) -> None:
        """Close a connection that stopped serving us (1001); the connect loop reconnects."""
        session.refusal = refusal
        log.warning("%s: %s: reconnecting", self.url, refusal)
        with trio.move_on_after(CLOSE_TIMEOUT):
            await session.ws.aclose(CloseCode.GOING_AWAY, close_reason)

    def _record_latency(self, seconds: float) -> float:
        self.state.message_latency = milliseconds = seconds * 1000.0
        return milliseconds

    def _notify(self) -> None:
        """Wake everything waiting for the connection to change."""
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_session(self, *, ready: bool = False) -> Session:
        while True:
            if self._done or self._closing:
                raise ClientClosed(self.state.connection_error or "the client is closed")
            session = self._session
            if session is not None and not session.lost and (not ready or session.ready.is_set()):
                return session
            await self._changed.wait()

    @staticmethod
    def _check_channel(name: str) -> None:
        if problem := channel_problem(name):
            raise ValueError(problem)


def _published(event: Envelope | PublishedEvent | Mapping[str, Any]) -> dict[str, Any]:
    """The wire form of one event inside PUBLISH, always with an id."""
    if isinstance(event, Envelope):
        event = as_published(event)
    if isinstance(event, PublishedEvent):
        wire = converter.unstructure(event)
    elif isinstance(event, Mapping):
        wire = dict(event)
    else:
        raise TypeError(f"cannot publish {type(event).__name__}: expected an Envelope, PublishedEvent or dict")
    if not wire.get("id"):
        wire["id"] = new_id()
    return wire


@asynccontextmanager
async def open_client(
    url: str | None = None,
    *,
    channels: Iterable[str] = (),
    options: ClientOptions | None = None,
    wait_connected: bool = True,
    **settings: Any,
) -> AsyncIterator[KaldrixClient]:
    """Run a KaldrixClient for the body of an ``async with``; close it on the way out.

    `settings` are ClientOptions fields (token=..., reconnect_interval=...). With
    `wait_connected` the body starts once the channels are joined, so nothing
    published afterwards is missed; ClientClosed if the client gives up first.
    """
    client = KaldrixClient(make_options(url, options, settings), channels)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                if wait_connected:
                    await client.wait_connected()
                yield client
            finally:
                await client.close()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        sole = group.exceptions[0]
        raise sole from sole.__cause__
