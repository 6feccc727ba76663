"""The kaldrix wire protocol v1: attrs classes, one cattrs converter, a codec that never raises.

This package does no I/O; the server, the client and the conformance runner all use it,
and ``spec/schema`` is generated from it.
"""

from ._builders import (
    as_published,
    build_alert_triggered_message,
    build_dag_update_message,
    build_event,
    build_new_block_message,
    build_node_status_message,
    build_tx_received_message,
    build_validator_event_message,
)
from ._channels import (
    MAX_CHANNEL_LENGTH,
    PARAMETER_PREFIXES,
    PUBLIC_CHANNELS,
    channel_problem,
    channels_for,
    is_private,
    private_owner,
)
from ._codec import Command, Envelope, decode_command, decode_message, encode, new_id, reply_type
from ._control import (
    COMMAND_PAYLOADS,
    REPLY_PAYLOADS,
    Ack,
    Admin,
    AdminResult,
    Auth,
    BlockEntry,
    ChannelPosition,
    ErrorPayload,
    Heartbeat,
    MetricsResponse,
    Ping,
    Pong,
    Publish,
    PublishedEvent,
    PublishResult,
    RequestMetrics,
    StreamPosition,
    Subscribe,
    Unsubscribe,
    UserInfo,
    Welcome,
)
from ._converter import converter, wire_name
from ._errors import CloseCode, ErrorCode, ProtocolError
from ._events import (
    EVENT_PAYLOADS,
    AlertTriggered,
    DagMetadata,
    DagUpdate,
    NewBlock,
    NodeStatus,
    Transaction,
    TxReceived,
    ValidatorEvent,
    ValidatorMetadata,
)
from ._types import (
    PROTOCOL_VERSION,
    AdminAction,
    AlertSeverity,
    CommandType,
    Count,
    DagUpdateType,
    DecimalAmount,
    EventType,
    NodeState,
    ReplyType,
    Timestamp,
    TransactionStatus,
    ValidatorEventType,
    format_timestamp,
    now_timestamp,
    parse_timestamp,
)

__all__ = [
    "COMMAND_PAYLOADS", "EVENT_PAYLOADS", "MAX_CHANNEL_LENGTH", "PARAMETER_PREFIXES",
    "PROTOCOL_VERSION", "PUBLIC_CHANNELS", "REPLY_PAYLOADS",
    "Ack", "Admin", "AdminAction", "AdminResult", "AlertSeverity", "AlertTriggered", "Auth",
    "BlockEntry", "ChannelPosition", "CloseCode",
    "Command", "CommandType", "Count", "DagMetadata", "DagUpdate", "DagUpdateType",
    "DecimalAmount", "Envelope", "ErrorCode", "ErrorPayload", "EventType",
    "Heartbeat", "MetricsResponse", "NewBlock", "NodeState", "NodeStatus", "Ping", "Pong",
    "ProtocolError", "Publish", "PublishResult", "PublishedEvent", "ReplyType",
    "RequestMetrics", "StreamPosition", "Subscribe", "Timestamp", "Transaction",
    "TransactionStatus", "TxReceived", "Unsubscribe", "UserInfo", "ValidatorEvent",
    "ValidatorEventType", "ValidatorMetadata", "Welcome",
    "as_published", "build_alert_triggered_message", "build_dag_update_message",
    "build_event", "build_new_block_message", "build_node_status_message",
    "build_tx_received_message", "build_validator_event_message", "channel_problem",
    "channels_for", "converter", "decode_command", "decode_message", "encode",
    "format_timestamp", "is_private", "new_id", "now_timestamp", "parse_timestamp",
    "private_owner", "reply_type", "wire_name",
]
