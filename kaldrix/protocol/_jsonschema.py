"""JSON Schemas (draft 2020-12) of every message, generated from the attrs classes.

The classes and the converter define the wire; this module only reads them (fields,
type hints, defaults, docstrings), so the schemas in ``spec/schema`` cannot drift from
what the codec accepts and sends. The few rules the codec checks beyond the classes'
types (channel names, non-empty lists, one of ``event``/``events``) are stated below as
refinements of the real field types, and each is checked against the field it refines.

Direction matters for defaults: a client may leave out any defaulted field, while the
server always writes a field whose default is not None. So a command's schema makes
such fields optional and a reply's or an event's makes them required.
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import itertools
import sys
import types
import typing
from typing import Annotated, Any, Literal, NewType, Union, get_args, get_origin

import attrs

from ._channels import _PARAMETER, MAX_CHANNEL_LENGTH, PARAMETER_PREFIXES, PUBLIC_CHANNELS
from ._codec import Envelope
from ._control import (
    COMMAND_PAYLOADS,
    REPLY_PAYLOADS,
    Publish,
    PublishedEvent,
    StreamPosition,
    Subscribe,
    Unsubscribe,
)
from ._converter import wire_name
from ._events import EVENT_PAYLOADS
from ._types import _DECIMAL, _RFC3339, PROTOCOL_VERSION, Count, DecimalAmount, Timestamp

DIALECT = "https://json-schema.org/draft/2020-12/schema"

Kind = Literal["event", "command", "reply"]

Channel = NewType("Channel", str)
"""A channel name: one of the public channels, or ``<prefix>:<id>``."""

_MIN_ONE = ("minItems", 1)

# Rules the codec checks beyond the field types (see _codec._check_channels), written as
# refinements of those types; `_refined_hint` insists each still matches its field.
_REFINED: dict[tuple[type, str], Any] = {
    (Subscribe, "channels"): Annotated[list[Channel], _MIN_ONE],
    (Subscribe, "since"): dict[Channel, StreamPosition] | None,
    (Unsubscribe, "channels"): Annotated[list[Channel], _MIN_ONE],
    (Publish, "events"): Annotated[list[PublishedEvent], _MIN_ONE] | None,
    (Publish, "channel"): Channel | None,
    (Envelope, "version"): Annotated[str, ("pattern", r"^1\."), ("examples", [PROTOCOL_VERSION])],
    (Envelope, "channel"): Channel | None,
    (Envelope, "offset"): Annotated[int, ("minimum", 1)] | None,
}

_CLASS_RULES: dict[type, dict[str, Any]] = {
    Publish: {
        "oneOf": [
            {"required": ["event"], "properties": {"event": {"type": "object"}}},
            {"required": ["events"], "properties": {"events": {"type": "array"}}},
        ],
    },
}

_ENVELOPE_NOTES = {
    "type": "The message type.",
    "payload": "The message body; its form depends on `type`.",
    "timestamp": "When the message was sent; on a delivered event, when the gateway accepted it.",
    "id": "The message id; the reply to a command carries the command's id as `ref`.",
    "version": "The protocol version (1.x).",
    "channel": "The channel this event was delivered on.",
    "offset": "The event's position in its channel: gap-free, starting at 1.",
    "epoch": "The channel's history epoch; it changes when that history is lost.",
}

_ENVELOPE_FIELDS: dict[Kind, tuple[str, ...]] = {
    "event": ("type", "payload", "timestamp", "id", "version", "channel", "offset", "epoch"),
    "reply": ("type", "payload", "timestamp", "id", "version"),
    "command": ("type", "payload", "timestamp", "id", "version"),
}


# -- docstrings -----------------------------------------------------------------------


@functools.cache
def _module_tree(module_name: str) -> ast.Module:
    return ast.parse(inspect.getsource(sys.modules[module_name]))


def _attribute_docs(body: list[ast.stmt]) -> dict[str, str]:
    """Docstrings written under assignments (``name: T`` then a string literal)."""
    docs: dict[str, str] = {}
    for statement, following in itertools.pairwise(body):
        target = None
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            target = statement.target.id
        elif isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            if isinstance(statement.targets[0], ast.Name):
                target = statement.targets[0].id
        if (
            target
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[target] = inspect.cleandoc(following.value.value)
    return docs


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for node in ast.walk(_module_tree(klass.__module__)):
            if isinstance(node, ast.ClassDef) and node.name == klass.__name__:
                docs.update(_attribute_docs(node.body))
    return docs


def _module_doc(module_name: str, name: str) -> str | None:
    return _attribute_docs(_module_tree(module_name).body).get(name)


def _class_doc(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else None


def _describe(schema: dict[str, Any], doc: str | None) -> dict[str, Any]:
    if doc:
        schema["description"] = doc
    return schema


# -- type hints -----------------------------------------------------------------------


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _without_none(hint: Any) -> Any:
    if not _is_union(hint):
        return hint
    rest = [arg for arg in get_args(hint) if arg is not type(None)]
    return functools.reduce(lambda a, b: a | b, rest)


def _erase(hint: Any) -> Any:
    """A refined hint back in the terms of the class (Channel -> str, no Annotated)."""
    if hint is Channel:
        return str
    origin = get_origin(hint)
    if origin is Annotated:
        return _erase(get_args(hint)[0])
    if _is_union(hint):
        return functools.reduce(lambda a, b: a | b, [_erase(arg) for arg in get_args(hint)])
    if origin in (list, dict):
        return origin[tuple(_erase(arg) for arg in get_args(hint))]
    return hint


def _refined_hint(cls: type, field: str, hint: Any) -> Any:
    refined = _REFINED.get((cls, field))
    if refined is None:
        return hint
    if _erase(refined) != hint:
        raise TypeError(f"the schema refinement of {cls.__name__}.{field} no longer matches its type {hint}")
    return refined


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _default(field: attrs.Attribute) -> Any:
    default = field.default
    return default.factory() if isinstance(default, attrs.Factory) else default


# -- the walker -----------------------------------------------------------------------


@attrs.define
class _Walker:
    """Turns type hints into schemas, collecting named definitions in `defs`."""

    output: bool
    defs: dict[str, dict[str, Any]] = attrs.Factory(dict)

    def ref(self, name: str, build: typing.Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name not in self.defs:
            self.defs[name] = {}  # reserve the name first: definitions may refer to themselves
            self.defs[name] = build()
        return {"$ref": f"#/$defs/{name}"}

    def of(self, hint: Any) -> dict[str, Any]:
        origin = get_origin(hint)
        if hint is Any:
            return {}
        if origin is Annotated:
            base, *extras = get_args(hint)
            schema = dict(self.of(base))
            for key, value in extras:
                schema[key] = value
            return schema
        if isinstance(hint, NewType):
            return self.ref(hint.__name__, lambda: _describe(_newtype_schema(hint), _newtype_doc(hint)))
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return self.ref(hint.__name__, lambda: _enum_schema(hint))
        if hint in _PRIMITIVES:
            return {"type": _PRIMITIVES[hint]}
        if _is_union(hint):
            return self.union(get_args(hint))
        if origin is list:
            return {"type": "array", "items": self.of(get_args(hint)[0])}
        if origin is dict:
            key, value = get_args(hint)
            schema: dict[str, Any] = {"type": "object"}
            if key is not str:
                schema["propertyNames"] = self.of(key)
            if value is not Any:
                schema["additionalProperties"] = self.of(value)
            return schema
        if isinstance(hint, type) and attrs.has(hint):
            return self.ref(hint.__name__, lambda: self.record(hint))
        raise TypeError(f"no JSON Schema for {hint!r}")

    def union(self, members: tuple[Any, ...]) -> dict[str, Any]:
        schemas = [self.of(member) for member in members if member is not type(None)]
        nullable = type(None) in members
        if len(schemas) == 1 and nullable and _typed_only(schemas[0]):
            # keywords such as pattern or minItems apply only to their own type
            return {**schemas[0], "type": [schemas[0]["type"], "null"]}
        if nullable:
            schemas.append({"type": "null"})
        return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}

    def field(self, cls: type, field: attrs.Attribute, hint: Any) -> tuple[dict[str, Any], bool]:
        """The schema of one field and whether the field is required."""
        has_default = field.default is not attrs.NOTHING
        omitted_when_none = has_default and field.default is None
        if self.output and omitted_when_none:
            hint = _without_none(hint)  # written only when set, so never null
        schema = self.of(_refined_hint(cls, field.name, hint))
        required = not has_default or (self.output and not omitted_when_none)
        return schema, required

    def record(self, cls: type) -> dict[str, Any]:
        hints = _hints(cls)
        docs = _field_docs(cls)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in attrs.fields(cls):
            if cls is PublishedEvent and field.name == "payload":
                schema, is_required = {"type": "object"}, True  # see discriminated_payloads
            else:
                schema, is_required = self.field(cls, field, hints[field.name])
            name = wire_name(field.name)
            properties[name] = _describe(schema, docs.get(field.name))
            if is_required:
                required.append(name)
            if field.default is not attrs.NOTHING and field.default is not None:
                properties[name]["default"] = _json_default(_default(field))
        schema = {"type": "object", "properties": properties}
        if required:
            schema["required"] = sorted(required)
        if cls is PublishedEvent:
            schema["allOf"] = self.discriminated_payloads()
        schema.update(_CLASS_RULES.get(cls, {}))
        return _describe(schema, _class_doc(cls))

    def discriminated_payloads(self) -> list[dict[str, Any]]:
        """PublishedEvent's payload is the payload class of its `type` (a custom hook)."""
        return [
            {
                "if": {"properties": {"type": {"const": event_type.value}}, "required": ["type"]},
                "then": {"properties": {"payload": self.of(payload_cls)}},
            }
            for event_type, payload_cls in EVENT_PAYLOADS.items()
        ]


