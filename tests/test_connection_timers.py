"""The gateway-wide connection timers, and what they spare each idle connection."""

from __future__ import annotations

import trio
import trio.testing

from kaldrix.server._timers import RESOLUTION, ConnectionTimers

from .conftest import raw_websocket


class Recorder:
    """A timed item that notes when it fired and asks for `again` seconds more, if set."""

    def __init__(self, name: str, fired: list[tuple[str, float]], again: float | None = None) -> None:
        self.name = name
        self.fired = fired
        self.again = again

    def on_timer(self, now: float) -> float | None:
        self.fired.append((self.name, now))
        return None if self.again is None else now + self.again


async def test_deadlines_fire_in_order_never_early_and_at_most_a_bucket_late(autojump_clock, nursery):
    timers = ConnectionTimers()
    await nursery.start(timers.run)
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    plan = {"c": 3.0, "a": 1.0, "b": 2.0, "gone": 1.5}
    items = {name: Recorder(name, fired) for name in plan}
    for name, delay in plan.items():
        timers.schedule(items[name], start + delay)
    timers.cancel(items["gone"])
    await trio.sleep(4)
    assert [name for name, _ in fired] == ["a", "b", "c"]
    for name, at in fired:
        assert start + plan[name] <= at <= start + plan[name] + RESOLUTION
    assert len(timers) == 0


async def test_an_earlier_deadline_wakes_the_sleeping_timer(autojump_clock, nursery):
    timers = ConnectionTimers()
    await nursery.start(timers.run)
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    timers.schedule(Recorder("late", fired), start + 60)
    await trio.sleep(1)  # the task now sleeps until the late one
    timers.schedule(Recorder("soon", fired), trio.current_time() + 1)
    await trio.sleep(2)
    assert [name for name, _ in fired] == ["soon"]
    assert fired[0][1] <= start + 2 + RESOLUTION


async def test_an_item_that_asks_again_keeps_firing_and_rescheduling_replaces(autojump_clock, nursery):
    timers = ConnectionTimers()
    await nursery.start(timers.run)
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    ticking = Recorder("tick", fired, again=1.0)
    timers.schedule(ticking, start + 1)
    moved = Recorder("moved", fired)
    timers.schedule(moved, start + 1)
    timers.schedule(moved, start + 10)  # a new plan replaces the old one
    await trio.sleep(3.5)
    assert [name for name, _ in fired] == ["tick", "tick", "tick"]
    assert len(timers) == 2


async def test_a_failing_item_does_not_stop_the_others(autojump_clock, nursery, caplog):
    class Broken:
        def on_timer(self, now: float) -> float | None:
            raise RuntimeError("boom")

    timers = ConnectionTimers()
    await nursery.start(timers.run)
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    timers.schedule(Broken(), start + 1)
    timers.schedule(Recorder("fine", fired), start + 1)
    timers.schedule(Recorder("later", fired), start + 2)
    await trio.sleep(3)
    assert [name for name, _ in fired] == ["fine", "later"]
    assert "a connection timer failed" in caplog.text


async def test_an_idle_connection_runs_two_tasks_and_one_timer_entry(start_gateway):
    gateway = await start_gateway()
    await trio.testing.wait_all_tasks_blocked()
    before = trio.lowlevel.current_statistics().tasks_living
    count = 20
    streams = []
    for _ in range(count):
        stream, _ws = await raw_websocket(gateway.port)
        streams.append(stream)
    while len(gateway.connections) < count:
        await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    # Its own task (the reader) and trio-websocket's; pings, the auth deadline and the
    # writer cost no task while there is nothing to do.
    assert trio.lowlevel.current_statistics().tasks_living - before == 2 * count
    assert len(gateway.timers) == count
    for stream in streams:
        await stream.aclose()
    while gateway.connections:
        await trio.sleep(0.01)
    assert len(gateway.timers) == 0
