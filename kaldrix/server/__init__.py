"""The kaldrix server: gateway, router, per-connection tasks, ops HTTP on the same port."""

from ._gateway import Gateway
from ._router import Router, RouterRequest

__all__ = ["Gateway", "Router", "RouterRequest"]
