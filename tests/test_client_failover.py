"""The Python client across several nodes sharing a Redis broker: when its node goes away
it moves to the next URL and resumes from its last offsets, with no gap and no repeat."""

from __future__ import annotations

import uuid

import trio

from kaldrix.client import open_client
from kaldrix.server import Gateway

from .conftest import block_event, make_config
from .test_client import FAST, Recorder, quiet


async def start_nodes(nursery: trio.Nursery, redis_url: str, count: int) -> list[Gateway]:
    prefix = f"kx-failover-{uuid.uuid4().hex[:10]}"
    nodes = []
    for _ in range(count):
        node = Gateway(make_config(broker=redis_url, redis_prefix=prefix))
        await nursery.start(node.run)
        nodes.append(node)
    return nodes


def test_fallback_urls_are_a_tuple() -> None:
    from kaldrix.client import ClientOptions

    options = ClientOptions(url="ws://a/ws", fallback_urls=["ws://b/ws"])
    assert options.fallback_urls == ("ws://b/ws",)


async def test_client_moves_to_another_node_and_recovers_without_a_gap(redis_server, nursery) -> None:
    node_a, node_b = await start_nodes(nursery, redis_server.url, 2)
    total = 60
    gaps = Recorder()
    received = Recorder()
    with trio.fail_after(30):
        async with (
            open_client(node_a.url, fallback_urls=[node_b.url], channels=["blocks"], **FAST) as subscriber,
            open_client(node_b.url, **FAST) as producer,
        ):
            subscriber.on_gap(gaps)
            subscriber.subscribe("NEW_BLOCK", received)
            first_session = subscriber.state.session_id

            async def produce() -> None:
                for height in range(1, total + 1):
                    await producer.publish(block_event(height))
                    await trio.sleep(0.003)

            async with trio.open_nursery() as producing:
                producing.start_soon(produce)
                await received.wait_for(20)
                await node_a.shutdown(code=1012)  # node A goes away mid-stream
            await received.wait_for(total)
            await quiet()
            assert subscriber.url == node_b.url
            assert subscriber.state.session_id != first_session
    assert [event.offset for event in received.items] == list(range(1, total + 1))
    assert [event.payload.height for event in received.items] == list(range(1, total + 1))
    assert len({event.epoch for event in received.items}) == 1
    assert gaps.items == []
