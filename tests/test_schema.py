"""The generated JSON Schemas and AsyncAPI document: in sync, valid, and true to the codec.

Messages made by the builders and the encoder validate against their schema; wrong
types do not. Hypothesis draws instances of every protocol class from strategies derived
from the classes themselves, checks that the converter round-trips them, and that what
the server would send validates against the schema of its message.
"""

from __future__ import annotations

import argparse
import enum
import functools
import json
import string
import types
import typing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import kaldrix
from kaldrix.cli import schema as schema_cli
from kaldrix.protocol import (
    COMMAND_PAYLOADS,
    EVENT_PAYLOADS,
    PARAMETER_PREFIXES,
    PUBLIC_CHANNELS,
    REPLY_PAYLOADS,
    Ack,
    AlertSeverity,
    Auth,
    ChannelPosition,
    Count,
    DagMetadata,
    DagUpdateType,
    DecimalAmount,
    Envelope,
    ErrorCode,
    ErrorPayload,
    MetricsResponse,
    NodeState,
    Ping,
    Pong,
    Publish,
    PublishedEvent,
    PublishResult,
    RequestMetrics,
    StreamPosition,
    Subscribe,
    Timestamp,
    Transaction,
    Unsubscribe,
    UserInfo,
    ValidatorEventType,
    ValidatorMetadata,
    Welcome,
    as_published,
    build_alert_triggered_message,
    build_dag_update_message,
    build_new_block_message,
    build_node_status_message,
    build_tx_received_message,
    build_validator_event_message,
    channels_for,
    converter,
    decode_command,
    encode,
    format_timestamp,
)
from kaldrix.protocol._asyncapi import generate_asyncapi
from kaldrix.protocol._jsonschema import DIALECT, generate_schemas, message_schema, schema_file_name

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "spec" / "schema"
SCHEMAS = generate_schemas()


@functools.cache
def validator(message_type: str) -> Draft202012Validator:
    return Draft202012Validator(SCHEMAS[schema_file_name(message_type)])


def wire(frame: bytes) -> dict[str, Any]:
    return orjson.loads(frame)


def error_paths(message_type: str, instance: Any) -> set[str]:
    """Dotted paths of every failure, nested ones (inside anyOf, if/then) included."""
    paths: set[str] = set()
    pending = list(validator(message_type).iter_errors(instance))
    while pending:
        error = pending.pop()
        paths.add(".".join(str(part) for part in error.absolute_path))
        pending.extend(error.context or ())
    return paths


def resolve_pointer(document: Any, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in all_refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in all_refs(item)]
    return []


# -- the checked-in files ---------------------------------------------------------------


def test_checked_in_schemas_are_up_to_date() -> None:
    stale = schema_cli.differences(SCHEMA_DIR, schema_cli.render())
    assert not stale, f"spec/schema is out of date ({', '.join(stale)}): run `python -m kaldrix schema`"


def test_one_schema_per_message_type() -> None:
    expected = {*EVENT_PAYLOADS, *COMMAND_PAYLOADS, *REPLY_PAYLOADS}
    assert set(SCHEMAS) == {schema_file_name(str(t)) for t in expected}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schema_is_a_valid_json_schema(name: str) -> None:
    schema = SCHEMAS[name]
    assert schema["$schema"] == DIALECT
    Draft202012Validator.check_schema(schema)
    for ref in all_refs(schema):
        assert resolve_pointer(schema, ref) is not None


def test_descriptions_come_from_docstrings() -> None:
    defs = SCHEMAS["PUBLISH.schema.json"]["$defs"]
    assert defs["NewBlock"]["description"] == "NEW_BLOCK: a block was added to the chain."
    assert defs["Timestamp"]["description"].startswith("An RFC 3339 date-time")
    assert SCHEMAS["PING.schema.json"]["description"].startswith(Ping.__doc__)

    @attrs.frozen
    class Documented:
        """A class of this test."""

        size: Count
        """How big it is."""

    schema = message_schema("reply", "DOCUMENTED", Documented)
    assert schema["$defs"]["Documented"]["description"] == "A class of this test."
    assert schema["$defs"]["Documented"]["properties"]["size"]["description"] == "How big it is."


def test_generation_is_deterministic() -> None:
    assert schema_cli.render() == schema_cli.render()
    assert json.dumps(generate_schemas()) == json.dumps(SCHEMAS)


# -- built and encoded messages ---------------------------------------------------------

