"""Authentication and authorization against a live gateway: refusals first, then what holds.

Every case goes through a real handshake on a real socket; the close code and the
ERROR the client sees are the contract (spec/PROTOCOL.md sections 9 and 10).
"""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kaldrix.client import open_client
from kaldrix.security import issue_token
from tests.conftest import block_event
from tests.test_security_support import (
    SECRET,
    bearer,
    closed_with,
    forged_token,
    http_from,
    still_serves,
    ws_from,
)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def rsa_files(tmp_path, rsa_key):
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    path = tmp_path / "jwt.pub.pem"
    path.write_text(public)
    return private, public, str(path)


def token(sub: str = "alice", role: str = "user", **kwargs) -> str:
    kwargs.setdefault("secret", SECRET)
    return issue_token(sub, role, **kwargs)


async def refused_at_handshake(nursery, gateway, presented: str, *, query: bool = False) -> str:
    """Connect with `presented`; assert WELCOME (anonymous), ERROR UNAUTHORIZED, close 4001; the reason."""
    if query:
        client = await ws_from(nursery, gateway, resource=f"/ws?token={quote(presented)}", welcome=False)
    else:
        client = await ws_from(nursery, gateway, headers=bearer(presented), welcome=False)
    code, reason, received = await closed_with(client)
    assert (code, reason) == (4001, "authentication failed")
    assert [m["type"] for m in received] == ["WELCOME", "ERROR"]
    assert received[0]["payload"]["authenticated"] is False
    assert received[1]["payload"]["code"] == "UNAUTHORIZED"
    return received[1]["payload"]["message"]


# -- refused tokens --------------------------------------------------------------------------


async def test_expired_token_is_closed_with_4001(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET, jwt_leeway=0)
    expired = token(ttl=60, now=time.time() - 3600)
    assert "expired" in await refused_at_handshake(nursery, gateway, expired)


async def test_token_not_yet_valid_is_closed_with_4001(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET, jwt_leeway=5)
    early = token(ttl=3600, now=time.time() + 600)
    assert "not valid yet" in await refused_at_handshake(nursery, gateway, early)


