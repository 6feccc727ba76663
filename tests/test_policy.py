"""The access rules, case by case: every role (and anonymous) against every rule and mode."""

from __future__ import annotations

import pytest

from kaldrix.security import Principal, Role, may_admin, may_publish, may_subscribe

ANON = None
ALICE = Principal(sub="alice", role=Role.USER, expires_at=None)
PUB = Principal(sub="feeder", role=Role.PUBLISHER, expires_at=None)
ADMIN = Principal(sub="root", role=Role.ADMIN, expires_at=None)

ALLOWED = None
DENIED = "denied"


@pytest.mark.parametrize(
    ("principal", "channel", "open_mode", "expected"),
    [
        # shared channels: anyone, in any mode
        (ANON, "blocks", False, ALLOWED),
        (ANON, "address:0xabc", False, ALLOWED),
        (ALICE, "validator:v1", False, ALLOWED),
        (PUB, "nodes", False, ALLOWED),
        (ADMIN, "alerts", False, ALLOWED),
        (ANON, "blocks", True, ALLOWED),
        # a private channel: its owner and admins only
        (ANON, "user:alice", False, DENIED),
        (ALICE, "user:alice", False, ALLOWED),
        (ALICE, "user:bob", False, DENIED),
        (ALICE, "user:alice2", False, DENIED),
        (PUB, "user:alice", False, DENIED),
        (PUB, "user:feeder", False, ALLOWED),
        (ADMIN, "user:alice", False, ALLOWED),
        # open mode: nobody can prove an identity, so nothing is private
        (ANON, "user:alice", True, DENIED),
        (ALICE, "user:bob", True, DENIED),
    ],
)
def test_may_subscribe(
    principal: Principal | None, channel: str, open_mode: bool, expected: str | None
) -> None:
    reason = may_subscribe(principal, channel, open_mode=open_mode)
    if expected is ALLOWED:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason


@pytest.mark.parametrize(
    ("principal", "open_mode", "allow_anonymous", "expected"),
    [
        (ANON, False, False, DENIED),
        (ANON, True, False, DENIED),  # open mode alone does not open publishing
        (ANON, False, True, ALLOWED),
        (ANON, True, True, ALLOWED),
        (ALICE, False, False, DENIED),
        (ALICE, False, True, DENIED),  # a plain user never publishes
        (ALICE, True, True, DENIED),
        (PUB, False, False, ALLOWED),
        (PUB, True, False, ALLOWED),
        (ADMIN, False, False, ALLOWED),
        (ADMIN, True, True, ALLOWED),
    ],
)
def test_may_publish(
    principal: Principal | None, open_mode: bool, allow_anonymous: bool, expected: str | None
) -> None:
    reason = may_publish(principal, open_mode=open_mode, allow_anonymous_publish=allow_anonymous)
    if expected is ALLOWED:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason


@pytest.mark.parametrize(
    ("principal", "open_mode", "expected"),
    [
        (ANON, False, DENIED),
        (ALICE, False, DENIED),
        (PUB, False, DENIED),
        (ADMIN, False, ALLOWED),
        (ANON, True, ALLOWED),
        (ALICE, True, ALLOWED),
        (PUB, True, ALLOWED),
        (ADMIN, True, ALLOWED),
    ],
)
def test_may_admin(principal: Principal | None, open_mode: bool, expected: str | None) -> None:
    reason = may_admin(principal, open_mode=open_mode)
    if expected is ALLOWED:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason


def test_reasons_name_what_is_missing() -> None:
    assert may_publish(ALICE, open_mode=False, allow_anonymous_publish=False) == (
        "publishing needs the publisher or admin role"
    )
    assert "token" in may_publish(ANON, open_mode=False, allow_anonymous_publish=False)
    assert "allow_anonymous_publish" in may_publish(ANON, open_mode=True, allow_anonymous_publish=False)
    assert "admin" in may_admin(PUB, open_mode=False)
    assert "owner" in may_subscribe(ALICE, "user:bob", open_mode=False)


def test_role_values_are_the_wire_names() -> None:
    assert [role.value for role in Role] == ["user", "publisher", "admin"]
    assert Role("publisher") is Role.PUBLISHER


def test_principal_is_immutable_and_knows_when_it_expires() -> None:
    claims = {"sub": "alice", "role": "user", "exp": 100}
    principal = Principal(sub="alice", role=Role.USER, expires_at=100.0, claims=claims)
    claims["role"] = "admin"  # the caller's dict does not leak into the principal
    assert principal.claims["role"] == "user"
    with pytest.raises(TypeError):
        principal.claims["role"] = "admin"  # type: ignore[index]
    assert not principal.expired(99.9)
    assert principal.expired(100.0)
    assert not ALICE.expired(1e12)
    assert hash(principal) == hash(Principal(sub="alice", role=Role.USER, expires_at=100.0))
    assert principal == Principal(
        sub="alice", role=Role.USER, expires_at=100.0, claims=dict(claims, role="user")
    )
