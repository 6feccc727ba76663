"""The one cattrs converter that defines the wire form of every message.

Python field names are snake_case; the wire is camelCase, as in the seed. Structuring
is strict: no silent coercion of ``"5"`` to ``5`` or of ``"abc"`` to a list of
characters, and every failure carries the path of the field that failed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, ClassValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._control import PublishedEvent
from ._events import EVENT_PAYLOADS
from ._types import (
    Count,
    DecimalAmount,
    EventType,
    Timestamp,
    check_count,
    check_decimal,
    check_timestamp,
)


def wire_name(field_name: str) -> str:
    """snake_case (with a trailing ``_`` for keywords) to the seed's camelCase."""
    head, *rest = field_name.rstrip("_").split("_")
    return head + "".join(part.capitalize() for part in rest)


def _expect(kind: type | tuple[type, ...], label: str) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"expected {label}")
        return value

    return structure


def _structure_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected a boolean")
    return value


def _structure_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    return float(value)


def _structure_enum(value: Any, cls: type[enum.Enum]) -> enum.Enum:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(str(member.value) for member in cls)
        raise ValueError(f"expected one of {choices}") from None


def _wire_enums() -> list[type[enum.Enum]]:
    from . import _errors, _types

    return [
        value
        for module in (_types, _errors)
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, enum.Enum) and value.__module__ == module.__name__
    ]


def _is_list(cls: Any) -> bool:
    return get_origin(cls) is list


def _is_dict(cls: Any) -> bool:
    return get_origin(cls) is dict


def _is_record(cls: Any) -> bool:
    return isinstance(cls, type) and attrs.has(cls) and cls is not PublishedEvent


def _optional_none_fields(cls: type) -> dict[str, Any]:
    return {
        a.name: override(rename=wire_name(a.name), omit_if_default=a.default is None)
        for a in attrs.fields(cls)
    }


