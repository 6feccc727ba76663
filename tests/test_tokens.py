"""Tokens: what the verifier refuses first, then what it accepts, then the `token` command."""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import warnings
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from kaldrix.cli import token as token_cli
from kaldrix.config import Config, ConfigError
from kaldrix.security import AuthError, Principal, Role, TokenVerifier, issue_token

SECRET = "kaldrix-test-secret-that-is-long-enough-for-hs256"
NOW = 1_700_000_000.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _claims(**overrides: Any) -> dict[str, Any]:
    claims = {"sub": "alice", "role": "user", "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 3600}
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not ...}


def _hs(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _hs_by_hand(header: dict[str, Any], claims: dict[str, Any], secret: str = SECRET) -> str:
    """Sign without PyJWT's encoder, which refuses some claims a hostile client may still send."""
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _pem_private(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_public(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET, leeway=0)


def _refused(verifier: TokenVerifier, token: str, *, now: float = NOW) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, now=now)
    reason = caught.value.reason
    assert reason and reason == str(caught.value)
    for part in token.split("."):
        if len(part) > 8:
            assert part not in reason
    return reason


# --- refusals -----------------------------------------------------------------------------


def test_expired_token(verifier: TokenVerifier) -> None:
    token = issue_token("alice", "user", ttl=60, secret=SECRET, now=NOW - 1000)
    assert "expired" in _refused(verifier, token)


def test_expiry_is_exclusive(verifier: TokenVerifier) -> None:
    token = _hs(_claims(exp=int(NOW), iat=..., nbf=...))
    assert "expired" in _refused(verifier, token)
    assert verifier.verify(token, now=NOW - 1).sub == "alice"


def test_not_yet_valid(verifier: TokenVerifier) -> None:
    token = issue_token("alice", "user", secret=SECRET, now=NOW + 120)
    assert "not valid yet" in _refused(verifier, token)


def test_issued_in_the_future_without_nbf(verifier: TokenVerifier) -> None:
    token = _hs(_claims(nbf=..., iat=int(NOW) + 600))
    assert "issued in the future" in _refused(verifier, token)


def test_wrong_signature(verifier: TokenVerifier) -> None:
    token = _hs(_claims(), secret="another-secret-that-is-also-long-enough-to-sign")
    assert "signature" in _refused(verifier, token)


def test_tampered_payload(verifier: TokenVerifier) -> None:
    header, _, signature = _hs(_claims()).split(".")
    forged = f"{header}.{_segment(_claims(role='admin'))}.{signature}"
    assert "signature" in _refused(verifier, forged)


def test_wrong_audience() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="kaldrix")
    token = issue_token("alice", "user", secret=SECRET, audience="elsewhere", now=NOW)
    assert "audience" in _refused(verifier, token)
    assert "aud" in _refused(verifier, issue_token("alice", "user", secret=SECRET, now=NOW))


def test_audience_the_server_does_not_expect(verifier: TokenVerifier) -> None:
    token = issue_token("alice", "user", secret=SECRET, audience="elsewhere", now=NOW)
    assert "audience" in _refused(verifier, token)


def test_wrong_issuer() -> None:
    verifier = TokenVerifier(secret=SECRET, issuer="kaldrix-auth")
    token = issue_token("alice", "user", secret=SECRET, issuer="someone-else", now=NOW)
    assert "issuer" in _refused(verifier, token)
    assert "iss" in _refused(verifier, issue_token("alice", "user", secret=SECRET, now=NOW))


def test_alg_none_is_refused(verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "None"}, {"alg": "NONE"}):
        unsigned = f"{_segment(header)}.{_segment(_claims(role='admin'))}."
        assert "algorithm" in _refused(verifier, unsigned)
        assert "algorithm" in _refused(TokenVerifier(public_key=_pem_public(rsa_key)), unsigned)


def test_hs256_signed_with_the_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = _pem_public(rsa_key)
    verifier = TokenVerifier(public_key=public_pem, algorithms=("RS256",))
    forged = _hs_by_hand({"alg": "HS256", "typ": "JWT"}, _claims(role="admin"), secret=public_pem)
    assert "algorithm" in _refused(verifier, forged)


def test_a_token_of_another_family_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    by_key = issue_token("alice", "user", private_key=_pem_private(rsa_key), algorithm="RS256", now=NOW)
    assert "algorithm" in _refused(TokenVerifier(secret=SECRET), by_key)
    by_secret = issue_token("alice", "user", secret=SECRET, now=NOW)
    assert "algorithm" in _refused(TokenVerifier(public_key=_pem_public(rsa_key)), by_secret)


def test_missing_sub(verifier: TokenVerifier) -> None:
    assert "sub" in _refused(verifier, _hs(_claims(sub=...)))