def _typed_only(schema: dict[str, Any]) -> bool:
    return isinstance(schema.get("type"), str) and not {"$ref", "anyOf", "oneOf", "enum", "const"} & set(schema)


_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _bare(pattern: str) -> str:
    """A Python regex without its anchors (``^``, ``$``, ``\\Z``)."""
    return pattern.removeprefix("^").removesuffix("$").removesuffix("\\Z")


def _newtype_schema(hint: Any) -> dict[str, Any]:
    # JSON Schema patterns are ECMA-262 regexes, unanchored: anchor the whole string.
    if hint is Timestamp:
        return {
            "type": "string",
            "format": "date-time",
            "pattern": f"^{_bare(_RFC3339.pattern)}$",
            "examples": ["2025-08-07T10:00:00Z"],
        }
    if hint is DecimalAmount:
        return {"type": "string", "pattern": f"^{_bare(_DECIMAL.pattern)}$", "examples": ["1000", "0.25"]}
    if hint is Count:
        return {"type": "integer", "minimum": 0}
    if hint is Channel:
        parameter = _bare(_PARAMETER.pattern)
        prefixes = "|".join(sorted(PARAMETER_PREFIXES))
        return {
            "type": "string",
            "maxLength": MAX_CHANNEL_LENGTH,
            "anyOf": [
                {"enum": sorted(PUBLIC_CHANNELS)},
                {"pattern": f"^({prefixes}):{parameter}$"},
            ],
        }
    raise TypeError(f"no JSON Schema for {hint!r}")


