"""Who may do what: roles, the authenticated principal and the three access rules.

The rules are pure functions of the principal and the server's mode, so the server
asks them at each command and tests can check every case in a table. ``None`` stands
for an anonymous connection. Each rule returns None when the action is allowed and
otherwise a short sentence the server sends back in its FORBIDDEN or UNAUTHORIZED error.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from typing import Any

import attrs

from ..protocol import private_owner


class Role(enum.StrEnum):
    """The `role` claim of a token."""

    USER = "user"
    PUBLISHER = "publisher"
    ADMIN = "admin"


def _frozen_claims(claims: Mapping[str, Any]) -> Mapping[str, Any]:
    # a read-only copy: a principal is shared by every task of its connection
    return types.MappingProxyType(dict(claims))


@attrs.frozen
class Principal:
    """An authenticated client, as its verified token describes it."""

    sub: str
    role: Role
    expires_at: float | None
    """Unix time after which the token no longer holds (None: never)."""
    claims: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_claims, hash=False)
    """Every claim of the token, for features that need more than sub and role."""

    def expired(self, now: float) -> bool:
        """Whether the token behind this principal has run out at `now` (unix time)."""
        return self.expires_at is not None and now >= self.expires_at


def may_subscribe(principal: Principal | None, channel: str, *, open_mode: bool) -> str | None:
    """Why `principal` may not read `channel`, or None when it may.

    Shared channels are public, even to anonymous clients; ``user:<sub>`` belongs to
    the principal with that subject (and admins). Open mode changes nothing here: a
    private channel never opens to someone who cannot prove who they are.
    """
    del open_mode  # private data stays private even on a development server
    owner = private_owner(channel)
    if owner is None:
        return None
    if principal is None:
        return "private channels need a token"
    if principal.role is Role.ADMIN or principal.sub == owner:
        return None
    return "a private channel is readable only by its owner or an admin"


def may_publish(principal: Principal | None, *, open_mode: bool, allow_anonymous_publish: bool) -> str | None:
    """Why `principal` may not PUBLISH, or None when it may.

    Open mode does not open publishing: a gateway started without a secret must not let
    anyone inject chain events unless its operator said so with allow_anonymous_publish.
    """
    if principal is None:
        if allow_anonymous_publish:
            return None
        if open_mode:
            return "publishing without a token is off (set allow_anonymous_publish to allow it)"
        return "publishing needs a token with the publisher or admin role"
    if principal.role in (Role.PUBLISHER, Role.ADMIN):
        return None
    return "publishing needs the publisher or admin role"


def may_admin(principal: Principal | None, *, open_mode: bool) -> str | None:
    """Why `principal` may not use admin features (metrics, IP blocking), or None when it may.

    Open mode is for development, where everyone is trusted; the server says so loudly
    when it starts that way.
    """
    if open_mode:
        return None
    if principal is None:
        return "this needs a token with the admin role"
    if principal.role is Role.ADMIN:
        return None
    return "this needs the admin role"
