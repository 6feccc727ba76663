"""Honest and hostile clients together against a live gateway, as a hypothesis state machine.

Each example starts its own gateway inside a trio loop on a helper thread; the rules
run in the test's thread and drive clients on that loop through ``trio.from_thread``.
Honest clients (a producer, two users, an admin) come from 127.0.10.x, hostile ones
from 127.0.20.x. After every step:

- honest clients are still connected and have received every event of their channels,
  in offset order, with nothing missing and nothing extra;
- no private ``user:<sub>`` channel has reached anyone but its owner;
- the server keeps answering (a PING gets its PONG).

25 examples in CI; ``pytest --hypothesis-profile=deep`` (registered in conftest.py) runs more.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from trio_websocket import ConnectionClosed, ConnectionRejected

from kaldrix.security import issue_token
from kaldrix.server import Gateway
from tests.conftest import WireClient, block_event, make_config
from tests.test_security_support import SECRET, bearer, connect_in, rejected

EXAMPLES = settings.default.max_examples if settings.default.max_examples > 100 else 25
"""25 in CI; a profile that asks for more than hypothesis's usual 100 (``deep``) gets its way."""
HOSTILE = [f"127.0.20.{i}" for i in range(1, 5)]
PRIVATE = ("user:alice", "user:bob")
CHANNELS = ("blocks", *PRIVATE)


def _token(sub: str, role: str) -> str:
    return issue_token(sub, role, secret=SECRET, ttl=3600)


class Peer:
    """A client whose frames are read into `frames` by a background task."""

    def __init__(self, name: str, source: str, client: WireClient, sub: str | None) -> None:
        self.name = name
        self.source = source
        self.client = client
        self.sub = sub
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._changed = trio.Event()

    async def read(self) -> None:
        try:
            while True:
                self.frames.append(orjson.loads(await self.client.ws.get_message()))
                self._wake()
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason is not None else 1006
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, done: Callable[[], Any]) -> Any:
        """Wait (bounded) until `done()` gives something true, re-checking on each frame."""
        with trio.fail_after(5):
            while not (found := done()):
                await self._changed.wait()
            return found

    async def send(self, data: str | bytes) -> None:
        try:
            await self.client.send_raw(data)
        except ConnectionClosed:
            pass

    def events(self, channel: str) -> list[int]:
        return [frame["offset"] for frame in self.frames if frame.get("channel") == channel]


class GatewayOnAThread:
    """A trio loop on its own thread running a gateway; `call` runs a coroutine on it."""

    def __init__(self, **config: Any) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._config = config
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the gateway did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as root:
            self.gateway = Gateway(make_config(**self._config))
            await root.start(self.gateway.run)
            async with trio.open_nursery() as clients:
                self.nursery = clients
                self.token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                await self.gateway.shutdown()  # closes every client (its reader answers at once), then stops

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def stop(self) -> None:
        if self._error is None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(10)
        if self._error is not None:
            raise self._error


