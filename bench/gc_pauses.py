"""Run a kaldrix gateway and report how long Python's garbage collector stops it.

Every collection stops the whole server, so a long one delays every delivery in flight:
with thousands of connections, a full (generation 2) collection is where the tail of the
delivery latency comes from. Start this, point the bench harness at it, read the lines:

    taskset -c 0 python bench/gc_pauses.py --port 4567 --seconds 90 &
    taskset -c 1 python -m kaldrix bench --scenario bench/scenarios/idle-10k.toml \\
        --url ws://127.0.0.1:4567/ws --no-pin

Every 5 s it prints, per generation, the number of collections, the longest and the total
pause in milliseconds, and the open connections. `--threshold 700,10,100` tries other
`gc.set_threshold` values.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import trio

from kaldrix.config import load_config
from kaldrix.server import Gateway


class PauseLog:
    """Collection pauses by generation, from gc.callbacks."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.setdefault(info["generation"], []).append(time.perf_counter() - self._started)

    def line(self) -> str:
        parts = []
        for generation, pauses in sorted(self.pauses.items()):
            parts.append(
                f"gen{generation}: {len(pauses)} collections, longest {max(pauses) * 1000:.1f} ms, "
                f"total {sum(pauses) * 1000:.0f} ms"
            )
        return "; ".join(parts) or "no collections"


async def serve(port: int, seconds: float, log: PauseLog) -> None:
    config = load_config(
        environ={},
        overrides={
            "port": port,
            "simulate": False,
            "allow_anonymous_publish": True,
            "handshake_rate_limit": 0,
            "max_connections_per_ip": 0,
            "message_rate": 0,
            "log_level": "warning",
        },
    )
    async with trio.open_nursery() as nursery:
        gateway = await nursery.start(Gateway(config).run)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await trio.sleep(5)
            print(f"t={time.monotonic() - started:3.0f}s connections={len(gateway.connections)} {log.line()}", flush=True)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=4567)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--threshold", help="gc.set_threshold values, e.g. 700,10,100")
    args = parser.parse_args()
    if args.threshold:
        gc.set_threshold(*(int(part) for part in args.threshold.split(",")))
    log = PauseLog()
    gc.callbacks.append(log)
    trio.run(serve, args.port, args.seconds, log)


if __name__ == "__main__":
    main()
