"""JSON Web Tokens: issuing them for clients and producers, verifying them at the handshake.

Verification pins the algorithms to the configured key: a secret verifies only HS*, a
public key only the RS*/PS*/ES* algorithms it fits. An attacker therefore cannot pick
``none``, nor sign an HS256 token with the (public) RSA key as its secret. Time claims
are checked here rather than by PyJWT so that callers and tests can say what "now" is.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jwt
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidSubjectError
from jwt.warnings import InsecureKeyLengthWarning

from ..config import ConfigError
from ._policy import Principal, Role

if TYPE_CHECKING:
    from ..config import Config

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
"""Asymmetric algorithms: signed with a private key, verified with its public key."""
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS + KEY_ALGORITHMS

_DEFAULT_KEY_ALGORITHMS = ("RS256", "ES256", "ES384", "ES512")
"""What a public key verifies when jwt_algorithms is empty: RS256, or the ES algorithm of its curve."""

MAX_TOKEN_LENGTH = 8192
"""Longer tokens are refused before any parsing: no legitimate token comes near it."""

_RESERVED_CLAIMS = frozenset({"sub", "role", "iat", "nbf", "exp", "iss", "aud"})
_DECODE_OPTIONS: Any = {
    # time claims are checked against the caller's clock in TokenVerifier.verify
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "require": ["exp", "sub"],
}
_ALGORITHMS = get_default_algorithms()
_ROLE_NAMES = frozenset(role.value for role in Role)


class AuthError(Exception):
    """A token that does not authenticate its bearer.

    `reason` is a short sentence safe to log and to send to the client: it never
    contains the token or any part of it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def key_weakness(algorithm: str, key: Any) -> str | None:
    """Why `key` is weaker than recommended for `algorithm` (too short), or None.

    Raises ValueError when the key cannot be used with the algorithm at all.
    """
    implementation = _ALGORITHMS[algorithm]
    try:
        prepared = implementation.prepare_key(key)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise ValueError(f"the key cannot be used with {algorithm}") from None
    check = getattr(implementation, "check_key_length", None)
    return check(prepared) if check is not None else None


@contextlib.contextmanager
def _quiet_key_length() -> Iterator[None]:
    # PyJWT warns about a short key on every call; it is reported once instead
    # (key_weakness, TokenVerifier.weaknesses).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        yield


