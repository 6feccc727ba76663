"""Who may open a WebSocket: the checks made on the request head, before the upgrade.

A refusal is an HTTP response (403, 429, ...) sent instead of the 101, so a refused
client costs no WebSocket state at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._http import RequestHead, Response

if TYPE_CHECKING:
    from ._gateway import Gateway


def client_address(gateway: Gateway, head: RequestHead, peer_host: str) -> str:
    """The address the client connects from, as far as the gateway can trust it."""
    return peer_host


def admit(gateway: Gateway, head: RequestHead, client_host: str) -> Response | None:
    """None to go on with the upgrade, or the response that refuses it."""
    return None
