"""The live-gateway state machine of tests/test_state_machine.py on two nodes and Redis.

Every example gets its own key prefix on one redis-server, so it starts from empty
channels like the model does. Clients connect to the two nodes in turn, publishers and
subscribers of a channel are often on different nodes, and a reconnect may move a client
to the other node: the promises are the same as on one node.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from .redis_support import running_redis
from .test_state_machine import MACHINE_SETTINGS, NIGHTLY, GatewayMachine, LiveGateway

NODES = 2
REDIS_MACHINE_SETTINGS = settings(MACHINE_SETTINGS, max_examples=500 if NIGHTLY else 25)
"""Each example starts two nodes; CI runs fewer examples than on one node."""


def test_two_nodes_on_redis_keep_the_delivery_promises_under_any_sequence_of_steps(tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis:

        class OnRedis(GatewayMachine):
            def start_gateways(self) -> LiveGateway:
                prefix = f"kx-machine-{uuid.uuid4().hex[:10]}"
                return LiveGateway(NODES, broker=redis.url, redis_prefix=prefix)

        run_state_machine_as_test(OnRedis, settings=REDIS_MACHINE_SETTINGS)
