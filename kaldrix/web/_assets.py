"""The files of the web pages: read from the package once, typed, and kept in memory.

They are package data (kaldrix/web ships inside the wheel), so they are read with
importlib.resources and work from a zip or an installed wheel as well as a checkout.
Package files never change while the process runs: each is read once and the bytes are
shared by every response. The protocol text and the README are not package data; they are
found next to the package in a source checkout, or in the installed distribution's
metadata, or not at all.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
from pathlib import Path

import attrs

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "CONTENT_TYPES",
    "Asset",
    "load_asset",
    "protocol_text",
    "readme_text",
]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/markdown; charset=utf-8",
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        # 'self' covers ws:// to the same host and port (CSP level 3): the panel's only socket.
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
"""Only this server's own files and socket: no CDN, no inline code, no remote anything."""

_PROTOCOL_PATH = Path(__file__).resolve().parents[2] / "spec" / "PROTOCOL.md"


@attrs.frozen
class Asset:
    """One file as it is sent: its bytes and their content type."""

    body: bytes
    content_type: str


def content_type(name: str) -> str:
    """The Content-Type for a file name, by extension; unknown ones are opaque bytes."""
    return CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")


@functools.cache
def load_asset(name: str) -> Asset:
    """The package file kaldrix/web/`name`; FileNotFoundError if it is not shipped."""
    body = importlib.resources.files(__package__).joinpath(name).read_bytes()
    return Asset(body, content_type(name))


@functools.cache
def protocol_text(path: Path = _PROTOCOL_PATH) -> Asset | None:
    """spec/PROTOCOL.md when it sits next to the package (a source checkout), else None."""
    try:
        return Asset(path.read_bytes(), CONTENT_TYPES[".md"])
    except OSError:
        return None


@functools.cache
def readme_text(distribution: str = "kaldrix") -> Asset | None:
    """The README, as the installed distribution's long description; None when not installed."""
    try:
        description = importlib.metadata.metadata(distribution).json.get("description")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not isinstance(description, str) or not description.strip():
        return None
    return Asset(description.encode(), CONTENT_TYPES[".md"])