T = "2025-08-07T10:00:00Z"
TX = Transaction(tx_id="0xtx", from_="0xa", to="0xb", amount="12.5", timestamp=T, gas_limit=21000)

BUILT_EVENTS = [
    build_new_block_message(block_id="b1", height=7, hash="0xh", transactions=[TX], gas_used=21000),
    build_dag_update_message(update_type=DagUpdateType.NODE_ADDED, node_id="n1", metadata=DagMetadata(weight=0.5, layer=2)),
    build_validator_event_message(event_type=ValidatorEventType.SLASHED, validator_id="v1", penalty="3", metadata=ValidatorMetadata(uptime=97.5)),
    build_tx_received_message(tx_id="0xtx", from_="0xa", to="0xb", amount="1000", nonce=3),
    build_node_status_message(node_id="node-7", status=NodeState.ONLINE, peers=12, cpu_usage=3.5),
    build_alert_triggered_message(type="HIGH_LATENCY", severity=AlertSeverity.CRITICAL, message="p99 above 50 ms", metadata={"p99": 51.2}),
]


def delivered(message: Envelope) -> Envelope:
    """An event as the gateway delivers it: on a channel, with its offset and epoch."""
    channel = channels_for(message.type, message.payload)[0]
    return attrs.evolve(message, channel=channel, offset=1, epoch="e-1")


@pytest.mark.parametrize("message", BUILT_EVENTS, ids=lambda m: m.type)
def test_built_events_validate_as_delivered_events(message: Envelope) -> None:
    validator(message.type).validate(wire(delivered(message).encode()))


@pytest.mark.parametrize("message", BUILT_EVENTS, ids=lambda m: m.type)
def test_an_event_without_channel_offset_and_epoch_is_not_a_delivered_event(message: Envelope) -> None:
    assert error_paths(message.type, wire(message.encode())) == {""}


COMMANDS = [
    ("AUTH", Auth(token="t0k3n")),
    ("SUBSCRIBE", Subscribe(channels=["blocks", "address:0xa"], since={"blocks": StreamPosition(offset=4, epoch="e-1")})),
    ("UNSUBSCRIBE", Unsubscribe(channels=["validator:v1"])),
    ("PUBLISH", Publish(event=as_published(BUILT_EVENTS[0]))),
    ("PUBLISH", Publish(events=[as_published(m) for m in BUILT_EVENTS], channel="alerts")),
    ("PING", Ping(t=[1, {"x": None}])),
    ("REQUEST_METRICS", RequestMetrics()),
]