def issue_token(
    sub: str,
    role: Role | str,
    *,
    ttl: float = 86400,
    secret: str | None = None,
    private_key: str | None = None,
    algorithm: str = "HS256",
    issuer: str | None = None,
    audience: str | Sequence[str] | None = None,
    now: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A signed token for `sub` with `role`, valid for `ttl` seconds from `now`.

    HS* algorithms sign with `secret`; RS*/PS*/ES* with `private_key` (PEM text).
    Raises ValueError for anything that would produce a token no verifier accepts.
    """
    if not isinstance(sub, str) or not sub:
        raise ValueError("sub must be a non-empty string")
    try:
        role = Role(role)
    except ValueError:
        raise ValueError(f"role must be one of {', '.join(Role)}, not {role!r}") from None
    if not (math.isfinite(ttl) and ttl > 0):
        raise ValueError("ttl must be a positive number of seconds")
    if algorithm in HMAC_ALGORITHMS:
        if not secret:
            raise ValueError(f"{algorithm} needs a secret")
        key: str = secret
    elif algorithm in KEY_ALGORITHMS:
        if not private_key:
            raise ValueError(f"{algorithm} needs a private key")
        key = private_key
    else:
        raise ValueError(f"algorithm must be one of {', '.join(SUPPORTED_ALGORITHMS)}, not {algorithm!r}")
    clashing = _RESERVED_CLAIMS.intersection(extra or {})
    if clashing:
        raise ValueError(f"extra claims may not set {', '.join(sorted(clashing))}")

    moment = time.time() if now is None else now
    claims: dict[str, Any] = dict(extra or {})
    claims.update(
        sub=sub,
        role=role.value,
        iat=math.floor(moment),
        nbf=math.floor(moment),
        exp=math.ceil(moment + ttl),
    )
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience if isinstance(audience, str) else list(audience)
    try:
        with _quiet_key_length():
            return jwt.encode(claims, key, algorithm=algorithm)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise ValueError(f"the key cannot sign {algorithm} tokens") from None


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    try:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError
        number = float(value)
        if not math.isfinite(number):
            raise OverflowError
    except (TypeError, OverflowError):
        raise AuthError(f"the token's {name} claim must be a number") from None
    return number


class TokenVerifier:
    """Turns a bearer token into a Principal, or says why it cannot.

    A verifier with neither secret nor public key is in open mode: the server then
    lets everyone in unauthenticated and verify refuses every token.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        algorithms: Sequence[str] = (),
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 30.0,
    ) -> None:
        """`public_key` is PEM text: a public key or an X.509 certificate."""
        self.issuer = issuer
        self.audience = audience
        self.leeway = float(leeway)
        self._keys: dict[str, Any] = {}
        self._weak: dict[str, str] = {}
        if not (math.isfinite(self.leeway) and self.leeway >= 0):
            raise ConfigError("jwt_leeway: expected a non-negative number of seconds")
        unknown = [name for name in algorithms if name not in SUPPORTED_ALGORITHMS]
        if unknown:
            raise ConfigError(
                f"jwt_algorithms: {', '.join(unknown)} not supported;"
                f" expected some of {', '.join(SUPPORTED_ALGORITHMS)}"
            )
        for names, setting, given in (
            ([a for a in algorithms if a in HMAC_ALGORITHMS], "jwt_secret", secret),
            ([a for a in algorithms if a in KEY_ALGORITHMS], "jwt_public_key", public_key),
        ):
            if names and given is None:
                raise ConfigError(f"jwt_algorithms: {', '.join(names)} needs {setting}")
        if secret is not None:
            self._add_secret(
                secret, [a for a in algorithms if a in HMAC_ALGORITHMS] if algorithms else ["HS256"]
            )
        if public_key is not None:
            wanted = [a for a in algorithms if a in KEY_ALGORITHMS] if algorithms else _DEFAULT_KEY_ALGORITHMS
            self._add_public_key(public_key, wanted, explicit=bool(algorithms))
        unmatched = [name for name in algorithms if name not in self._keys]
        if unmatched:
            raise ConfigError(
                f"jwt_algorithms: {', '.join(unmatched)} cannot be verified with the configured"
                " jwt_secret / jwt_public_key"
            )

    def _add_secret(self, secret: str, names: Sequence[str]) -> None:
        if not secret:
            raise ConfigError("jwt_secret: must not be empty")
        if not names:
            raise ConfigError("jwt_secret is set but jwt_algorithms names no HS algorithm")
        for name in names:
            try:
                weakness = key_weakness(name, secret)
            except ValueError:
                raise ConfigError("jwt_secret: looks like a PEM key; use jwt_public_key for keys") from None
            self._keys[name] = secret
            if weakness:
                self._weak[name] = f"jwt_secret: {weakness}"

    def _add_public_key(self, pem: str, names: Sequence[str], *, explicit: bool) -> None:
        key = _load_public_key(pem)
        for name in names:
            try:
                weakness = key_weakness(name, key)
            except ValueError:
                if explicit:
                    raise ConfigError(
                        f"jwt_algorithms: {name} does not fit the key in jwt_public_key"
                    ) from None
                continue
            self._keys[name] = key
            if weakness:
                self._weak[name] = f"jwt_public_key: {weakness}"
        if not any(name in KEY_ALGORITHMS for name in self._keys):
            raise ConfigError("jwt_public_key: no accepted algorithm fits this key; set jwt_algorithms")

    @classmethod
    def from_config(cls, config: Config) -> TokenVerifier:
        """The verifier the server's settings describe; jwt_public_key is a path to a PEM file."""
        public_key = None
        if config.jwt_public_key is not None:
            try:
                with open(config.jwt_public_key, encoding="utf-8") as handle:
                    public_key = handle.read()
            except OSError as exc:
                raise ConfigError(
                    f"jwt_public_key: cannot read {config.jwt_public_key}: {exc.strerror}"
                ) from None
            except UnicodeDecodeError:
                raise ConfigError(f"jwt_public_key: {config.jwt_public_key} is not a PEM text file") from None
        return cls(
            secret=config.jwt_secret,
            public_key=public_key,
            algorithms=config.jwt_algorithms,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
            leeway=config.jwt_leeway,
        )

    @property
    def open_mode(self) -> bool:
        """No secret and no key: nobody can be authenticated (development only)."""
        return not self._keys

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms a token may be signed with."""
        return tuple(self._keys)

    @property
    def weaknesses(self) -> tuple[str, ...]:
        """Keys shorter than recommended, one sentence each, for the server to warn about at start."""
        return tuple(dict.fromkeys(self._weak.values()))

    def verify(self, token: str, *, now: float | None = None) -> Principal:
        """The principal `token` proves, checked at `now` (unix time); raises AuthError."""
        if self.open_mode:
            raise AuthError("this server has no token verification configured")
        if not isinstance(token, str) or not token:
            raise AuthError("the token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("the token is malformed") from None
        algorithm = header.get("alg")
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None:
            accepted = ", ".join(self._keys)
            raise AuthError(f"the token's algorithm is not accepted here (accepted: {accepted})")
        claims = self._decode(token, algorithm, key)
        return self._principal(claims, time.time() if now is None else now)

    def _decode(self, token: str, algorithm: str, key: Any) -> dict[str, Any]:
        quiet = _quiet_key_length() if algorithm in self._weak else contextlib.nullcontext()
        try:
            with quiet:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    options=_DECODE_OPTIONS,
                    audience=self.audience,
                    issuer=self.issuer,
                )
        except jwt.InvalidSignatureError:
            raise AuthError("the token's signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token has no {exc.claim} claim") from None
        except jwt.InvalidAudienceError:
            if self.audience is None:
                raise AuthError("the token names an audience but this server expects none") from None
            raise AuthError("the token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("the token comes from another issuer") from None
        except InvalidSubjectError:
            raise AuthError("the token's sub claim must be a non-empty string") from None
        except jwt.DecodeError:
            raise AuthError("the token is malformed") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("the token is invalid") from None

    def _principal(self, claims: dict[str, Any], now: float) -> Principal:
        expires_at = _number(claims, "exp")
        if expires_at <= now - self.leeway:
            raise AuthError("the token has expired")
        if "nbf" in claims and _number(claims, "nbf") > now + self.leeway:
            raise AuthError("the token is not valid yet")
        if "iat" in claims and _number(claims, "iat") > now + self.leeway:
            raise AuthError("the token was issued in the future")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("the token's sub claim must be a non-empty string")
        role = claims.get("role", Role.USER.value)
        if not isinstance(role, str) or role not in _ROLE_NAMES:
            raise AuthError(f"the token's role must be one of {', '.join(Role)}")
        return Principal(sub=sub, role=Role(role), expires_at=expires_at, claims=claims)


def _load_public_key(pem: str) -> Any:
    """The public key in PEM text (a public key or a certificate), or ConfigError."""
    # cryptography is imported here: only key-configured servers need it
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pem.encode("utf-8")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError("jwt_public_key: not a PEM public key or certificate") from None
