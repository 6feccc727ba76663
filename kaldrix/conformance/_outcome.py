"""What a scenario ends with, and the report of a whole run."""

from __future__ import annotations

import enum
from typing import Any

import attrs


class ScenarioFailed(Exception):
    """The server broke the contract; the message says how, with the frames involved."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ScenarioSkipped(Exception):
    """The scenario cannot be judged against this server (missing rights or settings)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Status(enum.StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@attrs.frozen
class Outcome:
    """One scenario's verdict."""

    name: str
    status: Status
    reason: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        """The one-line form the command prints: `PASS name` or `FAIL name: reason`."""
        if self.status is Status.PASS:
            return f"PASS {self.name}"
        return f"{self.status} {self.name}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "status": str(self.status), "seconds": round(self.seconds, 4)}
        if self.reason:
            entry["reason"] = self.reason
        return entry


@attrs.frozen
class Report:
    """Every outcome of one run, in the order the scenarios ran."""

    url: str
    outcomes: tuple[Outcome, ...]

    def count(self, status: Status) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status is status)

    @property
    def passed(self) -> int:
        return self.count(Status.PASS)

    @property
    def failed(self) -> int:
        return self.count(Status.FAIL)

    @property
    def skipped(self) -> int:
        return self.count(Status.SKIP)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def summary(self) -> str:
        """The closing line, exactly `N passed, N failed, N skipped`."""
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.status is Status.FAIL]

    def by_name(self) -> dict[str, Outcome]:
        return {outcome.name: outcome for outcome in self.outcomes}

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "scenarios": [outcome.to_json() for outcome in self.outcomes],
            "summary": {"passed": self.passed, "failed": self.failed, "skipped": self.skipped},
            "ok": self.ok,
        }