async def test_wrong_signature_is_closed_with_4001(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    other = token(secret="another-secret-that-is-also-long-enough-for-hs256")
    assert "signature" in await refused_at_handshake(nursery, gateway, other)


async def test_wrong_audience_and_issuer_are_closed_with_4001(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET, jwt_audience="kaldrix", jwt_issuer="https://auth.kaldrix.io")
    wrong_audience = token(audience="someone-else", issuer="https://auth.kaldrix.io")
    wrong_issuer = token(audience="kaldrix", issuer="https://evil.example")
    assert "audience" in await refused_at_handshake(nursery, gateway, wrong_audience)
    assert "issuer" in await refused_at_handshake(nursery, gateway, wrong_issuer)
    right = token(audience="kaldrix", issuer="https://auth.kaldrix.io")
    client = await ws_from(nursery, gateway, headers=bearer(right), welcome=False)
    assert (await client.expect("WELCOME"))["payload"]["authenticated"] is True


async def test_alg_none_is_closed_with_4001(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    claims = {"sub": "mallory", "role": "admin", "exp": int(time.time()) + 3600}
    unsigned = forged_token({"alg": "none", "typ": "JWT"}, claims, None)
    assert "algorithm" in await refused_at_handshake(nursery, gateway, unsigned)


async def test_hs256_signed_with_the_rsa_public_key_is_closed_with_4001(start_gateway, nursery, rsa_files):
    _, public_pem, public_path = rsa_files
    gateway = await start_gateway(jwt_public_key=public_path)
    claims = {"sub": "mallory", "role": "admin", "exp": int(time.time()) + 3600}
    confused = forged_token({"alg": "HS256", "typ": "JWT"}, claims, public_pem.encode())
    assert "algorithm" in await refused_at_handshake(nursery, gateway, confused)


async def test_bad_token_in_the_query_string_is_closed_with_4001(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    assert "malformed" in await refused_at_handshake(nursery, gateway, "not.a.jwt", query=True)


async def test_missing_token_with_require_auth_is_refused_then_closed_with_4001(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET, require_auth=True, auth_timeout=0.3)
    client = await ws_from(nursery, gateway, welcome=False)
    assert (await client.expect("WELCOME"))["payload"]["authenticated"] is False
    refused = await client.request("SUBSCRIBE", {"channels": ["blocks"]})
    assert refused["payload"]["code"] == "UNAUTHORIZED"
    assert gateway.router.subscriber_count("blocks") == 0
    code, reason, _ = await closed_with(client)
    assert (code, reason) == (4001, "authentication timeout")


async def test_no_refresh_closes_with_4001_and_refresh_keeps_the_connection(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET, jwt_leeway=0)
    asked: list[str] = []

    def fresh_token() -> str:
        asked.append(token("alice", ttl=1))
        return asked[-1]

    lapsing = await ws_from(nursery, gateway, headers=bearer(token("bob", ttl=1)), welcome=False)
    async with open_client(gateway.url, token=fresh_token, channels=["user:alice"], ping_interval=None) as client:
        session = client.state.session_id
        first_expiry = jwt.decode(asked[0], options={"verify_signature": False})["exp"]
        code, reason, _ = await closed_with(lapsing, timeout=4)
        assert (code, reason) == (4001, "token expired")
        await trio.sleep(max(first_expiry - time.time(), 0) + 0.3)  # past the handshake token's expiry
        assert client.state.is_connected and client.state.session_id == session
        assert len(asked) >= 2  # the handshake's token, then at least one refresh over AUTH
        assert await client.ping() >= 0
        (conn,) = gateway.connections
        assert conn.principal.sub == "alice" and conn.principal.expires_at > first_expiry


async def test_a_refresh_for_another_subject_is_forbidden(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    client = await ws_from(nursery, gateway, headers=bearer(token("alice")))
    refused = await client.request("AUTH", {"token": token("mallory", role="admin")})
    assert refused["payload"]["code"] == "FORBIDDEN"
    await still_serves(client)


# -- roles -------------------------------------------------------------------------------------


async def test_a_user_may_not_publish(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET, allow_anonymous_publish=False)
    user = await ws_from(nursery, gateway, headers=bearer(token("alice")))
    refused = await user.publish(block_event())
    assert refused["type"] == "ERROR" and refused["payload"]["code"] == "FORBIDDEN"
    assert gateway.metrics.events_published == 0


async def test_a_user_may_not_read_another_users_channel(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    mallory = await ws_from(nursery, gateway, headers=bearer(token("mallory")))
    refused = await mallory.request("SUBSCRIBE", {"channels": ["blocks", "user:alice"]})
    assert refused["payload"]["code"] == "FORBIDDEN"
    assert refused["payload"]["path"] == "payload.channels[1]"
    assert gateway.router.subscriber_count() == 0
    alice = await ws_from(nursery, gateway, headers=bearer(token("alice")))
    await alice.subscribe("user:alice")


async def test_admin_operations_by_a_non_admin_are_forbidden(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    for role in ("user", "publisher"):
        client = await ws_from(nursery, gateway, headers=bearer(token("eve", role=role)))
        for kind, payload in (("ADMIN", {"action": "block", "address": "10.0.0.0/8"}), ("ADMIN", {"action": "list"}),
                              ("REQUEST_METRICS", {})):
            refused = await client.request(kind, payload)
            assert refused["payload"]["code"] == "FORBIDDEN", (role, kind)
    anonymous = await ws_from(nursery, gateway)
    assert (await anonymous.request("ADMIN", {"action": "list"}))["payload"]["code"] == "FORBIDDEN"
    assert len(gateway.guard.blocklist) == 0

    body = b'{"address": "10.0.0.0/8"}'
    status, _, _ = await http_from(gateway, "POST", "/api/admin/block", body=body)
    assert status == 401
    status, _, _ = await http_from(gateway, "POST", "/api/admin/block", body=body, headers=bearer("garbage"))
    assert status == 401
    status, _, _ = await http_from(gateway, "POST", "/api/admin/block", body=body, headers=bearer(token("eve")))
    assert status == 403
    assert len(gateway.guard.blocklist) == 0


async def test_audit_lines_name_address_and_reason_never_the_token(start_gateway, nursery, caplog):
    caplog.set_level(logging.INFO, logger="kaldrix.audit")
    gateway = await start_gateway(jwt_secret=SECRET)
    forged = token("mallory", secret="not-the-servers-secret-but-long-enough-for-hs256")
    await refused_at_handshake(nursery, gateway, forged)
    await http_from(gateway, "GET", "/api/admin/blocked", headers=bearer(forged))
    lines = [record.getMessage() for record in caplog.records if record.name == "kaldrix.audit"]
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("auth_failed address=127.0.0.1 reason=")
        assert "signature" in line
        assert forged not in line and forged.split(".")[2] not in line


# -- what holds ------------------------------------------------------------------------------


async def test_token_in_the_query_string_authenticates(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    client = await ws_from(nursery, gateway, resource=f"/ws?token={quote(token('alice'))}", welcome=False)
    welcome = await client.expect("WELCOME")
    assert welcome["payload"]["authenticated"] is True
    assert welcome["payload"]["user"] == {"sub": "alice", "role": "user"}
    await client.subscribe("user:alice")


async def test_rs256_tokens_are_verified_with_the_public_key(start_gateway, nursery, rsa_files):
    private_pem, _, public_path = rsa_files
    gateway = await start_gateway(jwt_public_key=public_path, require_auth=True)
    signed = issue_token("feeder", "publisher", private_key=private_pem, algorithm="RS256")
    producer = await ws_from(nursery, gateway, headers=bearer(signed), welcome=False)
    assert (await producer.expect("WELCOME"))["payload"]["user"] == {"sub": "feeder", "role": "publisher"}
    assert (await producer.publish(block_event()))["type"] == "ACK"