def _newtype_doc(hint: Any) -> str | None:
    return _module_doc(hint.__module__, hint.__name__)


def _enum_schema(cls: type[enum.Enum]) -> dict[str, Any]:
    return _describe({"type": "string", "enum": [member.value for member in cls]}, _class_doc(cls))


# -- documents ------------------------------------------------------------------------


def message_schema(kind: Kind, message_type: str, payload_cls: type) -> dict[str, Any]:
    """The schema of one message: the envelope with `type` fixed and its payload class."""
    walker = _Walker(output=kind != "command")
    hints = _hints(Envelope)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in attrs.fields(Envelope):
        if field.name not in _ENVELOPE_FIELDS[kind]:
            continue
        name = wire_name(field.name)
        if field.name == "type":
            schema: dict[str, Any] = {"const": message_type}
        elif field.name == "payload":
            schema = walker.of(payload_cls)
        else:
            schema = walker.of(_without_none(_refined_hint(Envelope, field.name, hints[field.name])))
        properties[name] = _describe(schema, _ENVELOPE_NOTES.get(field.name))
        if kind != "command" or field.name == "type":
            required.append(name)
        elif field.name == "payload" and _needs_payload(payload_cls):
            required.append(name)
    direction = {"event": "server to subscriber", "command": "client to server", "reply": "server to client"}[kind]
    summary = _class_doc(payload_cls) or message_type
    document: dict[str, Any] = {
        "$schema": DIALECT,
        "title": f"{message_type} ({kind})",
        "description": f"{summary}\n\nDirection: {direction}.",
        "type": "object",
        "properties": properties,
        "required": sorted(required),
    }
    if walker.defs:
        document["$defs"] = dict(sorted(walker.defs.items()))
    return document


def _needs_payload(cls: type) -> bool:
    """Whether `{}` is not a valid payload (the codec reads a missing payload as `{}`)."""
    return any(field.default is attrs.NOTHING for field in attrs.fields(cls))


def message_kinds() -> list[tuple[Kind, str, type]]:
    """Every message of the protocol as (kind, type, payload class), in a stable order."""
    return [
        *(("event", str(t), cls) for t, cls in EVENT_PAYLOADS.items()),
        *(("command", str(t), cls) for t, cls in COMMAND_PAYLOADS.items()),
        *(("reply", str(t), cls) for t, cls in REPLY_PAYLOADS.items()),
    ]


def schema_file_name(message_type: str) -> str:
    return f"{message_type}.schema.json"


def generate_schemas() -> dict[str, dict[str, Any]]:
    """Every message schema by file name (``NEW_BLOCK.schema.json`` ...)."""
    return {
        schema_file_name(message_type): message_schema(kind, message_type, cls)
        for kind, message_type, cls in message_kinds()
    }


__all__ = [
    "DIALECT", "Channel", "Kind", "generate_schemas", "message_kinds",
    "message_schema", "schema_file_name",
]