def _rename_notes(group: ClassValidationError) -> None:
    """Make failure paths name wire fields (``txId``) rather than Python ones."""
    for exc in group.exceptions:
        exc.__notes__ = [
            AttributeValidationNote(str(note), wire_name(note.name), note.type)
            if isinstance(note, AttributeValidationNote)
            else note
            for note in getattr(exc, "__notes__", [])
        ]


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)

    # Class registrations also match subclasses (StrEnum); each enum gets its own below.
    conv.register_structure_hook(str, _expect(str, "a string"))
    conv.register_structure_hook(int, _expect(int, "an integer"))
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(Timestamp, lambda v, _: check_timestamp(v))
    conv.register_structure_hook(DecimalAmount, lambda v, _: check_decimal(v))
    conv.register_structure_hook(Count, lambda v, _: check_count(v))
    # Each enum by its own class: they subclass str, whose default hooks would win.
    for enum_cls in _wire_enums():
        conv.register_structure_hook(enum_cls, _structure_enum)
        conv.register_unstructure_hook(enum_cls, lambda member: member.value)

    def list_factory(cls: Any) -> Callable[[Any, Any], Any]:
        (item,) = get_args(cls) or (Any,)

        def structure(value: Any, _: Any) -> list[Any]:
            if not isinstance(value, list):
                raise TypeError("expected an array")
            errors: list[Exception] = []
            out: list[Any] = []
            for index, element in enumerate(value):
                try:
                    out.append(conv.structure(element, item))
                except Exception as exc:  # noqa: BLE001 - collected and re-raised as a group
                    exc.add_note(cattrs.errors.IterableValidationNote(
                        f"Structuring {cls} @ index {index}", index, item))
                    errors.append(exc)
            if errors:
                raise cattrs.IterableValidationError("While structuring a list", errors, cls)
            return out

        return structure

    def dict_factory(cls: Any) -> Callable[[Any, Any], Any]:
        key_type, value_type = get_args(cls) or (str, Any)

        def structure(value: Any, _: Any) -> dict[Any, Any]:
            if not isinstance(value, Mapping):
                raise TypeError("expected an object")
            errors: list[Exception] = []
            out: dict[Any, Any] = {}
            for key, element in value.items():
                try:
                    out[conv.structure(key, key_type)] = conv.structure(element, value_type)
                except Exception as exc:  # noqa: BLE001 - collected and re-raised as a group
                    exc.add_note(AttributeValidationNote(f"Structuring key {key}", key, value_type))
                    errors.append(exc)
            if errors:
                raise ClassValidationError("While structuring a mapping", errors, cls)
            return out

        return structure

    def record_factory(cls: type) -> Callable[[Any, Any], Any]:
        generated = make_dict_structure_fn(cls, conv, **_optional_none_fields(cls))

        def structure(value: Any, _: Any) -> Any:
            if not isinstance(value, Mapping):
                raise TypeError("expected an object")
            try:
                return generated(value, cls)
            except ClassValidationError as group:
                _rename_notes(group)
                raise

        return structure

    conv.register_structure_hook_factory(_is_list, list_factory)
    conv.register_structure_hook_factory(_is_dict, dict_factory)
    conv.register_structure_hook_factory(_is_record, record_factory)
    conv.register_unstructure_hook_factory(
        _is_record, lambda cls: make_dict_unstructure_fn(cls, conv, **_optional_none_fields(cls))
    )

    def structure_published(value: Any, _: Any) -> PublishedEvent:
        if not isinstance(value, Mapping):
            raise TypeError("expected an object")
        errors: list[Exception] = []
        event_type = payload = event_id = None
        for name, kind in (("type", EventType), ("id", str | None)):
            try:
                if name == "type" and "type" not in value:
                    raise KeyError("type")
                structured = conv.structure(value.get(name), kind)
            except Exception as exc:  # noqa: BLE001 - collected and re-raised as a group
                exc.add_note(AttributeValidationNote(f"Structuring {name}", name, kind))
                errors.append(exc)
            else:
                if name == "type":
                    event_type = structured
                else:
                    event_id = structured
        if event_type is not None:
            payload_cls = EVENT_PAYLOADS[event_type]
            try:
                if "payload" not in value:
                    raise KeyError("payload")
                payload = conv.structure(value["payload"], payload_cls)
            except Exception as exc:  # noqa: BLE001 - collected and re-raised as a group
                exc.add_note(AttributeValidationNote("Structuring payload", "payload", payload_cls))
                errors.append(exc)
        if errors:
            raise ClassValidationError("While structuring an event", errors, PublishedEvent)
        return PublishedEvent(type=event_type, payload=payload, id=event_id)

    def unstructure_published(event: PublishedEvent) -> dict[str, Any]:
        out = {"type": event.type.value, "payload": conv.unstructure(event.payload)}
        if event.id is not None:
            out["id"] = event.id
        return out

    conv.register_structure_hook(PublishedEvent, structure_published)
    conv.register_unstructure_hook(PublishedEvent, unstructure_published)
    return conv


converter: cattrs.Converter = _make_converter()
"""Structures wire dicts into the protocol's attrs classes and back."""


def describe_failure(exc: BaseException, path: str = "payload") -> tuple[str, str]:
    """The first failure inside a cattrs error as (field path, human message)."""
    lines = cattrs.transform_error(exc, path=path, format_exception=_format_exception)
    message, _, where = lines[0].rpartition(" @ ")
    return where, message


def _format_exception(exc: BaseException, _type: type | None) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, TypeError | ValueError) and str(exc):
        text = str(exc)
        if text.startswith(("expected", "must", "Length of")):
            return text.replace("Length of", "length of")
        if text.startswith("'") and "must be >=" in text:
            return "must be " + text.split("must be ", 1)[1].split(":", 1)[0]
        return text
    return f"invalid value ({type(exc).__name__})"
