"""Every error code a client can provoke, each its own scenario.

INTERNAL cannot be provoked from outside and has no scenario. After a refused
command the connection must stay open (checked with a PING), except where the
contract closes it: a failed AUTH may close with 4001, a too-large frame closes
with 1009, and rate limiting may close with 4029.
"""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed

from ._checks import require, show
from ._context import Context
from ._outcome import ScenarioFailed, ScenarioSkipped
from ._peer import Closed, Frame, Peer
from ._registry import SCENARIOS

TOO_LARGE_BYTES = 2 << 20
"""Over the server's frame limit (1 MiB by default)."""
LIMIT_CHANNELS = 1000
"""More channels than a server lets one connection hold (256 by default)."""
FLOOD_PINGS = 2000
"""PINGs sent back to back to provoke RATE_LIMITED."""


def check_error(reply: Frame, code: str, what: str, *, path: str | None = None) -> Frame:
    """The payload of an ERROR with `code` (and `path`), or fail naming the frame."""
    require(reply["type"] == "ERROR", f"{what} must be refused with {code}", reply)
    payload = reply["payload"]
    require(payload.get("code") == code, f"{what} must be refused with {code}", reply)
    require(isinstance(payload.get("message"), str), "ERROR needs `message` (string)", reply)
    if path is not None:
        require(payload.get("path") == path, f"ERROR {code} for {what} must name path {path!r}", reply)
    return payload


async def refused(peer: Peer, message_type: str, payload: dict, code: str, *, path: str | None = None) -> Frame:
    """Send a command that must get ERROR `code` with `ref` = its id; the connection stays open."""
    _, reply = await peer.request(message_type, payload)
    what = f"{message_type} {show(payload)}"
    check_error(reply, code, what, path=path)
    await peer.still_open(f"ERROR {code}")
    return reply["payload"]


async def refused_raw(peer: Peer, data: str | bytes, code: str, what: str) -> Frame:
    """Send a frame without a usable id: it must get ERROR `code` without a `ref`."""
    await peer.send_raw(data)
    reply = await peer.wait_for(lambda frame: frame["type"] == "ERROR", f"the ERROR for {what}")
    check_error(reply, code, what)
    require(reply["payload"].get("ref") is None, f"the ERROR for {what} cannot reference an id", reply)
    await peer.still_open(f"ERROR {code}")
    return reply["payload"]


@SCENARIOS.add("error:INVALID_JSON")
async def invalid_json(ctx: Context) -> None:
    """A frame that is not JSON gets INVALID_JSON."""
    peer = await ctx.connect()
    await refused_raw(peer, '{"type": "PING", "id": "broken", ', "INVALID_JSON", "a frame that is not JSON")


@SCENARIOS.add("error:INVALID_MESSAGE")
async def invalid_message(ctx: Context) -> None:
    """A JSON object without `type` gets INVALID_MESSAGE naming path `type`, with `ref` = its id."""
    peer = await ctx.connect()
    message_id = ctx.new_id()
    await peer.send_raw(json.dumps({"id": message_id, "payload": {}}))
    check_error(await peer.reply_to(message_id), "INVALID_MESSAGE", "a message without `type`", path="type")
    await peer.still_open("ERROR INVALID_MESSAGE")


@SCENARIOS.add("error:INVALID_MESSAGE:binary-frame")
async def binary_frame(ctx: Context) -> None:
    """A binary frame gets INVALID_MESSAGE (v1 frames are text)."""
    peer = await ctx.connect()
    frame = json.dumps({"type": "PING", "payload": {"t": 1}, "id": ctx.new_id()}).encode()
    await peer.send_raw(frame)
    reply = await peer.wait_for(lambda got: got["type"] in ("ERROR", "PONG"), "the ERROR for a binary frame")
    check_error(reply, "INVALID_MESSAGE", "a binary frame")
    await peer.still_open("ERROR INVALID_MESSAGE")


@SCENARIOS.add("error:UNKNOWN_TYPE")
async def unknown_type(ctx: Context) -> None:
    """A command type the protocol does not define gets UNKNOWN_TYPE."""
    peer = await ctx.connect()
    await refused(peer, "FROBNICATE", {}, "UNKNOWN_TYPE")


@SCENARIOS.add("error:INVALID_PAYLOAD")
async def invalid_payload(ctx: Context) -> None:
    """A payload field of the wrong type gets INVALID_PAYLOAD naming its path."""
    peer = await ctx.connect()
    await refused(peer, "SUBSCRIBE", {"channels": 42}, "INVALID_PAYLOAD", path="payload.channels")


@SCENARIOS.add("error:INVALID_CHANNEL")
async def invalid_channel(ctx: Context) -> None:
    """An unknown channel name gets INVALID_CHANNEL naming `payload.channels[i]`."""
    peer = await ctx.connect()
    await refused(peer, "SUBSCRIBE", {"channels": ["blocks", "no-such-channel"]}, "INVALID_CHANNEL", path="payload.channels[1]")