@pytest.mark.parametrize(("message_type", "payload"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_encoded_commands_validate_and_decode(message_type: str, payload: Any) -> None:
    frame = encode(message_type, payload)
    validator(message_type).validate(wire(frame))
    assert decode_command(frame.decode()).payload == payload


REPLIES = [
    ("WELCOME", Welcome(session_id="s1", server_version="0.1.0", protocol_version="1.0.0", heartbeat_interval=30, authenticated=False)),
    ("WELCOME", Welcome(session_id="s1", server_version="0.1.0", protocol_version="1.0.0", heartbeat_interval=30,
                        authenticated=True, user=UserInfo(sub="alice", role="user"))),
    ("ACK", Ack(ref="c1", channels={"blocks": ChannelPosition(offset=9, epoch="e-1", recovered=True, replayed=5)})),
    ("ACK", Ack(ref="p1", results=[PublishResult(id="evt-1", offsets={"blocks": 10})])),
    ("ACK", Ack(ref=None)),
    ("ERROR", ErrorPayload(code=ErrorCode.INVALID_PAYLOAD, message="expected an integer", ref="p1", path="payload.event.payload.height")),
    ("PONG", Pong(server_time=T, t=12345)),
    ("METRICS_RESPONSE", MetricsResponse(type="all", metrics={"connections": 3, "latency": {"p99": 1.5}})),
]


@pytest.mark.parametrize(("message_type", "payload"), REPLIES, ids=[r[0] for r in REPLIES])
def test_encoded_replies_validate(message_type: str, payload: Any) -> None:
    validator(message_type).validate(wire(encode(message_type, payload)))


def _set(document: Any, path: str, value: Any) -> Any:
    """A copy of `document` with the dotted `path` set to `value` (or removed, for ...)."""
    document = json.loads(json.dumps(document))
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    node = document
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return document


NEW_BLOCK = wire(delivered(BUILT_EVENTS[0]).encode())
TX_RECEIVED = wire(delivered(BUILT_EVENTS[3]).encode())
NODE_STATUS = wire(delivered(BUILT_EVENTS[4]).encode())
ACK = wire(encode(*REPLIES[2]))
WELCOME = wire(encode(*REPLIES[0]))
ERROR = wire(encode(*REPLIES[5]))
SUBSCRIBE = wire(encode(*COMMANDS[1]))
PUBLISH = wire(encode(*COMMANDS[3]))
AUTH = wire(encode(*COMMANDS[0]))

INVALID = [
    ("height-string", NEW_BLOCK, "payload.height", "7", "payload.height"),
    ("height-bool", NEW_BLOCK, "payload.height", True, "payload.height"),
    ("height-negative", NEW_BLOCK, "payload.height", -1, "payload.height"),
    ("nested-amount-number", NEW_BLOCK, "payload.transactions.0.amount", 12.5, "payload.transactions.0.amount"),
    ("output-default-missing", NEW_BLOCK, "payload.transactions.0.status", ..., "payload.transactions.0"),
    ("offset-zero", NEW_BLOCK, "offset", 0, "offset"),
    ("bad-channel", NEW_BLOCK, "channel", "block", "channel"),
    ("version-2", NEW_BLOCK, "version", "2.0.0", "version"),
    ("other-type", NEW_BLOCK, "type", "DAG_UPDATE", "type"),
    ("bad-timestamp", NEW_BLOCK, "timestamp", "now", "timestamp"),
    ("bad-enum", TX_RECEIVED, "payload.status", "done", "payload.status"),
    ("amount-exponent", TX_RECEIVED, "payload.amount", "1e3", "payload.amount"),
    ("number-as-string", NODE_STATUS, "payload.cpuUsage", "3.5", "payload.cpuUsage"),
    ("reply-bool-as-string", ACK, "payload.channels.blocks.recovered", "yes", "payload.channels.blocks.recovered"),
    ("reply-int-as-string", WELCOME, "payload.heartbeatInterval", "30", "payload.heartbeatInterval"),
    ("reply-unknown-code", ERROR, "payload.code", "OOPS", "payload.code"),
    ("reply-missing-id", ERROR, "id", ..., ""),
    ("command-empty-channels", SUBSCRIBE, "payload.channels", [], "payload.channels"),
    ("command-offset-string", SUBSCRIBE, "payload.since.blocks.offset", "4", "payload.since.blocks.offset"),
    ("command-event-field", PUBLISH, "payload.event.payload.height", "7", "payload.event.payload.height"),
    ("command-event-type", PUBLISH, "payload.event.type", "NEW_BLOCKS", "payload.event.type"),
    ("command-token-number", AUTH, "payload.token", 5, "payload.token"),
    ("command-id-number", AUTH, "id", 5, "id"),
]


@pytest.mark.parametrize(("message", "path", "value", "where"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_wrong_values_fail_validation_where_they_are(message: dict[str, Any], path: str, value: Any, where: str) -> None:
    assert not error_paths(message["type"], message), "the unchanged message is valid"
    assert where in error_paths(message["type"], _set(message, path, value))


def test_commands_may_leave_out_defaulted_fields_that_the_server_always_sends() -> None:
    command = _set(PUBLISH, "payload.event.payload.transactions", [{"txId": "x", "from": "a", "to": "b", "amount": "1", "timestamp": T}])
    assert not error_paths("PUBLISH", command)
    event = _set(NEW_BLOCK, "payload.transactions", ...)
    assert error_paths("NEW_BLOCK", event) == {"payload"}


# -- hypothesis: strategies derived from the classes --------------------------------------

JSON_INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
JSON_FLOAT = st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | JSON_INT | JSON_FLOAT | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_OFFSETS = st.integers(min_value=-23 * 60 + 1, max_value=23 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
_MOMENTS = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(UTC) | _OFFSETS)
TIMESTAMPS = st.one_of(
    _MOMENTS.map(format_timestamp),
    _MOMENTS.map(lambda moment: moment.isoformat(timespec="seconds")),
    _MOMENTS.map(lambda moment: moment.isoformat(timespec="milliseconds")),
).map(Timestamp)
DECIMALS = st.builds(
    lambda whole, fraction: DecimalAmount(f"{whole}.{fraction}" if fraction else str(whole)),
    st.integers(min_value=0, max_value=10**30),
    st.none() | st.text("0123456789", min_size=1, max_size=18),
)
CHANNELS = st.one_of(
    st.sampled_from(sorted(PUBLIC_CHANNELS)),
    st.builds("{}:{}".format, st.sampled_from(sorted(PARAMETER_PREFIXES)), st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=12)),
    st.text(max_size=12),
)

FIELD_STRATEGIES: dict[tuple[type, str], st.SearchStrategy[Any]] = {
    (Subscribe, "channels"): st.lists(CHANNELS, max_size=3),
    (Subscribe, "since"): st.none() | st.dictionaries(CHANNELS, st.builds(StreamPosition, offset=st.integers(0, 2**63), epoch=st.text(max_size=6)), max_size=2),
    (Unsubscribe, "channels"): st.lists(CHANNELS, max_size=3),
    (Publish, "channel"): st.none() | CHANNELS,
}
"""Channel names: mostly valid ones, so that commands are not all refused for them."""


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """A strategy for values of `hint`, as the protocol's classes declare them."""
    origin = get_origin(hint)
    if hint is Any:
        return JSON_VALUES
    if hint is Timestamp:
        return TIMESTAMPS
    if hint is DecimalAmount:
        return DECIMALS
    if hint is Count:
        return st.integers(min_value=0, max_value=2**64 - 1).map(Count)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from(list(hint))
    if hint in (str, int, float, bool):
        return {str: st.text(max_size=12), int: JSON_INT, float: JSON_FLOAT, bool: st.booleans()}[hint]
    if hint is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of([strategy_for(arg) for arg in get_args(hint)])
    if origin is list:
        return st.lists(strategy_for(get_args(hint)[0]), max_size=3)
    if origin is dict:
        key, value = get_args(hint)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=3)
    if hint is PublishedEvent:  # its payload's class follows its type
        return st.sampled_from(list(EVENT_PAYLOADS.items())).flatmap(
            lambda item: st.builds(PublishedEvent, type=st.just(item[0]), payload=strategy_for(item[1]),
                                   id=st.none() | st.text(max_size=8))
        )
    if isinstance(hint, type) and attrs.has(hint):
        return st.builds(hint, **{
            field.alias: FIELD_STRATEGIES[(hint, field.name)]
            if (hint, field.name) in FIELD_STRATEGIES
            else strategy_for(resolved)
            for field, resolved in _fields(hint)
        })
    raise TypeError(f"no strategy for {hint!r}")


def _fields(cls: type) -> list[tuple[attrs.Attribute, Any]]:
    hints = typing.get_type_hints(cls)
    return [(field, hints[field.name]) for field in attrs.fields(cls)]


def _message_classes() -> list[type]:
    """Every attrs class of the wire format, nested ones included."""
    found: dict[str, type] = {}

    def visit(hint: Any) -> None:
        for arg in get_args(hint):
            visit(arg)
        if isinstance(hint, type) and attrs.has(hint) and hint.__name__ not in found:
            found[hint.__name__] = hint
            for field, resolved in _fields(hint):
                if not (hint is PublishedEvent and field.name == "payload"):
                    visit(resolved)

    for cls in [*EVENT_PAYLOADS.values(), *COMMAND_PAYLOADS.values(), *REPLY_PAYLOADS.values()]:
        visit(cls)
    return [found[name] for name in sorted(found)]


MESSAGE_CLASSES = _message_classes()
PROPERTY = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_nested_class_is_covered() -> None:
    names = {cls.__name__ for cls in MESSAGE_CLASSES}
    assert {"Transaction", "DagMetadata", "ValidatorMetadata", "StreamPosition", "PublishedEvent",
            "ChannelPosition", "PublishResult", "UserInfo"} <= names


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda cls: cls.__name__)
@PROPERTY
@given(data=st.data())
def test_converter_round_trips_every_class(cls: type, data: st.DataObject) -> None:
    message = data.draw(strategy_for(cls))
    assert converter.structure(converter.unstructure(message), cls) == message
    wired = orjson.loads(orjson.dumps(converter.unstructure(message)))
    assert converter.structure(wired, cls) == message


SENT = [*((str(t), cls, True) for t, cls in EVENT_PAYLOADS.items()), *((str(t), cls, False) for t, cls in REPLY_PAYLOADS.items())]


@pytest.mark.parametrize(("message_type", "cls", "is_event"), SENT, ids=[s[0] for s in SENT])
@PROPERTY
@given(data=st.data())
def test_what_the_server_sends_validates(message_type: str, cls: type, is_event: bool, data: st.DataObject) -> None:
    message = Envelope(message_type, data.draw(strategy_for(cls)))
    if is_event:
        message = attrs.evolve(message, channel=data.draw(CHANNELS.filter(lambda c: ":" in c or c in PUBLIC_CHANNELS)),
                               offset=data.draw(st.integers(1, 2**63)), epoch=data.draw(st.text(max_size=6)))
        if error_paths(message_type, wire(message.encode())) == {"channel"}:
            return  # the drawn parameter channel was not a valid name
    validator(message_type).validate(wire(message.encode()))


@pytest.mark.parametrize("command", list(COMMAND_PAYLOADS), ids=str)
@PROPERTY
@given(data=st.data())
def test_command_schema_and_codec_agree(command: str, data: st.DataObject) -> None:
    payload = data.draw(strategy_for(COMMAND_PAYLOADS[command]))
    frame = encode(str(command), payload)
    accepted = not isinstance(decode_command(frame.decode()), Exception)
    valid = not error_paths(str(command), wire(frame))
    since_beyond_channels = isinstance(payload, Subscribe) and not set(payload.since or ()) <= set(payload.channels)
    if since_beyond_channels:  # a rule JSON Schema cannot state; the codec is stricter here
        assert not accepted
    else:
        assert accepted == valid


# -- the AsyncAPI document ----------------------------------------------------------------


def test_asyncapi_document_describes_the_websocket_api() -> None:
    document = generate_asyncapi()
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["version"] == kaldrix.__version__
    assert document["servers"]["local"] == {**document["servers"]["local"], "host": "127.0.0.1:3000", "protocol": "ws"}
    assert document["channels"]["ws"]["address"] == "/ws"
    operations = document["operations"]
    received = {ref["$ref"].rsplit("/", 1)[1] for op in operations.values() if op["action"] == "receive" for ref in op["messages"]}
    sent = {ref["$ref"].rsplit("/", 1)[1] for op in operations.values() if op["action"] == "send" for ref in op["messages"]}
    assert received == {str(t) for t in COMMAND_PAYLOADS}
    assert sent == {str(t) for t in [*REPLY_PAYLOADS, *EVENT_PAYLOADS]}
    for ref in all_refs(document):
        assert resolve_pointer(document, ref) is not None, ref


def test_asyncapi_message_payloads_validate_real_messages() -> None:
    document = generate_asyncapi()

    def valid(message_type: str, instance: Any) -> bool:
        payload_ref = document["components"]["messages"][message_type]["payload"]["$ref"]
        return Draft202012Validator({**document, "$ref": payload_ref}).is_valid(instance)

    for message in BUILT_EVENTS:
        assert valid(message.type, wire(delivered(message).encode()))
        assert not valid(message.type, wire(message.encode()))
    for message_type, payload in [*COMMANDS, *REPLIES]:
        assert valid(message_type, wire(encode(message_type, payload)))
    assert not valid("PUBLISH", _set(PUBLISH, "payload.event.payload.height", "7"))


# -- the command ----------------------------------------------------------------------------


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    schema_cli.configure(parser)
    return schema_cli.run(parser.parse_args(list(argv)))


def test_schema_command_writes_then_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schema"
    assert _run("--check", "--out", str(out)) == 1
    assert _run("--out", str(out)) == 0
    files = schema_cli.render()
    assert {path.name for path in out.iterdir()} == set(files) and "asyncapi.json" in files
    for name, text in files.items():
        assert (out / name).read_text(encoding="utf-8") == text and text.endswith("}\n")
    assert _run("--check", "--out", str(out)) == 0

    (out / "PING.schema.json").write_text("{}\n", encoding="utf-8")
    (out / "GONE.schema.json").write_text("{}\n", encoding="utf-8")
    capsys.readouterr()
    assert _run("--check", "--out", str(out)) == 1
    complaint = capsys.readouterr().err
    assert "PING.schema.json" in complaint and "GONE.schema.json" in complaint and "python -m kaldrix schema" in complaint
    assert _run("--out", str(out)) == 0
    assert not (out / "GONE.schema.json").exists()
    assert _run("--check", "--out", str(out)) == 0
    assert schema_cli.__doc__
