"""The protocol v1 conformance runner: drives any server over the wire alone.

Scenarios are small named async functions of a Context, registered in order; each
ends as PASS, FAIL (ScenarioFailed, with the frames that broke the contract) or SKIP
(ScenarioSkipped: this run lacks the rights or the server the setting to judge it).
Only trio-websocket and plain JSON are used, never the server's own code, so the
same runner judges other implementations of the protocol.
"""

from . import _basics, _delivery, _errors  # noqa: F401 - registers the scenarios, in this order
from ._context import DEFAULT_TIMEOUT, Context, Target
from ._outcome import Outcome, Report, ScenarioFailed, ScenarioSkipped, Status
from ._peer import Peer
from ._registry import SCENARIOS, Scenario
from ._runner import plan, run_conformance
from ._vectors import default_vectors_dir, load_vectors

__all__ = [
    "DEFAULT_TIMEOUT", "SCENARIOS", "Context", "Outcome", "Peer", "Report", "Scenario",
    "ScenarioFailed", "ScenarioSkipped", "Status", "Target",
    "default_vectors_dir", "load_vectors", "plan", "run_conformance",
]
