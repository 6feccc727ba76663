"""What one benchmark run is told: the seed's flags, ours, and scenario files.

A scenario file is TOML whose keys are these option names (dashes or underscores);
flags given on the command line win over the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

__all__ = ["BenchOptions", "load_scenario"]


@attrs.frozen
class BenchOptions:
    clients: int = 100
    duration: float = 10.0
    message_rate: float = 100.0
    """Events published per second."""
    stress_test: bool = False
    """Sweep the message rate upwards from `message_rate` until delivery is no longer clean."""
    output: str = "text"
    log_level: str = "basic"
    url: str | None = None
    """Bench a running server; without it the harness starts its own."""
    publish_url: str | None = None
    """Publish through this server instead (another node on the same broker): the
    subscribers stay on `url`, so latency is measured across nodes."""
    channel: str = "blocks"
    workers: int = 0
    """Load-generator processes (0: one per 2,500 clients, at least 2)."""
    pin: bool = True
    """Pin the server to CPU 0 and the load generator to the others (when there are two or more)."""
    warmup: float = 0.0
    """Seconds of publishing before measuring (latency recorded during warm-up is dropped)."""
    grace: float = 10.0
    """Seconds to wait after the last publish for every client to catch up."""
    churn_rate: float = 0.0
    """Extra connections per second opened, subscribed and closed during the run."""
    connect_concurrency: int = 64
    step_duration: float = 5.0
    """Seconds per rate step of a stress test."""
    step_factor: float = 1.5
    max_steps: int = 10
    clean_p99_ms: float = 50.0
    """A stress step is clean when its p99 is below this and nothing was lost."""
    dialect: str = "kaldrix"
    token: str | None = None
    server_args: tuple[str, ...] = ()
    """Extra `kaldrix serve` flags for a server the harness starts."""
    server_pid: int | None = None
    """With `url`: read this process's RSS and CPU time from /proc."""
    watch_pids: tuple[str, ...] = ()
    """NAME=PID of other server-side processes (a second node, Redis): their CPU share
    over the measured time is reported too, so a broker's cost is not left out."""
    hgrm: str | None = None
    plot: str | None = None
    save: str | None = None
    """Also write the JSON result to this file."""
    label: str | None = None


_FIELDS = {field.name: field for field in attrs.fields(BenchOptions)}


def load_scenario(path: str | Path) -> dict[str, Any]:
    """A scenario file's settings as option overrides; unknown keys are an error."""
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    values = {key.replace("-", "_"): value for key, value in data.items() if key not in ("description", "name")}
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    for key in ("server_args", "watch_pids"):
        if key in values:
            values[key] = tuple(values[key])
    if "label" not in values and "name" in data:
        values["label"] = data["name"]
    return values
