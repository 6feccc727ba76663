"""The ops routes of the web pages: the landing page, the debug panel and their files.

`WEB_ROUTES` is merged into the server's route table (kaldrix/server/_ops.py). The server
imports this module while it is itself being imported, so the server's names are imported
inside the functions that use them, never at the top of this module.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import __version__
from ._assets import CONTENT_SECURITY_POLICY, CONTENT_TYPES, Asset, load_asset, protocol_text, readme_text

if TYPE_CHECKING:
    from ..server._gateway import Gateway
    from ..server._http import RequestHead, Response

__all__ = ["STATIC_FILES", "WEB_ROUTES", "landing_links", "render_landing"]

SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    # The debug panel may be opened as /debug?token=...: never leak that URL onward.
    ("Referrer-Policy", "no-referrer"),
)

STATIC_FILES = {
    "/debug": "debug.html",
    "/debug.js": "debug.js",
    "/kaldrix.js": "kaldrix.js",
    "/kaldrix.css": "kaldrix.css",
    "/favicon.svg": "favicon.svg",
}
"""URL path -> file under kaldrix/web, served as they are."""

PROTOCOL_PATH = "/spec/PROTOCOL.md"
README_PATH = "/README.md"

# (path, label, what it is), in page order; each is listed when the server answers it.
_LINKS = (
    (
        "/debug",
        "Debug panel",
        "live connection status, latency, channels, event log and, with an admin token, server metrics",
    ),
    ("/metrics", "Metrics", "the server's metrics for scrapers"),
    ("/healthz", "Health", "liveness, with the server's version"),
    ("/readyz", "Readiness", "whether this node takes new clients"),
    (PROTOCOL_PATH, "Protocol", "the wire protocol, version 1 (Markdown)"),
    (README_PATH, "README", "how to run and use kaldrix"),
)

Route = Callable[["Gateway", "RequestHead"], "Response"]


def _response(status: int, asset: Asset) -> Response:
    from ..server._http import Response

    return Response(status, asset.body, content_type=asset.content_type, headers=SECURITY_HEADERS)


def _not_found(path: str) -> Response:
    from ..server._http import Response

    return Response.json(404, {"error": f"not found: {path}"})


def _static(name: str) -> Route:
    def serve(gateway: Gateway, head: RequestHead) -> Response:
        return _response(200, load_asset(name))

    serve.__doc__ = f"kaldrix/web/{name}, from memory."
    return serve


def _optional(find: Callable[[], Asset | None], path: str) -> Route:
    def serve(gateway: Gateway, head: RequestHead) -> Response:
        asset = find()
        return _response(200, asset) if asset is not None else _not_found(path)

    return serve


def landing_links(served: Callable[[str], bool]) -> list[tuple[str, str, str]]:
    """The landing page's links, leaving out any path the server would not answer."""
    return [link for link in _LINKS if served(link[0])]


def render_landing(version: str, links: list[tuple[str, str, str]]) -> bytes:
    """The landing page: the template with the version and the links filled in."""
    items = "\n".join(
        f'      <li><a href="{html.escape(path)}">{html.escape(label)}</a> '
        f"<code>{html.escape(path)}</code> <span>{html.escape(about)}</span></li>"
        for path, label, about in links
    )
    template = load_asset("index.html").body.decode()
    page = template.replace("{{version}}", html.escape(version)).replace("{{links}}", items)
    return page.encode()


def _is_served(path: str) -> bool:
    from ..server._ops import ROUTES

    if path == PROTOCOL_PATH:
        return protocol_text() is not None
    if path == README_PATH:
        return readme_text() is not None
    return ("GET", path) in ROUTES


def landing(gateway: Gateway, head: RequestHead) -> Response:
    """What this server is, for a person who opens it in a browser."""
    body = render_landing(__version__, landing_links(_is_served))
    return _response(200, Asset(body, CONTENT_TYPES[".html"]))


WEB_ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/"): landing,
    **{("GET", path): _static(name) for path, name in STATIC_FILES.items()},
    ("GET", PROTOCOL_PATH): _optional(protocol_text, PROTOCOL_PATH),
    ("GET", README_PATH): _optional(readme_text, README_PATH),
}
