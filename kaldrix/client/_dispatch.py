"""From the connection to the application: handlers (paced) and event streams (lossless).

One task runs `Dispatcher.run`: it takes items in arrival order from the connection
(events, gaps, and control messages nobody was waiting for), feeds every open
EventStream, and calls handlers. A full EventStream makes the dispatcher wait, which
eventually pauses reading from the socket: the server then sees a slow consumer and
the client recovers from history after reconnecting, so nothing is lost.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..protocol import Envelope
from ._pacing import Pacer
from ._positions import Gap

log = logging.getLogger("kaldrix.client")

Handler = Callable[[Any], Awaitable[None] | None]
ALL_EVENTS = "*"


class EventStream:
    """Every event of the client's channels, in order (and gaps, if asked for).

    Use it as ``async for event in client.events()``; leaving the loop early, close it
    (``async with client.events() as events:`` does) so the client stops feeding it.
    """

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._receive.aclose()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@attrs.define(eq=False)
class _Sink:
    send: trio.MemorySendChannel[Any]
    include_gaps: bool


_NOTHING = object()


class Dispatcher:
    """Handlers by event type, gap handlers, and the open event streams."""

    def __init__(self, pacer: Pacer | None = None, *, buffer_size: int = 1024) -> None:
        self.pacer = pacer or Pacer()
        self.buffer_size = buffer_size
        self._handlers: dict[str, list[Handler]] = {}
        self._gap_handlers: list[Handler] = []
        self._sinks: list[_Sink] = []
        self._closed = False

    # -- registration (from any task) --------------------------------------------

    def subscribe(self, event_type: str, handler: Handler) -> Callable[[], None]:
        """Call `handler` for each event of `event_type` ("*": every event); returns the undo."""
        key = str(event_type)
        self._handlers.setdefault(key, []).append(handler)
        return lambda: _remove(self._handlers.get(key, []), handler)

    def on_gap(self, handler: Handler) -> Callable[[], None]:
        self._gap_handlers.append(handler)
        return lambda: _remove(self._gap_handlers, handler)

    @property
    def has_gap_handlers(self) -> bool:
        return bool(self._gap_handlers)

    def open_stream(self, *, include_gaps: bool = False) -> EventStream:
        send, receive = trio.open_memory_channel[Any](self.buffer_size)
        stream = EventStream(receive)
        # An abandoned stream must not stall the dispatcher on a full buffer.
        weakref.finalize(stream, receive.close).atexit = False
        if self._closed:
            send.close()
        else:
            self._sinks.append(_Sink(send, include_gaps))
        return stream

    def close_streams(self) -> None:
        """End every stream (after what it already holds) and refuse new ones."""
        self._closed = True
        for sink in self._sinks:
            sink.send.close()
        self._sinks.clear()

    # -- the dispatching task -----------------------------------------------------

    async def run(self, inbound: trio.MemoryReceiveChannel[Any]) -> None:
        """Dispatch until `inbound` ends; then release what pacing holds and end the streams."""
        try:
            async with inbound:
                while True:
                    item: Any = _NOTHING
                    with trio.move_on_at(self.pacer.deadline()):
                        try:
                            item = await inbound.receive()
                        except trio.EndOfChannel:
                            break
                    for event in self.pacer.due(trio.current_time()):
                        await self._call_handlers(event)
                    if item is not _NOTHING:
                        await self.deliver(item)
            for event in self.pacer.flush():
                await self._call_handlers(event)
        finally:
            self.close_streams()

    async def deliver(self, item: Any) -> None:
        if isinstance(item, Gap):
            await self._feed(item, gap=True)
            for handler in list(self._gap_handlers):
                await _call(handler, item)
        elif isinstance(item, Envelope) and item.channel is None:
            # A control message no request was waiting for (METRICS_RESPONSE, ERROR, ...).
            for handler in list(self._handlers.get(item.type, ())):
                await _call(handler, item)
        else:
            await self._feed(item, gap=False)
            if self._handlers.get(item.type) or self._handlers.get(ALL_EVENTS):
                for event in self.pacer.offer(item.type, item, trio.current_time()):
                    await self._call_handlers(event)

    async def _feed(self, item: Any, *, gap: bool) -> None:
        for sink in list(self._sinks):
            if gap and not sink.include_gaps:
                continue
            try:
                await sink.send.send(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                _remove(self._sinks, sink)

    async def _call_handlers(self, event: Envelope) -> None:
        for handler in [*self._handlers.get(event.type, ()), *self._handlers.get(ALL_EVENTS, ())]:
            await _call(handler, event)


async def _call(handler: Handler, item: Any) -> None:
    """A failing handler is logged, not fatal: the other handlers and streams go on."""
    try:
        result = handler(item)
        if inspect.isawaitable(result):
            await result
    except Exception:  # an application bug must not stop delivery
        log.exception("handler %r failed on %s", handler, getattr(item, "type", type(item).__name__))


def _remove(items: list[Any], item: Any) -> None:
    try:
        items.remove(item)
    except ValueError:
        pass
