"""A simulated KALDRIX chain, so a fresh gateway shows live, believable events.

`ChainSimulator` is the sans-IO chain; `run_simulator` drives it from trio's clock and
publishes through the same path as any producer.
"""

from ._chain import ChainSimulator
from ._runner import run_simulator

__all__ = ["ChainSimulator", "run_simulator"]
