"""Drive a ChainSimulator from trio's clock and hand its events to a publisher.

The runner is the only part of the simulator that knows about time or I/O: a thin loop
around the sans-IO chain, so it publishes through the same path as any other producer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from kaldrix.protocol import Envelope

from ._chain import ChainSimulator

NATURAL_TICK = 0.1
"""Seconds between wake-ups at the natural pace: a block's events land within 0.1 s."""
MIN_TICK = 0.001
"""Fastest wake-up in rate mode: beyond 1000 events/s several share one publish."""


def default_tick(rate: float) -> float:
    """About one event per wake-up in rate mode, ten wake-ups a second otherwise."""
    if rate <= 0:
        return NATURAL_TICK
    return min(NATURAL_TICK, max(MIN_TICK, 1.0 / rate))


async def run_simulator(
    publish: Callable[[list[Envelope]], Awaitable[None]],
    *,
    seed: int | None = None,
    block_interval: float = 2.0,
    rate: float = 0.0,
    tick: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a simulated chain until cancelled, publishing each tick's events as one batch.

    Args:
      publish: awaited with every non-empty batch, in order; it is never called
        concurrently with itself, so a slow publisher slows the chain rather than
        reordering it (the next batch then holds everything due meanwhile).
      seed, block_interval, rate: as for `ChainSimulator`.
      tick: seconds between wake-ups; defaults to `default_tick(rate)`.

    Error handling:
      Bad settings raise ValueError before `task_status.started()`. An exception from
      `publish` propagates: the caller's nursery decides what a failed publish means.
    """
    period = default_tick(rate) if tick is None else tick
    if period <= 0:
        raise ValueError("tick must be > 0")
    simulator = ChainSimulator(seed=seed, block_interval=block_interval, rate=rate)
    task_status.started()
    deadline = trio.current_time()
    while True:
        events = simulator.advance(trio.current_time())
        if events:
            await publish(events)
        # Deadlines step from the start so ticks do not drift; after a slow publish,
        # catch up at once instead of replaying every missed tick.
        deadline = max(deadline + period, trio.current_time())
        await trio.sleep_until(deadline)
