"""Ops HTTP on the WebSocket port: health, readiness and the landing page.

Each route is a function of the gateway and the request head returning a Response;
`ROUTES` maps (method, path) to it. Features add their routes to that table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .. import __version__
from ..web import WEB_ROUTES  # landing page, /debug, /kaldrix.js and their files
from . import _admin
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
    if not gateway.broker_ready:
        return Response.json(503, {"ready": False, "reason": "broker unavailable"}, headers=(("Retry-After", "1"),))
    return Response.json(200, {"ready": True})


def metrics(gateway: Gateway, head: RequestHead) -> Response:
    """Prometheus text exposition; admin only when the server verifies tokens."""
    from ..metrics_export import metrics_response  # prometheus_client loads on the first scrape

    return metrics_response(gateway, head)


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/healthz"): healthz,
    ("GET", "/readyz"): readyz,
    ("GET", "/metrics"): metrics,
    **WEB_ROUTES,
}

StreamRoute = Callable[["Gateway", RequestHead, trio.abc.Stream, str], Awaitable[Response]]
"""A route that reads the request body from the stream itself; it also gets the socket peer's address."""

STREAM_ROUTES: dict[tuple[str, str], StreamRoute] = {
    ("POST", "/api/admin/block"): _admin.block_route,
    ("POST", "/api/admin/unblock"): _admin.unblock_route,
    ("GET", "/api/admin/blocked"): _admin.list_route,
}


async def answer_stream(gateway: Gateway, head: RequestHead, stream: trio.abc.Stream, peer_host: str) -> Response:
    """The response to a plain HTTP request, for routes of either table."""
    route = STREAM_ROUTES.get(("GET" if head.method == "HEAD" else head.method, head.path))
    if route is not None:
        return await route(gateway, head, stream, peer_host)
    return answer(gateway, head)


def answer(gateway: Gateway, head: RequestHead) -> Response:
    """The response to a plain HTTP request (HEAD is answered like GET, without a body)."""
    method = "GET" if head.method == "HEAD" else head.method
    route = ROUTES.get((method, head.path))
    if route is not None:
        return route(gateway, head)
    allowed = sorted({m for (m, path) in [*ROUTES, *STREAM_ROUTES] if path == head.path})
    if allowed:
        return Response.json(405, {"error": "method not allowed"}, headers=(("Allow", ", ".join(allowed)),))
    return Response.json(404, {"error": f"not found: {head.path}"})
