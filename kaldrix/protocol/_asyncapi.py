"""The AsyncAPI 3.0.0 document of the WebSocket API, built from the generated schemas.

Operations are seen from the gateway: it *receives* the clients' commands and *sends*
replies and events, all on the one channel ``/ws``. Each message's payload is the
whole frame (the envelope), whose schema is embedded under ``components/schemas``.
"""

from __future__ import annotations

from typing import Any

from ._jsonschema import Kind, message_kinds, message_schema

_SERVER = {"host": "127.0.0.1:3000", "protocol": "ws", "description": "A gateway on its default port."}

_OPERATIONS: dict[str, tuple[str, Kind, str]] = {
    "receiveCommands": ("receive", "command", "Commands a client sends; each is answered with a reply carrying its id as `ref`."),
    "sendReplies": ("send", "reply", "WELCOME on connect, then the answers to commands (ACK, ERROR, PONG, METRICS_RESPONSE), and HEARTBEAT on quiet channels."),
    "sendEvents": ("send", "event", "Chain events delivered on the channels a client subscribed to, in order per channel."),
}


def _embedded(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` placed at components/schemas/`name`: its `#/$defs/` refs made absolute."""
    prefix = f"#/components/schemas/{name}/$defs/"

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: (value.replace("#/$defs/", prefix, 1) if key == "$ref" and isinstance(value, str) else rewrite(value))
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    return rewrite({key: value for key, value in schema.items() if key != "$schema"})


def generate_asyncapi() -> dict[str, Any]:
    """The AsyncAPI document (a JSON-ready dict)."""
    from kaldrix import __version__

    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    by_kind: dict[Kind, list[str]] = {"command": [], "reply": [], "event": []}
    for kind, message_type, payload_cls in message_kinds():
        schema = message_schema(kind, message_type, payload_cls)
        schemas[message_type] = _embedded(message_type, schema)
        messages[message_type] = {
            "name": message_type,
            "title": schema["title"],
            "summary": schema["description"].split("\n", 1)[0],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{message_type}"},
        }
        by_kind[kind].append(message_type)

    def refs(names: list[str], base: str) -> list[dict[str, str]]:
        return [{"$ref": f"{base}/{name}"} for name in names]

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "kaldrix",
            "version": __version__,
            "description": (
                "The real-time event gateway of the KALDRIX chain: one JSON object per WebSocket "
                "text frame, in both directions. Message schemas are JSON Schema draft 2020-12, "
                "generated from the protocol's classes (spec/schema holds them one file per message)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"local": _SERVER},
        "channels": {
            "ws": {
                "address": "/ws",
                "title": "WebSocket endpoint",
                "servers": [{"$ref": "#/servers/local"}],
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": {
            operation: {
                "action": action,
                "channel": {"$ref": "#/channels/ws"},
                "summary": summary,
                "messages": refs(by_kind[kind], "#/channels/ws/messages"),
            }
            for operation, (action, kind, summary) in _OPERATIONS.items()
        },
        "components": {"schemas": schemas, "messages": messages},
    }