class HonestAndHostile(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = GatewayOnAThread(
            jwt_secret=SECRET,
            allow_anonymous_publish=False,
            simulate=False,
            close_timeout=0.05,
            max_message_size=4096,
            message_rate=20,
            message_burst=40,
            rate_limit_strikes=4,
            handshake_rate_limit=6,
            auth_failure_limit=3,
            auth_ban_duration=30,
        )
        self.expected: dict[str, list[int]] = {channel: [] for channel in CHANNELS}
        self.hostiles: list[Peer] = []
        self.honest: dict[str, Peer] = self.loop.call(self._open_honest)

    def teardown(self) -> None:
        self.loop.stop()

    @property
    def gateway(self) -> Gateway:
        return self.loop.gateway

    async def _peer(self, name: str, source: str, sub: str | None, headers: dict[str, str] | None = None) -> Peer:
        client = await connect_in(self.loop.nursery, self.gateway, source, headers)
        peer = Peer(name, source, client, sub)
        self.loop.nursery.start_soon(peer.read)
        return peer

    async def _open_honest(self) -> dict[str, Peer]:
        honest = {
            "feeder": await self._peer("feeder", "127.0.10.1", "feeder", bearer(_token("feeder", "publisher"))),
            "alice": await self._peer("alice", "127.0.10.2", "alice", bearer(_token("alice", "user"))),
            "bob": await self._peer("bob", "127.0.10.3", "bob", bearer(_token("bob", "user"))),
            "root": await self._peer("root", "127.0.10.4", "root", bearer(_token("root", "admin"))),
        }
        for name, private in (("alice", "user:alice"), ("bob", "user:bob")):
            await honest[name].send(_command("SUBSCRIBE", {"channels": ["blocks", private]}, f"join-{name}"))
            await _reply(honest[name], f"join-{name}")
        return honest

    # -- honest traffic ----------------------------------------------------------------------------

    @rule(channel=st.sampled_from(CHANNELS), count=st.integers(1, 3))
    def publish(self, channel: str, count: int) -> None:
        async def go() -> dict[str, Any]:
            feeder = self.honest["feeder"]
            events = [block_event() for _ in range(count)]
            payload = {"events": events, "channel": channel} if count > 1 else {"event": events[0], "channel": channel}
            await feeder.send(_command("PUBLISH", payload, message_id := f"pub-{len(feeder.frames)}"))
            return await _reply(feeder, message_id)

        ack = self.loop.call(go)
        assert ack["type"] == "ACK", ack
        self.expected[channel].extend(result["offsets"][channel] for result in ack["payload"]["results"])

    # -- hostile traffic ---------------------------------------------------------------------------

    @rule(source=st.sampled_from(HOSTILE), as_user=st.booleans(), spoof=st.booleans())
    def hostile_connects(self, source: str, as_user: bool, spoof: bool) -> None:
        headers = bearer(_token("mallory", "user")) if as_user else {}
        if spoof:  # naming an honest address gets it nothing: the peer is no trusted proxy
            headers["X-Forwarded-For"] = "127.0.10.2"

        async def go() -> None:
            try:
                self.hostiles.append(await self._peer(f"hostile@{source}", source, "mallory" if as_user else None, headers))
            except ConnectionRejected as exc:
                assert exc.status_code in (403, 429), exc.status_code

        self.loop.call(go)

    @rule(source=st.sampled_from(HOSTILE))
    def hostile_bad_token(self, source: str) -> None:
        async def go() -> None:
            try:
                peer = await self._peer(f"forger@{source}", source, None, bearer("eyJhbGciOiJub25lIn0.e30."))
            except ConnectionRejected as exc:
                assert exc.status_code in (403, 429)
                return
            self.hostiles.append(peer)

        self.loop.call(go)

    @precondition(lambda self: self.hostiles)
    @rule(data=st.data())
    def hostile_misbehaves(self, data: st.DataObject) -> None:
        peer = data.draw(st.sampled_from(self.hostiles))
        kind = data.draw(st.sampled_from(["snoop", "publish", "admin", "flood", "garbage", "oversize", "metrics"]))
        frames: list[str | bytes]
        match kind:
            case "snoop":
                frames = [_command("SUBSCRIBE", {"channels": [data.draw(st.sampled_from(PRIVATE))]})]
            case "publish":
                frames = [_command("PUBLISH", {"event": block_event(), "channel": data.draw(st.sampled_from(CHANNELS))})]
            case "admin":
                target = data.draw(st.sampled_from(["127.0.10.0/24", "127.0.10.2", "0.0.0.0/0"]))
                frames = [_command("ADMIN", {"action": "block", "address": target})]
            case "flood":
                frames = [_command("PING", {"t": index}) for index in range(data.draw(st.integers(10, 80)))]
            case "garbage":
                frames = data.draw(st.lists(st.binary(max_size=40) | st.text(max_size=40), min_size=1, max_size=5))
            case "oversize":
                frames = ["x" * 5000]
            case _:
                frames = [_command("REQUEST_METRICS", {})]

        async def go() -> None:
            for frame in frames:
                await peer.send(frame)

        self.loop.call(go)

    @rule(source=st.sampled_from([*HOSTILE, "127.0.20.0/24"]), duration=st.none() | st.just(30.0))
    def admin_blocks(self, source: str, duration: float | None) -> None:
        async def go() -> None:
            root = self.honest["root"]
            payload: dict[str, Any] = {"action": "block", "address": source}
            if duration is not None:
                payload["duration"] = duration
            await root.send(_command("ADMIN", payload, message_id := f"block-{len(root.frames)}"))
            assert (await _reply(root, message_id))["type"] == "ACK"
            refusal = await rejected(self.gateway, HOSTILE[0] if "/" in source else source)
            assert refusal.status_code == 403
            hit = [peer for peer in self.hostiles if "/" in source or peer.source == source]
            for peer in hit:
                await peer.until(lambda: peer.close_code is not None)  # noqa: B023
            assert all(peer.close_code in (4003, 4001, 4029, 1009) for peer in hit), [p.close_code for p in hit]

        self.loop.call(go)

    @rule(source=st.sampled_from([*HOSTILE, "127.0.20.0/24"]))
    def admin_unblocks(self, source: str) -> None:
        async def go() -> None:
            root = self.honest["root"]
            await root.send(_command("ADMIN", {"action": "unblock", "address": source}, message_id := f"unblock-{len(root.frames)}"))
            assert (await _reply(root, message_id))["type"] == "ACK"

        self.loop.call(go)

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def honest_clients_get_every_event_in_order(self) -> None:
        async def check() -> None:
            wanted = {"alice": ("blocks", "user:alice"), "bob": ("blocks", "user:bob")}
            for name, channels in wanted.items():
                peer = self.honest[name]
                await peer.until(lambda: all(len(peer.events(c)) >= len(self.expected[c]) for c in channels))  # noqa: B023
            for name, channels in wanted.items():
                for channel in channels:
                    assert self.honest[name].events(channel) == self.expected[channel], (name, channel)
            for peer in self.honest.values():
                assert peer.close_code is None, (peer.name, peer.close_code)

        self.loop.call(check)

    @invariant()
    def no_private_channel_leaks(self) -> None:
        async def check() -> None:
            for peer in [*self.honest.values(), *self.hostiles]:
                for frame in peer.frames:
                    channel = frame.get("channel") or ""
                    if channel.startswith("user:"):
                        assert channel == f"user:{peer.sub}", (peer.name, channel)

        self.loop.call(check)

    @invariant()
    def the_server_keeps_answering(self) -> None:
        async def ping() -> None:
            alice = self.honest["alice"]
            await alice.send(_command("PING", {"t": "alive"}, message_id := f"alive-{len(alice.frames)}"))
            pong = await _reply(alice, message_id, kind="PONG")
            assert pong["payload"]["t"] == "alive"

        self.loop.call(ping)


def _command(kind: str, payload: dict[str, Any], message_id: str | None = None) -> str:
    frame: dict[str, Any] = {"type": kind, "payload": payload}
    if message_id is not None:
        frame["id"] = message_id
    return orjson.dumps(frame).decode()


async def _reply(peer: Peer, message_id: str, kind: str | None = None) -> dict[str, Any]:
    """The ACK/ERROR (or `kind`) whose ref is `message_id`, as the peer's reader recorded it."""

    def found() -> dict[str, Any] | None:
        for frame in reversed(peer.frames):
            payload = frame.get("payload") or {}
            if isinstance(payload, dict) and payload.get("ref") == message_id and (kind is None or frame["type"] == kind):
                return frame
        assert peer.close_code is None, (peer.name, peer.close_code)
        return None

    return await peer.until(found)


HonestAndHostile.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestHonestAndHostile = HonestAndHostile.TestCase
