"""Pieces the client-side commands (listen, publish) share."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def client_log_on_stderr(command: str, level: int) -> Iterator[None]:
    """Show the client's connection reports on stderr, prefixed with `command`, while it runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"kaldrix {command}: %(message)s"))
    client_log = logging.getLogger("kaldrix.client")
    previous = client_log.level
    client_log.addHandler(handler)
    client_log.setLevel(level)
    try:
        yield
    finally:
        client_log.removeHandler(handler)
        client_log.setLevel(previous)
