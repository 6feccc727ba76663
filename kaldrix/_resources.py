"""Resident memory of this process, for the metrics' resource section.

/proc gives the current RSS cheaply; where it is missing (macOS, BSD) the peak RSS from
getrusage is the closest portable figure, and where that is missing too (Windows) 0 says
"unknown" rather than failing a metrics request.
"""

from __future__ import annotations

import os
import sys

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

STATM = "/proc/self/statm"


def rss_bytes(statm: str = STATM) -> int:
    """Current resident set size in bytes (peak RSS where the current one is unknown)."""
    try:
        with open(statm, "rb") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size in bytes, or 0 where the platform cannot tell."""
    if resource is None:  # pragma: no cover - Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024
