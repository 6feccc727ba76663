"""Refreshing the token of an open connection before it expires.

With a token callback, the client asks it for a new token ahead of the current one's
``exp`` and sends it in an AUTH; the server then keeps the connection open instead of
closing it with 4001 at expiry. The token is decoded, not verified: the client only
needs its times, and the server is the one that judges it.

The refresh comes once 80 % of the lifetime has passed, and at least a minute (or half
the lifetime, for short tokens) before expiry, as the protocol recommends.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable

import jwt
import trio

from ..protocol import CommandType
from ._errors import CommandError, ConnectionLost
from ._session import Session

log = logging.getLogger("kaldrix.client")

REFRESH_AT = 0.8
"""Share of the token's lifetime after which a new one is asked for."""
MAX_MARGIN = 60.0
"""Refresh at least this many seconds before expiry (half the lifetime for short tokens)."""
MIN_INTERVAL = 1.0
"""Seconds between two asks, when the callback keeps handing back the same token."""

TokenCallback = Callable[[], str | Awaitable[str | None] | None]


def token_times(token: str) -> tuple[float, float] | None:
    """(issued, expires) as Unix times from a JWT's claims; None without a usable ``exp``."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    expires = claims.get("exp")
    issued = claims.get("iat", claims.get("nbf"))
    if isinstance(expires, bool) or not isinstance(expires, int | float) or not math.isfinite(expires):
        return None
    if isinstance(issued, bool) or not isinstance(issued, int | float) or not issued <= expires:
        issued = min(time.time(), expires)
    return float(issued), float(expires)


def refresh_delay(issued: float, expires: float, now: float) -> float:
    """Seconds from `now` until a token valid from `issued` to `expires` should be refreshed."""
    lifetime = expires - issued
    at = min(issued + REFRESH_AT * lifetime, expires - min(MAX_MARGIN, lifetime / 2))
    return max(at - now, 0.0)


async def fetch_token(source: TokenCallback) -> str | None:
    """Ask the callback (sync or async) for a token."""
    token = source()
    if inspect.isawaitable(token):
        token = await token
    return token or None


async def keep_token_fresh(session: Session, source: TokenCallback, token: str) -> None:
    """For the life of `session`: replace `token` over AUTH before it expires.

    Never raises for a refused refresh or a failing callback (it logs them and tries
    again): if no fresh token gets through, the server closes with 4001 and the
    reconnect asks the callback again.
    """
    last_ask = -math.inf
    while (times := token_times(token)) is not None:
        issued, expires = times
        now = time.time()
        if now >= expires:
            return
        await trio.sleep(max(refresh_delay(issued, expires, now), last_ask + MIN_INTERVAL - now))
        last_ask = time.time()
        try:
            fresh = await fetch_token(source)
        except Exception:  # the application's callback must not end the connection
            log.exception("the token callback failed; trying again")
            continue
        if not fresh or fresh == token:
            continue
        try:
            await session.request(CommandType.AUTH, {"token": fresh})
        except ConnectionLost:
            return
        except CommandError as exc:
            log.warning("the server refused the refreshed token: %s", exc)
            continue
        token = fresh