def test_missing_exp(verifier: TokenVerifier) -> None:
    assert "exp" in _refused(verifier, _hs(_claims(exp=...)))


@pytest.mark.parametrize("sub", ["", 42, None, ["alice"], {"id": 1}])
def test_sub_must_be_a_non_empty_string(verifier: TokenVerifier, sub: Any) -> None:
    assert "sub" in _refused(verifier, _hs(_claims(sub=sub)))


@pytest.mark.parametrize("role", ["superuser", "Admin", "", 1, None, ["admin"]])
def test_unknown_role(verifier: TokenVerifier, role: Any) -> None:
    assert "role" in _refused(verifier, _hs(_claims(role=role)))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["tomorrow", True, [1], None, 10**400])
def test_time_claims_must_be_numbers(verifier: TokenVerifier, claim: str, value: Any) -> None:
    _refused(verifier, _hs(_claims(**{claim: value})))


def test_leeway_is_honoured() -> None:
    late = _hs(_claims(exp=int(NOW) - 10))
    early = _hs(_claims(nbf=int(NOW) + 10, iat=int(NOW) + 10))
    lenient = TokenVerifier(secret=SECRET, leeway=30)
    strict = TokenVerifier(secret=SECRET, leeway=5)
    assert lenient.verify(late, now=NOW).sub == "alice"
    assert lenient.verify(early, now=NOW).sub == "alice"
    assert "expired" in _refused(strict, late)
    assert "not valid yet" in _refused(strict, early)


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b.c", "a.b", "...", "eyJhbGciOiJIUzI1NiJ9.e30", "x" * 9000, "é.é.é"],
)
def test_malformed_tokens(verifier: TokenVerifier, garbage: str) -> None:
    with pytest.raises(AuthError):
        verifier.verify(garbage, now=NOW)


@given(st.text(max_size=300))
def test_any_text_is_refused_with_auth_error_only(text: str) -> None:
    with pytest.raises(AuthError):
        TokenVerifier(secret=SECRET).verify(text, now=NOW)


_CLAIM_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.sampled_from(["user", "publisher", "admin"]),
    st.integers(min_value=-(10**400), max_value=10**400),
)


@given(
    st.dictionaries(st.sampled_from(["sub", "role", "exp", "nbf", "iat", "aud", "iss", "jti"]), _CLAIM_VALUES)
)
def test_any_signed_claims_give_a_principal_or_auth_error(claims: dict[str, Any]) -> None:
    verifier = TokenVerifier(secret=SECRET)
    try:
        principal = verifier.verify(_hs_by_hand({"alg": "HS256"}, claims), now=NOW)
    except AuthError as exc:
        assert exc.reason
    else:
        assert principal.sub == claims["sub"] and principal.sub
        assert principal.role.value == claims.get("role", "user")
        assert principal.expires_at is not None and principal.expires_at > NOW - verifier.leeway


def test_open_mode_verifies_nothing() -> None:
    verifier = TokenVerifier()
    assert verifier.open_mode
    assert TokenVerifier.from_config(Config()).open_mode
    assert not TokenVerifier(secret=SECRET).open_mode
    with pytest.raises(AuthError):
        verifier.verify(issue_token("alice", "user", secret=SECRET), now=NOW)


# --- configuration mistakes ----------------------------------------------------------------


def test_configuration_mistakes(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="none"):
        TokenVerifier(secret=SECRET, algorithms=("none",))
    with pytest.raises(ConfigError, match="RS256"):
        TokenVerifier(secret=SECRET, algorithms=("HS256", "RS256"))
    with pytest.raises(ConfigError, match="HS256"):
        TokenVerifier(public_key=_pem_public(rsa_key), algorithms=("HS256",))
    with pytest.raises(ConfigError, match="ES256"):
        TokenVerifier(public_key=_pem_public(rsa_key), algorithms=("ES256",))
    with pytest.raises(ConfigError, match="empty"):
        TokenVerifier(secret="")
    with pytest.raises(ConfigError, match="jwt_public_key"):
        TokenVerifier(secret=_pem_public(rsa_key))
    with pytest.raises(ConfigError, match="jwt_public_key"):
        TokenVerifier(public_key="not a key")
    with pytest.raises(ConfigError, match="jwt_public_key"):
        TokenVerifier(public_key=_pem_private(rsa_key))
    with pytest.raises(ConfigError, match="cannot read"):
        TokenVerifier.from_config(Config(jwt_public_key=str(tmp_path / "missing.pem")))


