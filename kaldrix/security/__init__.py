"""Authentication and authorization: JWTs in, a Principal out, and the rules for what it may do.

Nothing here does I/O beyond reading a configured key file; the server calls it at the
handshake and at each command.
"""

from ._policy import Principal, Role, may_admin, may_publish, may_subscribe
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
    "AuthError", "Principal", "Role", "TokenVerifier",
    "issue_token", "key_weakness", "may_admin", "may_publish", "may_subscribe",
]