@SCENARIOS.add("error:FORBIDDEN")
async def forbidden(ctx: Context) -> None:
    """An anonymous SUBSCRIBE to another user's private channel gets FORBIDDEN."""
    peer = await ctx.connect(label="anonymous connection")
    channel = ctx.fresh("user:someone-else-")
    _, reply = await peer.request("SUBSCRIBE", {"channels": [channel]})
    if reply["type"] == "ACK" and not await ctx.verifies_tokens():
        raise ScenarioSkipped(
            f"the server let an anonymous client read {channel}: it checks no tokens (open development mode); "
            "pass --token to tell that apart from a missing check"
        )
    check_error(reply, "FORBIDDEN", f"an anonymous SUBSCRIBE to {channel}")
    await peer.still_open("ERROR FORBIDDEN")


@SCENARIOS.add("error:UNAUTHORIZED")
async def unauthorized(ctx: Context) -> None:
    """AUTH with a garbage token gets UNAUTHORIZED; the connection stays open or closes with 4001."""
    peer = await ctx.connect()
    _, reply = await peer.request("AUTH", {"token": "garbage.not-a.token"})
    check_error(reply, "UNAUTHORIZED", "AUTH with a garbage token")
    try:
        await peer.ping()
    except ScenarioFailed:
        closed = peer.ws.closed
        if closed is None or closed.code != 4001:
            raise ScenarioFailed(
                f"after a refused AUTH the connection must stay open or close with 4001; got {Closed(closed)}"
            ) from None


@SCENARIOS.add("error:LIMIT_EXCEEDED")
async def limit_exceeded(ctx: Context) -> None:
    """SUBSCRIBE to more channels than one connection may hold gets LIMIT_EXCEEDED."""
    peer = await ctx.connect()
    channels = [f"node:n{i}" for i in range(LIMIT_CHANNELS)]
    _, reply = await peer.request("SUBSCRIBE", {"channels": channels})
    if reply["type"] == "ACK":
        raise ScenarioSkipped(f"the server let one connection subscribe to {LIMIT_CHANNELS} channels: its limit is higher")
    check_error(reply, "LIMIT_EXCEEDED", f"SUBSCRIBE to {LIMIT_CHANNELS} channels")
    await peer.still_open("ERROR LIMIT_EXCEEDED")


@SCENARIOS.add("error:TOO_LARGE")
async def too_large(ctx: Context) -> None:
    """A frame over the server's size limit closes the connection with 1009."""
    peer = await ctx.connect()
    t = "x" * TOO_LARGE_BYTES
    message_id = ctx.new_id()
    ctx.note(f"the server to take (or refuse) a {TOO_LARGE_BYTES}-byte frame")
    try:
        await peer.ws.send_message(json.dumps({"type": "PING", "payload": {"t": t}, "id": message_id}))
    except ConnectionClosed:
        pass  # the server may close while the frame is still going out: the close code tells
    while True:
        got = await peer.next_or_close(f"the close after a {TOO_LARGE_BYTES}-byte frame")
        if isinstance(got, Closed):
            break
        if got["type"] == "PONG":
            raise ScenarioSkipped(f"the server accepted a {TOO_LARGE_BYTES}-byte frame: its limit is higher")
        if got["type"] == "ERROR":
            check_error(got, "TOO_LARGE", f"a {TOO_LARGE_BYTES}-byte frame")
    require(got.code == 1009, f"a {TOO_LARGE_BYTES}-byte frame must close the connection with 1009, got {got}")


@SCENARIOS.add("error:RATE_LIMITED", last=True)
async def rate_limited(ctx: Context) -> None:
    """A flood of PINGs gets RATE_LIMITED (or a close with 4029) where the server limits rates."""
    peer = await ctx.connect()

    async def flood() -> None:
        try:
            for index in range(FLOOD_PINGS):
                await peer.send("PING", {"t": index})
        except ScenarioFailed:
            pass  # closed by the server: the reader tells why

    pongs = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        while pongs < FLOOD_PINGS:
            got = await peer.next_or_close(f"PONG {pongs + 1} of {FLOOD_PINGS} or RATE_LIMITED")
            if isinstance(got, Closed):
                require(got.code == 4029, f"the connection closed during a PING flood with {got}, not 4029")
                nursery.cancel_scope.cancel()
                return
            if got["type"] == "ERROR":
                check_error(got, "RATE_LIMITED", "a PING flood")
                nursery.cancel_scope.cancel()
                return
            if got["type"] == "PONG":
                pongs += 1
    raise ScenarioSkipped(f"{FLOOD_PINGS} quick PINGs were all answered: the server has no rate limit that low")
