"""The handshake and the simple request/answer pairs: WELCOME, AUTH, PING, SUBSCRIBE, metrics."""

from __future__ import annotations

import re

from ._checks import is_int, is_rfc3339, require, show
from ._context import Context
from ._outcome import ScenarioSkipped
from ._registry import SCENARIOS

_PROTOCOL_V1 = re.compile(r"^1\.\d+(\.\d+)?$")


@SCENARIOS.add("welcome")
async def welcome(ctx: Context) -> None:
    """The first frame of a connection is WELCOME, with the session's facts."""
    peer = await ctx.connect()
    frame = peer.welcome
    payload = frame["payload"]
    session = payload.get("sessionId")
    require(isinstance(session, str) and bool(session), "WELCOME needs `sessionId` (non-empty string)", frame)
    require(isinstance(payload.get("serverVersion"), str), "WELCOME needs `serverVersion` (string)", frame)
    version = payload.get("protocolVersion")
    require(isinstance(version, str) and bool(_PROTOCOL_V1.match(version)), 'WELCOME needs `protocolVersion` "1.x"', frame)
    require(is_int(payload.get("heartbeatInterval")), "WELCOME needs `heartbeatInterval` (integer, ms)", frame)
    require(payload["heartbeatInterval"] >= 0, "`heartbeatInterval` cannot be negative", frame)
    require(isinstance(payload.get("authenticated"), bool), "WELCOME needs `authenticated` (boolean)", frame)
    require(payload["authenticated"] is False, "a connection without a token cannot be authenticated", frame)
    other = await ctx.connect(label="second connection")
    require(
        other.welcome["payload"].get("sessionId") != session,
        f"two connections got the same sessionId {session!r}",
        other.welcome,
    )


@SCENARIOS.add("auth-token")
async def auth_token(ctx: Context) -> None:
    """A token in the handshake, or in AUTH, authenticates the connection."""
    token = ctx.token or ctx.admin_token
    if token is None:
        raise ScenarioSkipped("no --token or --admin-token given")
    if not await ctx.verifies_tokens():
        raise ScenarioSkipped("the server did not authenticate the token given (WELCOME authenticated false): open mode?")
    peer = await ctx.connect(token=token, label="token connection")
    user = peer.welcome["payload"].get("user")
    if user is not None:
        require(
            isinstance(user, dict) and isinstance(user.get("sub"), str) and isinstance(user.get("role"), str),
            "WELCOME `user` must be {sub, role}",
            peer.welcome,
        )
    anonymous = await ctx.connect(label="anonymous connection")
    message_id, reply = await anonymous.request("AUTH", {"token": token})
    require(reply["type"] == "ACK", f"AUTH {message_id!r} with the token given was refused", reply)


@SCENARIOS.add("ping-pong")
async def ping_pong(ctx: Context) -> None:
    """PING {t} gets PONG {t, serverTime}: `t` unchanged, serverTime RFC 3339."""
    peer = await ctx.connect()
    t = 1754560800123.5
    await peer.send("PING", {"t": t})
    pong = await peer.wait_for(lambda frame: frame["type"] == "PONG", "PONG")
    require(pong["payload"].get("t") == t, f"PONG must echo t={t!r}", pong)
    require(is_rfc3339(pong["payload"].get("serverTime")), "PONG needs `serverTime` (RFC 3339)", pong)


@SCENARIOS.add("subscribe-ack")
async def subscribe_ack(ctx: Context) -> None:
    """SUBSCRIBE is answered by an ACK naming each channel's offset and epoch."""
    peer = await ctx.connect()
    channels = [ctx.fresh("validator:"), ctx.fresh("address:")]
    message_id, reply = await peer.request("SUBSCRIBE", {"channels": channels})
    require(reply["type"] == "ACK", f"SUBSCRIBE {channels} was refused", reply)
    require(reply["payload"].get("ref") == message_id, f"ACK `ref` must be the command id {message_id!r}", reply)
    positions = reply["payload"].get("channels")
    require(isinstance(positions, dict), "the ACK of SUBSCRIBE needs `channels` (object)", reply)
    require(set(positions) == set(channels), f"ACK `channels` must name exactly {channels}", reply)
    for name in channels:
        position = positions[name]
        require(isinstance(position, dict), f"ACK channels[{name!r}] must be an object", reply)
        require(is_int(position.get("offset")) and position["offset"] >= 0, f"{name}: `offset` must be an integer >= 0", reply)
        require(isinstance(position.get("epoch"), str) and bool(position["epoch"]), f"{name}: `epoch` must be a string", reply)
        require(position.get("recovered") is False, f"{name}: `recovered` must be false without `since`", reply)
        require(position.get("replayed") == 0, f"{name}: `replayed` must be 0 without `since`", reply)


@SCENARIOS.add("request-metrics")
async def request_metrics(ctx: Context) -> None:
    """REQUEST_METRICS {type} gets METRICS_RESPONSE {type, metrics} (admin only outside open mode)."""
    peer = await ctx.connect(token=ctx.admin_token, label="admin connection" if ctx.admin_token else "")
    message_id = await peer.send("REQUEST_METRICS", {"type": "all"})

    def answer(frame: dict) -> bool:
        return frame["type"] == "METRICS_RESPONSE" or (frame["type"] == "ERROR" and frame["payload"].get("ref") == message_id)

    reply = await peer.wait_for(answer, f"METRICS_RESPONSE to {message_id!r}")
    if reply["type"] == "ERROR":
        if reply["payload"].get("code") == "FORBIDDEN" and ctx.admin_token is None:
            raise ScenarioSkipped(f"REQUEST_METRICS needs an admin token (--admin-token): {show(reply['payload'])}")
        require(False, "REQUEST_METRICS was refused", reply)
    require(reply["payload"].get("type") == "all", 'METRICS_RESPONSE must echo type "all"', reply)
    require(isinstance(reply["payload"].get("metrics"), dict), "METRICS_RESPONSE needs `metrics` (object)", reply)
