"""Ops HTTP on the WebSocket port: health, readiness and the landing page.

Each route is a function of the gateway and the request head returning a Response;
`ROUTES` maps (method, path) to it. Features add their routes to that table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import __version__
from ._http import RequestHead, Response

if TYPE_CHECKING:
    from ._gateway import Gateway

Route = Callable[["Gateway", RequestHead], Response]


def healthz(gateway: Gateway, head: RequestHead) -> Response:
    """Liveness: the process serves requests."""
    return Response.json(200, {"status": "ok", "version": __version__})


def readyz(gateway: Gateway, head: RequestHead) -> Response:
    """Readiness: a load balancer should send new clients here."""
    if gateway.draining:
        return Response.json(503, {"ready": False, "reason": "draining"})
    return Response.json(200, {"ready": True})


def landing(gateway: Gateway, head: RequestHead) -> Response:
    """What this server is, for a person who opens it in a browser."""
    text = (
        f"kaldrix {__version__}: the real-time event gateway of the KALDRIX chain.\n"
        "WebSocket endpoint: /ws (protocol v1)\n"
        "Health: /healthz  Readiness: /readyz\n"
    )
    return Response(200, text.encode(), content_type="text/plain; charset=utf-8")


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/healthz"): healthz,
    ("GET", "/readyz"): readyz,
    ("GET", "/"): landing,
}


def answer(gateway: Gateway, head: RequestHead) -> Response:
    """The response to a plain HTTP request (HEAD is answered like GET, without a body)."""
    method = "GET" if head.method == "HEAD" else head.method
    route = ROUTES.get((method, head.path))
    if route is not None:
        return route(gateway, head)
    allowed = sorted({m for (m, path) in ROUTES if path == head.path})
    if allowed:
        return Response.json(405, {"error": "method not allowed"}, headers=(("Allow", ", ".join(allowed)),))
    return Response.json(404, {"error": f"not found: {head.path}"})
