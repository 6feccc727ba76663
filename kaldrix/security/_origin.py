"""Which web pages may open a WebSocket to the gateway (cross-site WebSocket hijacking).

Browsers send an ``Origin`` header with every WebSocket handshake and let any page
connect anywhere; only the server can refuse a page it does not know. Non-browser
clients usually send no Origin; whether they may connect is a separate setting.

An allowlist entry is an origin (``https://explorer.kaldrix.io``), a wildcard for its
subdomains (``https://*.kaldrix.io``), or ``*`` for any origin. An empty allowlist
accepts every origin. A page served by the gateway itself (Origin equal to the Host it
was requested from) is always accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normal_origin(text: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, default port dropped; None when not an origin."""
    text = text.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def check_allowlist_entry(entry: str) -> str:
    """The normal form of one allowlist entry; ValueError when it is not one."""
    if entry.strip() == "*":
        return "*"
    candidate = entry.replace("://*.", "://wildcard-placeholder.", 1)
    normal = normal_origin(candidate)
    if normal is None:
        raise ValueError(f"not an origin (scheme://host[:port]) or a *. wildcard: {entry!r}")
    return normal.replace("://wildcard-placeholder.", "://*.", 1)


class OriginPolicy:
    """The allowlist and the rule for handshakes without Origin."""

    def __init__(self, allowed: Iterable[str] = (), *, allow_missing: bool = True) -> None:
        entries = [check_allowlist_entry(entry) for entry in allowed]
        self.allow_any = not entries or "*" in entries
        self.allow_missing = allow_missing
        self._exact = {entry for entry in entries if "://*." not in entry}
        # "https://*.kaldrix.io" -> ("https://", ".kaldrix.io", port suffix)
        self._wildcards = []
        for entry in entries:
            if "://*." in entry:
                scheme, rest = entry.split("://*.", 1)
                domain, _, port = rest.partition(":")
                self._wildcards.append((f"{scheme}://", f".{domain}", f":{port}" if port else ""))

    def refusal(self, origin: str | None, host: str | None = None) -> str | None:
        """Why a handshake with this Origin (and Host) is refused, or None to accept it."""
        if origin is None:
            return None if self.allow_missing else "a handshake without an Origin header is not accepted here"
        if self.allow_any:
            return None
        normal = normal_origin(origin)
        if normal is None:
            return "the Origin is not allowed"  # "null" (sandboxed pages, files) and garbage
        if normal in self._exact or self._same_site(normal, host) or self._wildcard(normal):
            return None
        return "the Origin is not allowed"

    def _wildcard(self, origin: str) -> bool:
        for scheme, domain, port in self._wildcards:
            if not origin.startswith(scheme):
                continue
            rest = origin[len(scheme):]
            host, _, given_port = rest.partition(":") if not rest.startswith("[") else (rest, "", "")
            if (f":{given_port}" if given_port else "") == port and host.endswith(domain) and len(host) > len(domain):
                return True
        return False

    @staticmethod
    def _same_site(origin: str, host: str | None) -> bool:
        """Pages the gateway served itself: Origin's host and port equal the Host header."""
        if not host:
            return False
        scheme = origin.split("://", 1)[0]
        return normal_origin(f"{scheme}://{host.strip()}") == origin
