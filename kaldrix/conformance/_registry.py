"""The ordered list of scenarios: each one a small named async function of a Context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import attrs

from ._context import Context

ScenarioFunction = Callable[[Context], Awaitable[None]]


@attrs.frozen
class Scenario:
    """One pass/fail line of the report."""

    name: str
    run: ScenarioFunction
    about: str = ""
    last: bool = False
    """Runs after every other scenario: it may make the server wary of this client (a flood)."""


class Registry:
    """Scenarios in the order they were registered, which is the order they run in."""

    def __init__(self) -> None:
        self._scenarios: list[Scenario] = []

    def add(self, name: str, *, last: bool = False) -> Callable[[ScenarioFunction], ScenarioFunction]:
        """Decorator: register `function` under `name` (its docstring says what it checks)."""

        def register(function: ScenarioFunction) -> ScenarioFunction:
            if any(scenario.name == name for scenario in self._scenarios):
                raise ValueError(f"two scenarios are named {name!r}")
            about = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
            self._scenarios.append(Scenario(name, function, about, last))
            return function

        return register

    def __iter__(self) -> Iterator[Scenario]:
        return iter(list(self._scenarios))

    def __len__(self) -> int:
        return len(self._scenarios)


SCENARIOS = Registry()
"""The fixed scenarios; the vector scenarios are added per run from the vector files."""
