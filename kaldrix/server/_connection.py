"""One client connection: a reader, and a writer and pings only while they have work.

The reader (the connection's own task) turns frames into commands (answering PING, AUTH,
REQUEST_METRICS and every refusal itself) and forwards SUBSCRIBE/UNSUBSCRIBE/PUBLISH to
the router's inbox. Most frames go straight into the socket (kaldrix.server._wire); the
writer task exists only while frames are queued behind a full socket, and drains the
bounded outbox, joining whatever is queued into one socket write. When to ping and when
to give up on authentication are the gateway's timers' business (kaldrix.server._timers),
which start a short ping task when one is due. Closing the connection is cancelling its
nursery; cleanup happens in `finally`.

Idle connections are what there are most of, so an idle one holds as little as it can:
two tasks (this one and trio-websocket's reader), no outbox until a backlog, __slots__.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .. import __version__
from ..protocol import (
    PROTOCOL_VERSION,
    Ack,
    CloseCode,
    Command,
    CommandType,
    ErrorCode,
    MetricsResponse,
    Pong,
    ProtocolError,
    ReplyType,
    UserInfo,
    Welcome,
    decode_command,
    new_id,
    now_timestamp,
)
from ..security import AuthError, Principal, may_admin, may_publish, may_subscribe
from . import _admin, _admission
from ._drain import flush_deadline
from ._frames import error_frame, reply_frame
from ._router import RouterRequest
from ._timers import ConnectionTimers
from ._wire import (
    DirectWriter,
    WriteState,
    abort,
    check_compatible,
    expect_pong,
    ping_frame,
    send_frames,
    shed_handshake,
)

if TYPE_CHECKING:
    from ._gateway import Gateway

log = logging.getLogger("kaldrix.connection")

WRITE_BATCH_BYTES = 256 * 1024
"""Queued frames are joined into one socket write up to about this many bytes."""

Queued = tuple[bytes | list[bytes], float]
"""An outbox item: a frame (or a replay's frames) and when its event was accepted (0: not an event)."""


class Connection:
    """The server side of one WebSocket client."""

    __slots__ = (
        "_auth_at",
        "_auth_error",
        "_batch",
        "_closed",
        "_direct",
        "_direct_ok",
        "_ending",
        "_flush",
        "_flush_deadline",
        "_held",
        "_inbox",
        "_nursery",
        "_outbox",
        "_ping_at",
        "_pings_sent",
        "_pong",
        "_pong_by",
        "_queued_bytes",
        "_replay_bytes",
        "_timers",
        "_write_state",
        "_writing",
        "channels",
        "close_code",
        "close_reason",
        "config",
        "gateway",
        "message_rate",
        "metrics",
        "principal",
        "remote",
        "session_id",
        "ws",
    )

    def __init__(
        self,
        gateway: Gateway,
        ws: WebSocketConnection,
        *,
        remote: str,
        principal: Principal | None = None,
        auth_error: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.metrics = gateway.metrics
        self.ws = ws
        self.remote = remote
        self.session_id = new_id()
        self.principal = principal
        self.channels: set[str] = set()
        self._auth_error = auth_error
        self._outbox: deque[Queued] | None = None
        """Frames for the writer task, at most outbox_size; created with the first backlog."""
        self._closed = False
        """Set once the connection ends: nothing more is queued."""
        self._writing = False
        """Whether the writer task runs (it does exactly while the outbox has items)."""
        self._queued_bytes = 0
        """Bytes offered and not yet written: bounded by outbox_max_bytes, like the count by outbox_size."""
        self._replay_bytes = 0
        """The part of _queued_bytes that is a recovery replay, which the limit leaves out."""
        self._inbox = gateway.router_inbox
        self._nursery: trio.Nursery | None = None
        """The connection's nursery while it runs: this task reads, and a ping in flight
        and the writer are its children. Cancelling it is closing the connection."""
        self._ending = False
        """Set when the connection is told to close or its peer left."""
        self._flush: trio.CancelScope | None = None
        """The running writer's shield: a close cancels the reader and a ping at once, while
        what is queued (the ERROR that explains a 4001 or a 1009) is still written."""
        self._flush_deadline = math.inf
        """Until when the writer may flush, once the connection ends (close_timeout)."""
        self._timers: ConnectionTimers = gateway.timers
        self._ping_at: float | None = None
        """When the next ping is due (trio clock)."""
        self._pong: trio.Event | None = None
        """Set by trio-websocket when the pong of the ping in flight arrives; None: none in flight."""
        self._pong_by = math.inf
        """When the pong of the ping in flight must have come (ping_timeout after it was sent)."""
        self._pings_sent = 0
        self._auth_at: float | None = None
        """When the auth timeout or the token's expiry falls due (trio clock), if ever."""
        self._write_state = WriteState()
        self._direct = DirectWriter(ws, enabled=self.config.direct_writes)
        self._direct_ok = self._direct.enabled
        self._batch = gateway.router.write_batch
        self._held: list[tuple[bytes, float]] = []
        """Event frames offered during the router's current batch, written at its end."""
        self.message_rate = gateway.guard.new_message_rate(time.monotonic())
        self.close_code: int | None = None
        self.close_reason = ""

    # -- called by the router and the gateway (never wait) --------------------------

    @property
    def queued_bytes(self) -> int:
        """Bytes offered and not yet written (kept under outbox_max_bytes)."""
        return self._queued_bytes

    def offer(self, frame: bytes, accepted_at: float) -> bool:
        """Queue a frame; False when the outbox is full or gone, or the connection is closing."""
        if self.close_code is not None:
            return False
        if self._held:
            if accepted_at and self._batch.active:
                self._held.append((frame, accepted_at))
                return True
            if not self.release():  # a control frame goes after the events before it
                return False
        size = len(frame)
        if not self._queued_bytes and self._direct_ok:
            # Nothing queued: straight into the socket, no task switch (kaldrix.server._wire);
            # during a router batch, at its end, with the other events of the batch.
            if accepted_at and self._batch.active:
                self._held.append((frame, accepted_at))
                self._batch.pending.append(self)
                return True
            written = self._direct.try_write(frame)
            if written == size:
                metrics = self.metrics
                metrics.messages_out += 1
                metrics.bytes_out += size
                if accepted_at:
                    metrics.record_delivery(time.monotonic() - accepted_at)
                return True
            if written:
                # Part of the frame is on the wire: the writer finishes it before anything
                # else, and a connection closed before then is aborted, not closed cleanly.
                self._write_state.mid_write = True
                self.metrics.bytes_out += written
                frame = frame[written:]
        return self._enqueue(frame, accepted_at)

    def release(self) -> bool:
        """Write the frames held during a router batch with one system call; queue for the
        writer what the socket does not take. False when that does not fit (slow consumer)."""
        held, self._held = self._held, []
        if not held or self.close_code is not None:
            return True
        data = held[0][0] if len(held) == 1 else b"".join([frame for frame, _ in held])
        written = 0 if self._queued_bytes else self._direct.try_write(data)
        metrics = self.metrics
        done = index = 0
        now = time.monotonic()
        for frame, accepted_at in held:
            end = done + len(frame)
            if end > written:
                break
            metrics.record_delivery(now - accepted_at)
            done = end
            index += 1
        metrics.messages_out += index
        metrics.bytes_out += done
        if index == len(held):
            return True
        frame, accepted_at = held[index]
        if written > done:
            self._write_state.mid_write = True  # as in offer: the writer finishes this frame first
            metrics.bytes_out += written - done
            frame = frame[written - done :]
        if not self._enqueue(frame, accepted_at):
            return False
        return all(self._enqueue(frame, accepted_at) for frame, accepted_at in held[index + 1 :])

    def _enqueue(self, frame: bytes, accepted_at: float) -> bool:
        """Queue a frame for the writer task, within outbox_size and outbox_max_bytes."""
        size = len(frame)
        live = self._queued_bytes - self._replay_bytes
        if live and live + size > self.config.outbox_max_bytes:
            return False  # an empty outbox takes any frame, so a large event cannot wedge a client
        if not self._queue((frame, accepted_at)):
            return False
        self._queued_bytes += size
        return True

    def _queue(self, item: Queued) -> bool:
        """Append to the outbox (within outbox_size) and make sure the writer runs."""
        if self._closed:
            return False
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        elif len(outbox) >= self.config.outbox_size:
            return False
        outbox.append(item)
        if not self._writing and self._nursery is not None:
            self._writing = True
            self._nursery.start_soon(self._write)
        return True

    def offer_replay(self, frames: list[bytes]) -> bool:
        """Queue the frames a SUBSCRIBE with `since` replays, as one outbox item.

        They are history's own bytes (no copy), bounded by history_size, so they take one
        place in the outbox and do not count against outbox_max_bytes: a replay larger than
        the outbox would otherwise end every reconnect with 4008, and the client could never
        catch up.
        """
        if self.close_code is not None:
            return False
        if self._held and not self.release():  # events held before it go first
            return False
        if not self._queue((frames, 0.0)):
            return False
        size = sum(map(len, frames))
        self._queued_bytes += size
        self._replay_bytes += size
        return True

    def kick(self, code: int, reason: str) -> bool:
        """Close soon with `code`; True only for the first call, and False once the
        connection is ending anyway (the peer left: not a slow consumer to count)."""
        if self.close_code is not None or self._ending:
            return False
        self.close_code = code
        self.close_reason = reason
        self._end()
        return True

    def _end(self) -> None:
        """Stop reading and pinging; the writer flushes within close_timeout (`run`)."""
        self._ending = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        check_compatible(self.ws)
        shed_handshake(self.ws)
        log.info("connect %s session=%s user=%s", self.remote, self.session_id, self._who())
        self._reply(ReplyType.WELCOME, self._welcome())
        if self._auth_error is not None:
            self._refuse_auth(self._auth_error, ref=None)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._ending:  # kicked before it ran (a refused handshake token)
                    nursery.cancel_scope.cancel()
                if self._outbox and not self._writing:
                    self._writing = True
                    nursery.start_soon(self._write)
                now = trio.current_time()
                self._ping_at = now + self.config.ping_interval
                self._auth_at = self._auth_deadline(now)
                self._timers.schedule(self, self._next_deadline())
                try:
                    await self._read()
                finally:
                    self._timers.cancel(self)
                    self._closed = True
                    self._ending = True
                    if self.close_code == CloseCode.SLOW_CONSUMER:
                        self._flush_deadline = -math.inf
                    else:
                        self._flush_deadline = flush_deadline(self.gateway, self.config.close_timeout)
                    if self._flush is not None:
                        self._flush.deadline = self._flush_deadline
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _finish(self) -> None:
        detach = RouterRequest(origin=self, detach=True)
        try:
            self._inbox.send_nowait(detach)
        except trio.WouldBlock:
            with trio.move_on_after(self.config.close_timeout):
                await self._inbox.send(detach)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        code = self.close_code or CloseCode.NORMAL
        if self._write_state.mid_write:
            await abort(self.ws)
        else:
            with trio.move_on_after(self.config.close_timeout) as scope:
                await self.ws.aclose(code, self.close_reason or None)
            if scope.cancelled_caught:
                await abort(self.ws)
        peer = self.ws.closed
        reason = self.close_reason or (f"peer closed {peer.code} {peer.reason or ''}".strip() if peer else "closed")
        log.info("disconnect %s session=%s code=%s reason=%s", self.remote, self.session_id, code if self.close_code else (peer.code if peer else code), reason)

    # -- tasks ---------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                self.metrics.messages_in += 1
                self.metrics.bytes_in += len(message)
                if len(message) > self.config.max_message_size:
                    self._refuse(
                        ProtocolError(ErrorCode.TOO_LARGE, f"messages are at most {self.config.max_message_size} bytes")
                    )
                    self.kick(CloseCode.TOO_BIG, "message too big")
                    return
                if _admission.throttled(self, message):
                    continue
                try:
                    await self._handle(message)
                except Exception:
                    log.exception("failed to handle a message from %s", self.remote)
                    self._refuse(ProtocolError(ErrorCode.INTERNAL, "internal error"))
        except ConnectionClosed as exc:
            if exc.reason is not None and exc.reason.code == CloseCode.TOO_BIG and self.close_code is None:
                self.metrics.error(ErrorCode.TOO_LARGE)
                self.close_code = CloseCode.TOO_BIG
                self.close_reason = "message too big"
        self._end()

    async def _write(self) -> None:
        """Drain the outbox, then end: the next backlog starts a new writer (`_queue`)."""
        with trio.CancelScope(shield=True, deadline=self._flush_deadline) as self._flush:
            try:
                await self._drain()
            finally:
                self._flush = None
                self._writing = False

    async def _drain(self) -> None:
        """Write what is queued, joined into writes of up to WRITE_BATCH_BYTES."""
        outbox = self._outbox
        metrics = self.metrics
        while outbox:
            frames: list[bytes] = []
            stamps: list[float] = []
            size = replayed = 0
            while outbox and size + replayed < WRITE_BATCH_BYTES:
                frame, accepted_at = outbox.popleft()
                if type(frame) is list:  # a replay (offer_replay)
                    frames.extend(frame)
                    replayed += sum(map(len, frame))
                else:
                    frames.append(frame)
                    size += len(frame)
                    if accepted_at:
                        stamps.append(accepted_at)
            size += replayed
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            try:
                await send_frames(self.ws, data, self._write_state)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._write_state.mid_write = False
                self._end()
                return
            metrics.messages_out += len(frames)
            metrics.bytes_out += size
            self._queued_bytes -= size
            self._replay_bytes -= replayed
            if stamps:
                now = time.monotonic()
                for stamp in stamps:
                    metrics.record_delivery(now - stamp)
        self._outbox = None  # an idle connection keeps no queue

    # -- deadlines (served by the gateway's ConnectionTimers) ----------------------

    def on_timer(self, now: float) -> float | None:
        """A deadline of ours passed: ping, close on a missing pong (1008), or on the auth
        timeout or token expiry (4001)."""
        if self._ending:
            return None
        pong = self._pong
        if pong is not None:
            if pong.is_set():
                self._pong = None
            elif now >= self._pong_by:
                self.kick(CloseCode.POLICY, "ping timeout")
                return None
        if self._pong is None and self._ping_at is not None and now >= self._ping_at:
            self._ping(now)
        if self._auth_at is not None and now >= self._auth_at:
            self._auth_at = None
            self._auth_due()
        return self._next_deadline()

    def _next_deadline(self) -> float | None:
        due = self._auth_at
        ping = self._pong_by if self._pong is not None else self._ping_at
        if ping is not None and (due is None or ping < due):
            due = ping
        return due

    def _ping(self, now: float) -> None:
        """Send a ping without a task: a pre-framed write, its pong matched by trio-websocket's
        reader (kaldrix.server._wire.expect_pong) and looked at when `_pong_by` comes. The
        next ping is due ping_interval after this one, once its pong came."""
        self._pings_sent += 1
        payload = self._pings_sent.to_bytes(4, "big")
        pong = trio.Event()
        expect_pong(self.ws, payload, pong)
        self._pong, self._pong_by = pong, now + self.config.ping_timeout
        self._ping_at = now + self.config.ping_interval
        self.offer(ping_frame(payload), 0.0)  # when it cannot be queued, the pong never comes

    def _auth_deadline(self, now: float) -> float | None:
        """When a required AUTH is overdue or the token runs out, on trio's clock."""
        principal = self.principal
        if principal is None:
            return now + self.config.auth_timeout if self._auth_required else None
        if principal.expires_at is None:
            return None
        grace = self.gateway.verifier.leeway
        return now + max(0.0, principal.expires_at + grace - time.time())

    def _auth_due(self) -> None:
        """Close with 4001 when a required AUTH never came or the token ran out."""
        principal = self.principal
        if principal is None:
            if self._auth_required:
                self.kick(CloseCode.AUTH_FAILED, "authentication timeout")
                _admission.auth_failed(self, "no token within the auth timeout")
            return
        if principal.expires_at is None:
            return
        left = principal.expires_at + self.gateway.verifier.leeway - time.time()
        if left > 0:  # the wall clock moved against trio's: not yet
            self._auth_at = trio.current_time() + left
            return
        _admission.audit_connection(self, "token_expired", "the token expired", sub=principal.sub)
        self.kick(CloseCode.AUTH_FAILED, "token expired")

    def _auth_changed(self) -> None:
        """A new principal: its own expiry (if any) replaces the old deadline."""
        if self._nursery is None or self._ending:
            return  # not running yet (run() plans it) or ending
        self._auth_at = self._auth_deadline(trio.current_time())
        self._timers.schedule(self, self._next_deadline())

    # -- commands ------------------------------------------------------------------

    @property
    def _auth_required(self) -> bool:
        return self.config.require_auth

    async def _handle(self, message: str | bytes) -> None:
        command = decode_command(message)
        if isinstance(command, ProtocolError):
            self._refuse(command)
            return
        if problem := _admission.check_command(self, command):
            self._refuse(problem)
            return
        if self.principal is None and self._auth_required and command.type is not CommandType.AUTH:
            self._refuse(ProtocolError(ErrorCode.UNAUTHORIZED, "authenticate first with AUTH", ref=command.id))
            return
        match command.type:
            case CommandType.PING:
                self._reply(ReplyType.PONG, Pong(server_time=now_timestamp(), t=command.payload.t, ref=command.id))
            case CommandType.AUTH:
                self._authenticate(command.payload.token, command.id)
            case CommandType.REQUEST_METRICS:
                self._answer_metrics(command)
            case CommandType.SUBSCRIBE:
                await self._subscribe(command)
            case CommandType.UNSUBSCRIBE:
                await self._inbox.send(RouterRequest(command=command, origin=self))
            case CommandType.PUBLISH:
                await self._publish(command)
            case CommandType.ADMIN:
                _admin.handle_command(self, command)

    async def _subscribe(self, command: Command) -> None:
        open_mode = self.gateway.open_mode
        for index, channel in enumerate(command.payload.channels):
            if reason := may_subscribe(self.principal, channel, open_mode=open_mode):
                self._refuse(ProtocolError(ErrorCode.FORBIDDEN, reason, f"payload.channels[{index}]", command.id))
                return
        await self._inbox.send(RouterRequest(command=command, origin=self))

    async def _publish(self, command: Command) -> None:
        reason = may_publish(
            self.principal,
            open_mode=self.gateway.open_mode,
            allow_anonymous_publish=self.config.allow_anonymous_publish,
        )
        if reason:
            self._refuse(ProtocolError(ErrorCode.FORBIDDEN, reason, ref=command.id))
            return
        events = command.payload.all_events
        if len(events) > self.config.max_batch_size:
            self._refuse(
                ProtocolError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"at most {self.config.max_batch_size} events per PUBLISH",
                    "payload.events",
                    command.id,
                )
            )
            return
        await self._inbox.send(RouterRequest(command=command, origin=self))

    def _answer_metrics(self, command: Command) -> None:
        if reason := may_admin(self.principal, open_mode=self.gateway.open_mode):
            self._refuse(ProtocolError(ErrorCode.FORBIDDEN, reason, ref=command.id))
            return
        kind = command.payload.type
        try:
            snapshot = self.gateway.metrics_snapshot(kind)
        except ValueError as exc:
            self._refuse(ProtocolError(ErrorCode.INVALID_PAYLOAD, str(exc), "payload.type", command.id))
            return
        self._reply(ReplyType.METRICS_RESPONSE, MetricsResponse(type=kind, metrics=snapshot, ref=command.id))

    def _authenticate(self, token: str, ref: str | None) -> None:
        verifier = self.gateway.verifier
        if verifier.open_mode:
            self._refuse(
                ProtocolError(ErrorCode.UNAUTHORIZED, "this server has no JWT key configured: tokens cannot be verified", ref=ref)
            )
            return
        try:
            principal = verifier.verify(token)
        except AuthError as exc:
            if self.principal is not None:
                # A failed refresh: the current token still holds until it expires.
                _admission.auth_failed(self, f"refresh refused: {exc.reason}")
                self._refuse(ProtocolError(ErrorCode.UNAUTHORIZED, exc.reason, ref=ref))
            else:
                self._refuse_auth(exc.reason, ref)
            return
        if self.principal is not None and principal.sub != self.principal.sub:
            self._refuse(ProtocolError(ErrorCode.FORBIDDEN, "a refreshed token must be for the same subject", ref=ref))
            return
        self.principal = principal
        self._auth_changed()
        self._reply(ReplyType.ACK, Ack(ref=ref, user=UserInfo(sub=principal.sub, role=principal.role.value)))

    def _refuse_auth(self, reason: str, ref: str | None) -> None:
        self._refuse(ProtocolError(ErrorCode.UNAUTHORIZED, reason, ref=ref))
        self.kick(CloseCode.AUTH_FAILED, "authentication failed")
        _admission.auth_failed(self, reason)

    # -- replies -------------------------------------------------------------------

    def _reply(self, reply: ReplyType, payload: Any) -> None:
        if not self.offer(reply_frame(reply, payload), 0.0):
            self._too_slow()

    def _refuse(self, error: ProtocolError) -> None:
        self.metrics.error(error.code)
        if not self.offer(error_frame(error), 0.0):
            self._too_slow()

    def _too_slow(self) -> None:
        """A reply does not fit the outbox: counted and logged like the router's 4008s."""
        if self.kick(CloseCode.SLOW_CONSUMER, "slow consumer: outbox full"):
            log.warning("slow consumer %s: outbox full, closing with 4008", self.session_id)
            self.metrics.slow_consumer_closes += 1

    def _welcome(self) -> Welcome:
        user = None if self.principal is None else UserInfo(sub=self.principal.sub, role=self.principal.role.value)
        return Welcome(
            session_id=self.session_id,
            server_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            heartbeat_interval=int(self.config.ping_interval * 1000),
            channel_heartbeat=int(self.config.channel_heartbeat * 1000),
            authenticated=self.principal is not None,
            user=user,
        )

    def _who(self) -> str:
        return "anonymous" if self.principal is None else f"{self.principal.sub}({self.principal.role.value})"
