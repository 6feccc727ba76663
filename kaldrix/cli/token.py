"""Print a signed JWT for a client or a producer.

The token goes to stdout on one line, ready for `Authorization: Bearer`, `?token=` or
an AUTH message. HS256 (the default) signs with --secret, or with KALDRIX_JWT_SECRET
from the environment, the same variable the server reads; RS256 and ES256 sign with
--private-key, a PEM file whose public half the server is given as jwt_public_key.
--issuer and --audience default to KALDRIX_JWT_ISSUER and KALDRIX_JWT_AUDIENCE.

Example: kaldrix token --sub explorer-1 --role user --ttl 7d
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from ..security import HMAC_ALGORITHMS, SUPPORTED_ALGORITHMS, Role, issue_token, key_weakness

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in `24h`, `30m`, `90s`, `7d` or a plain number of seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90s, 30m, 24h, 7d, 3600)")
    seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"a duration must be positive: {text!r}")
    return seconds


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--sub", required=True, help="the subject: who the token stands for")
    parser.add_argument(
        "--role", choices=[role.value for role in Role], default=Role.USER.value, help="default: user"
    )
    parser.add_argument(
        "--ttl",
        type=parse_duration,
        default=parse_duration("24h"),
        help="lifetime, e.g. 90s, 30m, 24h, 7d or seconds (default: 24h)",
    )
    parser.add_argument("--secret", help="HMAC secret (default: $KALDRIX_JWT_SECRET)")
    parser.add_argument("--private-key", metavar="FILE", help="PEM private key for RS*/ES* algorithms")
    parser.add_argument(
        "--alg",
        choices=SUPPORTED_ALGORITHMS,
        default="HS256",
        metavar="ALG",
        help="signing algorithm: HS256 (default), RS256, ES256, ...",
    )
    parser.add_argument("--issuer", help="iss claim (default: $KALDRIX_JWT_ISSUER)")
    parser.add_argument("--audience", help="aud claim (default: $KALDRIX_JWT_AUDIENCE)")


def _fail(message: str) -> int:
    print(f"kaldrix token: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    secret = private_key = None
    if args.alg in HMAC_ALGORITHMS:
        secret = args.secret or os.environ.get("KALDRIX_JWT_SECRET")
        if not secret:
            return _fail(f"{args.alg} needs a secret: pass --secret or set KALDRIX_JWT_SECRET")
        key = secret
    else:
        if not args.private_key:
            return _fail(f"{args.alg} needs a private key: pass --private-key FILE")
        try:
            with open(args.private_key, encoding="utf-8") as handle:
                private_key = handle.read()
        except OSError as exc:
            return _fail(f"cannot read {args.private_key}: {exc.strerror}")
        except UnicodeDecodeError:
            return _fail(f"{args.private_key} is not a PEM text file")
        key = private_key
    try:
        token = issue_token(
            args.sub,
            args.role,
            ttl=args.ttl,
            secret=secret,
            private_key=private_key,
            algorithm=args.alg,
            issuer=args.issuer or os.environ.get("KALDRIX_JWT_ISSUER") or None,
            audience=args.audience or os.environ.get("KALDRIX_JWT_AUDIENCE") or None,
        )
        weakness = key_weakness(args.alg, key)
    except ValueError as exc:
        return _fail(str(exc))
    if weakness:
        print(f"kaldrix token: warning: {weakness}", file=sys.stderr)
    print(token)
    return 0