def test_a_short_secret_is_reported_once_not_per_token() -> None:
    verifier = TokenVerifier(secret="dev")
    assert len(verifier.weaknesses) == 1 and "jwt_secret" in verifier.weaknesses[0]
    assert TokenVerifier(secret=SECRET).weaknesses == ()
    token = issue_token("alice", "user", secret="dev", now=NOW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verifier.verify(token, now=NOW).sub == "alice"


# --- acceptance ----------------------------------------------------------------------------


def test_hs256_round_trip(verifier: TokenVerifier) -> None:
    token = issue_token("alice", Role.PUBLISHER, ttl=600, secret=SECRET, now=NOW, extra={"plan": "pro"})
    principal = verifier.verify(token, now=NOW + 599)
    assert principal == Principal(
        sub="alice",
        role=Role.PUBLISHER,
        expires_at=NOW + 600,
        claims={"sub": "alice", "role": "publisher", "iat": NOW, "nbf": NOW, "exp": NOW + 600, "plan": "pro"},
    )
    assert "expired" in _refused(verifier, token, now=NOW + 600)


def test_missing_role_means_user(verifier: TokenVerifier) -> None:
    assert verifier.verify(_hs(_claims(role=...)), now=NOW).role is Role.USER


def test_iat_and_nbf_are_optional(verifier: TokenVerifier) -> None:
    assert verifier.verify(_hs(_claims(iat=..., nbf=...)), now=NOW).sub == "alice"


def test_issuer_and_audience_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, issuer="kaldrix-auth", audience="kaldrix")
    token = issue_token(
        "alice", "admin", secret=SECRET, issuer="kaldrix-auth", audience=["explorer", "kaldrix"], now=NOW
    )
    assert verifier.verify(token, now=NOW).role is Role.ADMIN


def test_from_config_with_a_secret() -> None:
    config = Config(jwt_secret=SECRET, jwt_issuer="kaldrix-auth", jwt_leeway=0)
    verifier = TokenVerifier.from_config(config)
    assert verifier.algorithms == ("HS256",)
    token = issue_token("alice", "user", secret=SECRET, issuer="kaldrix-auth", now=NOW)
    assert verifier.verify(token, now=NOW).sub == "alice"
    hs512 = TokenVerifier.from_config(Config(jwt_secret=SECRET * 2, jwt_algorithms=("HS512",)))
    assert hs512.algorithms == ("HS512",)
    token = issue_token("alice", "user", secret=SECRET * 2, algorithm="HS512", now=NOW)
    assert hs512.verify(token, now=NOW).sub == "alice"
    assert "algorithm" in _refused(hs512, issue_token("alice", "user", secret=SECRET * 2, now=NOW))


