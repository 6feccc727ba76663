"""The conformance vectors of spec/vectors/*.json, each run as its own scenario.

A vector is one exact text frame and a verdict. "accept": the server must not refuse
it (a PUBLISH or SUBSCRIBE gets its ACK, a PING its PONG). "reject": the server answers
an ERROR with the vector's code (and path when given), whose `ref` is the frame's id
when it had a string id, and the connection stays open. Vectors share connections,
a fresh one every few vectors, so that no vector depends on many before it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import attrs

import kaldrix

from ._checks import require, show
from ._context import Context, RunState
from ._errors import check_error
from ._outcome import ScenarioFailed, ScenarioSkipped
from ._peer import Frame, Match, Peer
from ._registry import Scenario

VECTORS_PER_CONNECTION = 16
OUTSIDE_THE_FRAME = ("FORBIDDEN", "UNAUTHORIZED", "RATE_LIMITED", "LIMIT_EXCEEDED")
"""Refusals of a valid frame for reasons outside it (rights, limits): an accept vector
refused so cannot be judged by this run, and is skipped."""
CLOSING_CODES = {"UNAUTHORIZED": 4001, "TOO_LARGE": 1009, "RATE_LIMITED": 4029}
"""Refusals after which the contract lets the server close, with this close code."""


def default_vectors_dir() -> Path:
    """spec/vectors beside the package (a source checkout)."""
    return Path(kaldrix.__file__).resolve().parent.parent / "spec" / "vectors"


@attrs.frozen
class Vector:
    group: str
    name: str
    frame: str
    verdict: str
    code: str | None = None
    path: str | None = None
    description: str = ""

    @property
    def parsed(self) -> dict[str, Any] | None:
        try:
            obj = json.loads(self.frame)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    @property
    def type(self) -> str | None:
        obj = self.parsed
        return obj.get("type") if obj is not None and isinstance(obj.get("type"), str) else None

    @property
    def frame_id(self) -> str | None:
        obj = self.parsed
        return obj.get("id") if obj is not None and isinstance(obj.get("id"), str) else None


def _vector(group: str, index: int, raw: Any) -> Vector | str:
    """A Vector, or why the entry is malformed."""
    if not isinstance(raw, dict):
        return f"vector {index} is not an object"
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        return f"vector {index} needs `name` (string)"
    if not isinstance(raw.get("frame"), str):
        return f"vector {name!r} needs `frame` (the exact text frame, a string)"
    if raw.get("verdict") not in ("accept", "reject"):
        return f"vector {name!r} needs `verdict` accept or reject"
    for key in ("code", "path", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f"vector {name!r}: `{key}` must be a string"
    return Vector(group, name, raw["frame"], raw["verdict"], raw.get("code"), raw.get("path"), raw.get("description") or "")


def load_vectors(directory: Path) -> tuple[list[Vector], list[tuple[str, str]]]:
    """Every vector of `directory`/*.json, and (name, problem) for what cannot be read."""
    vectors: list[Vector] = []
    problems: list[tuple[str, str]] = []
    for file in sorted(directory.glob("*.json")):
        group = file.stem
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append((f"vectors:{file.name}", f"cannot read {file}: {exc}"))
            continue
        if not isinstance(document, dict) or not isinstance(document.get("vectors"), list):
            problems.append((f"vectors:{file.name}", f"{file} needs an object with `vectors` (array)"))
            continue
        seen: set[str] = set()
        for index, raw in enumerate(document["vectors"]):
            got = _vector(group, index, raw)
            if isinstance(got, str):
                problems.append((f"vector:{group}/{index}", f"malformed in {file.name}: {got}"))
                continue
            name, suffix = got.name, index
            while name in seen:  # two vectors of one file share a name: keep both, apart
                name, suffix = f"{got.name}#{suffix}", suffix + 1
            seen.add(name)
            got = attrs.evolve(got, name=name)
            vectors.append(got)
    return vectors, problems


def vector_scenarios(directory: Path) -> list[Scenario]:
    """One scenario per vector; a failing one for each unreadable file or entry."""
    if not directory.is_dir() or not any(directory.glob("*.json")):
        return [Scenario("vectors", functools.partial(_no_vectors, directory), "the conformance vectors")]
    vectors, problems = load_vectors(directory)
    scenarios = [Scenario(name, functools.partial(_malformed, problem), "a vector file") for name, problem in problems]
    scenarios += [
        Scenario(f"vector:{v.group}/{v.name}", functools.partial(run_vector, v), v.description) for v in vectors
    ]
    return scenarios


async def _no_vectors(directory: Path, ctx: Context) -> None:
    raise ScenarioSkipped(f"no vector files in {directory}")


async def _malformed(problem: str, ctx: Context) -> None:
    raise ScenarioFailed(problem)


# -- running one vector -------------------------------------------------------------------


def _token_for(ctx: Context, vector: Vector) -> str | None:
    if vector.type == "PUBLISH":
        return ctx.token
    if vector.type == "REQUEST_METRICS":
        return ctx.admin_token
    return None


async def _shared_peer(ctx: Context, token: str | None) -> Peer:
    """The connection vectors with this token share, fresh every VECTORS_PER_CONNECTION uses."""
    state: RunState = ctx.state
    key = token or ""
    peer = state.shared_peers.get(key)
    if peer is not None and (peer.ws.closed is not None or state.shared_uses[key] >= VECTORS_PER_CONNECTION):
        await state.drop_shared(key)
        peer = None
    if peer is None:
        peer = await ctx.connect(token=token, label="vector connection", keep=True)
        state.shared_peers[key] = peer
        state.shared_uses[key] = 0
    state.shared_uses[key] += 1
    peer.pending.clear()
    return peer


async def run_vector(vector: Vector, ctx: Context) -> None:
    token = _token_for(ctx, vector)
    peer = await _shared_peer(ctx, token)
    healthy = False
    try:
        await peer.send_raw(vector.frame)
        if vector.verdict == "accept":
            await _accepted(ctx, peer, vector)
        else:
            await _rejected(ctx, peer, vector)
        healthy = True
    finally:
        if not healthy:
            await ctx.state.drop_shared(token or "")


def _answer_to(vector: Vector) -> Match:
    """What answers the vector's frame: its ACK/ERROR, or the PONG/METRICS_RESPONSE of its type."""
    frame_id = vector.frame_id

    def match(frame: Frame) -> bool:
        if frame["type"] in ("ACK", "ERROR"):
            return frame["payload"].get("ref") == frame_id or (frame_id is None and frame["type"] == "ERROR")
        return frame["type"] in ("PONG", "METRICS_RESPONSE") and vector.type in ("PING", "REQUEST_METRICS")

    return match


async def _accepted(ctx: Context, peer: Peer, vector: Vector) -> None:
    frame_id = vector.frame_id
    if vector.type in ("PING", "REQUEST_METRICS", "SUBSCRIBE", "UNSUBSCRIBE", "PUBLISH", "AUTH"):
        reply = await peer.wait_for(_answer_to(vector), f"the answer to the vector frame {show(vector.frame)}")
    else:
        # No answer of its own to wait for: a PING after it shows whether it was refused.
        probe = ctx.new_id()
        await peer.send("PING", {"t": probe})

        def match(frame: Frame) -> bool:
            if frame["type"] == "ERROR":
                return frame["payload"].get("ref") == frame_id
            return frame["type"] == "PONG" and frame["payload"].get("t") == probe

        reply = await peer.wait_for(match, "the PONG after the vector frame")
    if reply["type"] == "ERROR":
        if reply["payload"].get("code") in OUTSIDE_THE_FRAME:
            raise ScenarioSkipped(f"a valid frame was refused for a reason outside it (rights or limits): {show(reply['payload'])}")
        raise ScenarioFailed(f"an accept vector was refused: sent {show(vector.frame)}, got {show(reply)}")


async def _rejected(ctx: Context, peer: Peer, vector: Vector) -> None:
    reply = await peer.wait_for(_answer_to(vector), f"the ERROR for the vector frame {show(vector.frame)}")
    if reply["type"] != "ERROR":
        if vector.code == "FORBIDDEN" and not await ctx.verifies_tokens():
            raise ScenarioSkipped("the server granted it: it checks no tokens (open development mode); pass --token to tell")
        raise ScenarioFailed(f"a reject vector was accepted: sent {show(vector.frame)}, got {show(reply)}")
    code = reply["payload"].get("code")
    what = f"the frame {show(vector.frame)}"
    if vector.code is not None:
        check_error(reply, vector.code, what, path=vector.path)
    if vector.frame_id is None:
        require(reply["payload"].get("ref") is None, f"the ERROR for {what} cannot reference an id", reply)
    closing = CLOSING_CODES.get(code or "")
    try:
        await peer.still_open(f"ERROR {code}")
    except ScenarioFailed:
        closed = peer.ws.closed
        if closing is None or closed is None or closed.code != closing:
            raise
