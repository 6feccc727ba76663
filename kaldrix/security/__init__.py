"""Authentication, authorization and abuse defences.

JWTs in, a Principal out, and the rules for what it may do; the Guard that decides who
may connect and how fast (block list, trusted proxies, Origin check, rate limits, bans);
the audit log. Nothing here does I/O beyond reading a configured key file; the server
calls it at the handshake and at each command.
"""

from ._addresses import client_key, parse_address, parse_network
from ._audit import audit, audit_line
from ._blocklist import Block, Blocklist
from ._guard import Guard, Refusal, check_settings
from ._origin import OriginPolicy
from ._policy import Principal, Role, may_admin, may_publish, may_subscribe
from ._proxies import TrustedProxies
from ._ratelimit import MessageRate, SlidingWindow, TokenBucket, Verdict
from ._tokens import (
    HMAC_ALGORITHMS,
    KEY_ALGORITHMS,
    MAX_TOKEN_LENGTH,
    SUPPORTED_ALGORITHMS,
    AuthError,
    TokenVerifier,
    issue_token,
    key_weakness,
)

__all__ = [
    "HMAC_ALGORITHMS", "KEY_ALGORITHMS", "MAX_TOKEN_LENGTH", "SUPPORTED_ALGORITHMS",
    "AuthError", "Block", "Blocklist", "Guard", "MessageRate", "OriginPolicy", "Principal",
    "Refusal", "Role", "SlidingWindow", "TokenBucket", "TokenVerifier", "TrustedProxies", "Verdict",
    "audit", "audit_line", "check_settings", "client_key", "issue_token", "key_weakness",
    "may_admin", "may_publish", "may_subscribe", "parse_address", "parse_network",
]