def test_rs256_round_trip(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_text(_pem_public(rsa_key))
    verifier = TokenVerifier.from_config(Config(jwt_public_key=str(key_file)))
    assert verifier.algorithms == ("RS256",)
    token = issue_token("feeder", "publisher", private_key=_pem_private(rsa_key), algorithm="RS256", now=NOW)
    principal = verifier.verify(token, now=NOW)
    assert (principal.sub, principal.role) == ("feeder", Role.PUBLISHER)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = issue_token("feeder", "admin", private_key=_pem_private(other), algorithm="RS256", now=NOW)
    assert "signature" in _refused(verifier, forged)


def test_es256_round_trip(ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(public_key=_pem_public(ec_key))
    assert verifier.algorithms == ("ES256",)
    token = issue_token("root", "admin", private_key=_pem_private(ec_key), algorithm="ES256", now=NOW)
    assert verifier.verify(token, now=NOW).role is Role.ADMIN
    other = ec.generate_private_key(ec.SECP256R1())
    forged = issue_token("root", "admin", private_key=_pem_private(other), algorithm="ES256", now=NOW)
    assert "signature" in _refused(verifier, forged)


def test_public_key_from_a_certificate(ec_key: ec.EllipticCurvePrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kaldrix-auth")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(ec_key, hashes.SHA256())
    )
    verifier = TokenVerifier(public_key=certificate.public_bytes(serialization.Encoding.PEM).decode())
    token = issue_token("root", "admin", private_key=_pem_private(ec_key), algorithm="ES256", now=NOW)
    assert verifier.verify(token, now=NOW).sub == "root"


def test_secret_and_key_together_keep_their_families(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(secret=SECRET, public_key=_pem_public(rsa_key))
    assert set(verifier.algorithms) == {"HS256", "RS256"}
    by_secret = issue_token("a", "user", secret=SECRET, now=NOW)
    by_key = issue_token("b", "user", private_key=_pem_private(rsa_key), algorithm="RS256", now=NOW)
    assert verifier.verify(by_secret, now=NOW).sub == "a"
    assert verifier.verify(by_key, now=NOW).sub == "b"
    # the public key is not an HMAC secret even when both are configured
    forged = _hs_by_hand({"alg": "HS256"}, _claims(role="admin"), secret=_pem_public(rsa_key))
    assert "signature" in _refused(verifier, forged)


# --- issuing -------------------------------------------------------------------------------


def test_issued_claims() -> None:
    token = issue_token("alice", "admin", ttl=90, secret=SECRET, issuer="i", audience="a", now=NOW + 0.5)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {
        "sub": "alice",
        "role": "admin",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 91,
        "iss": "i",
        "aud": "a",
    }
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sub": "a", "role": "user"}, "needs a secret"),
        ({"sub": "a", "role": "user", "algorithm": "RS256", "secret": SECRET}, "needs a private key"),
        ({"sub": "a", "role": "user", "algorithm": "none", "secret": SECRET}, "algorithm"),
        ({"sub": "a", "role": "root", "secret": SECRET}, "role"),
        ({"sub": "", "role": "user", "secret": SECRET}, "sub"),
        ({"sub": "a", "role": "user", "secret": SECRET, "ttl": 0}, "ttl"),
        ({"sub": "a", "role": "user", "secret": SECRET, "ttl": float("inf")}, "ttl"),
        ({"sub": "a", "role": "user", "secret": SECRET, "extra": {"role": "admin"}}, "role"),
        ({"sub": "a", "role": "user", "algorithm": "RS256", "private_key": "nope"}, "RS256"),
    ],
)
def test_issue_token_refuses(kwargs: dict[str, Any], message: str) -> None:
    sub, role = kwargs.pop("sub"), kwargs.pop("role")
    with pytest.raises(ValueError, match=message):
        issue_token(sub, role, **kwargs)


# --- the `token` command -------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kaldrix token")
    token_cli.configure(parser)
    return parser.parse_args(argv)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("KALDRIX_JWT_SECRET", "KALDRIX_JWT_ISSUER", "KALDRIX_JWT_AUDIENCE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cli_prints_a_token_that_verifies(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        token_cli.run(_parse("--sub", "feeder", "--role", "publisher", "--ttl", "30m", "--secret", SECRET))
        == 0
    )
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("\n") and out.count("\n") == 1
    principal = TokenVerifier(secret=SECRET).verify(out.strip())
    assert (principal.sub, principal.role) == ("feeder", Role.PUBLISHER)
    claims = principal.claims
    assert claims["exp"] - claims["iat"] in (1800, 1801)


def test_cli_reads_the_environment(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("KALDRIX_JWT_SECRET", SECRET)
    clean_env.setenv("KALDRIX_JWT_ISSUER", "kaldrix-auth")
    assert token_cli.run(_parse("--sub", "alice")) == 0
    verifier = TokenVerifier(secret=SECRET, issuer="kaldrix-auth")
    principal = verifier.verify(capsys.readouterr().out.strip())
    assert principal.role is Role.USER
    assert principal.claims["exp"] - principal.claims["iat"] in (86400, 86401)


def test_cli_without_a_secret(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert token_cli.run(_parse("--sub", "alice")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "KALDRIX_JWT_SECRET" in err


def test_cli_without_a_private_key(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert token_cli.run(_parse("--sub", "alice", "--alg", "RS256", "--secret", SECRET)) == 2
    assert "--private-key" in capsys.readouterr().err
    assert (
        token_cli.run(_parse("--sub", "alice", "--alg", "RS256", "--private-key", "/nonexistent/key.pem"))
        == 2
    )
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_cli_signs_with_a_private_key(
    alg: str,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = rsa_key if alg == "RS256" else ec_key
    key_file = tmp_path / "private.pem"
    key_file.write_text(_pem_private(key))
    argv = [
        "--sub",
        "root",
        "--role",
        "admin",
        "--alg",
        alg,
        "--private-key",
        str(key_file),
        "--audience",
        "kaldrix",
    ]
    assert token_cli.run(_parse(*argv)) == 0
    verifier = TokenVerifier(public_key=_pem_public(key), audience="kaldrix")
    assert verifier.verify(capsys.readouterr().out.strip()).role is Role.ADMIN


def test_cli_warns_about_a_short_secret(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert token_cli.run(_parse("--sub", "alice", "--secret", "dev")) == 0
    out, err = capsys.readouterr()
    assert "warning" in err and out.count(".") == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("24h", 86400),
        ("7d", 604800),
        ("3600", 3600),
        ("1.5h", 5400),
        (" 10 m ", 600),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert token_cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5m", "h", "10w", "1e9", "nan", "inf", "5 minutes"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        token_cli.parse_duration(text)


def test_cli_rejects_a_bad_ttl_and_role(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--sub", "a", "--ttl", "soon"], ["--sub", "a", "--role", "root"], ["--role", "user"]):
        with pytest.raises(SystemExit) as exit_:
            _parse(*argv)
        assert exit_.value.code == 2
    capsys.readouterr()
