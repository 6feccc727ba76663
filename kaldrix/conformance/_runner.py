"""Running the scenarios one after another, each bounded in time, into a Report."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import trio

from ._context import Context, RunState, Target
from ._outcome import Outcome, Report, ScenarioFailed, ScenarioSkipped, Status
from ._registry import SCENARIOS, Scenario
from ._vectors import default_vectors_dir, vector_scenarios


def plan(target: Target, only: Sequence[str] | None = None) -> list[Scenario]:
    """The scenarios of a run, in order: the fixed ones, one per vector, then the floods.

    `only` keeps the scenarios whose name matches one of its fnmatch patterns.
    """
    fixed = list(SCENARIOS)
    scenarios = [
        *(s for s in fixed if not s.last),
        *vector_scenarios(target.vectors or default_vectors_dir()),
        *(s for s in fixed if s.last),
    ]
    if only:
        scenarios = [s for s in scenarios if any(fnmatch.fnmatchcase(s.name, pattern) for pattern in only)]
    return scenarios


def _innermost(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (from nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def run_scenario(scenario: Scenario, target: Target, nursery: trio.Nursery, state: RunState) -> Outcome:
    """Run one scenario within the target's timeout and turn how it ended into an Outcome."""
    ctx = Context(target, nursery, state)
    started = trio.current_time()
    status, reason = Status.PASS, ""
    try:
        with trio.move_on_after(target.timeout) as scope:
            await scenario.run(ctx)
        if scope.cancelled_caught:
            status, reason = Status.FAIL, f"timed out after {target.timeout:g} s waiting for {ctx.waiting}"
    except Exception as raised:  # noqa: BLE001 - every way a scenario ends is a verdict
        exc = _innermost(raised)
        if isinstance(exc, ScenarioFailed):
            status, reason = Status.FAIL, exc.reason
        elif isinstance(exc, ScenarioSkipped):
            status, reason = Status.SKIP, exc.reason
        else:
            status, reason = Status.FAIL, f"the scenario stopped on {exc!r} (an answer it could not read?)"
    finally:
        await ctx.close_all()
    return Outcome(scenario.name, status, reason, trio.current_time() - started)


async def run_conformance(
    target: Target,
    *,
    only: Sequence[str] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> Report:
    """Run every (selected) scenario against `target`; `on_outcome` sees each verdict as it comes."""
    scenarios = plan(target, only)
    state = RunState()
    outcomes: list[Outcome] = []
    async with trio.open_nursery() as nursery:
        try:
            for scenario in scenarios:
                outcome = await run_scenario(scenario, target, nursery, state)
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
        finally:
            await state.close()
            nursery.cancel_scope.cancel()
    return Report(target.url, tuple(outcomes))
