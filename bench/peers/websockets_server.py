"""Reference server for the benchmarks: the same fan-out written the idiomatic way with
Python `websockets` (asyncio), speaking the subset of kaldrix's protocol the load
generator uses (WELCOME, SUBSCRIBE/ACK, PUBLISH/ACK, events with channel and offset).

It encodes each event once and fans it out with `websockets.broadcast`, the library's
own no-await broadcast. Run by bench/compare.py from a temporary virtualenv where
`websockets` was installed from PyPI; it is not part of kaldrix.

    python bench/peers/websockets_server.py PORT
"""

import asyncio
import itertools
import json
import sys
import time
from datetime import UTC, datetime

import websockets

EPOCH = "peer-websockets"
offsets: dict[str, int] = {}
members: dict[str, set] = {}
ids = itertools.count(1)


def now() -> str:
    return datetime.fromtimestamp(time.time(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ack(ref, **payload) -> str:
    return json.dumps({"type": "ACK", "payload": {"ref": ref, **payload}, "timestamp": now(), "id": f"a{next(ids)}", "version": "1.0.0"})


async def serve_client(ws) -> None:
    await ws.send(json.dumps({"type": "WELCOME", "payload": {"sessionId": f"s{next(ids)}"}, "version": "1.0.0"}))
    joined = set()
    try:
        async for raw in ws:
            message = json.loads(raw)
            kind, ref, payload = message.get("type"), message.get("id"), message.get("payload") or {}
            if kind == "SUBSCRIBE":
                positions = {}
                for channel in payload["channels"]:
                    members.setdefault(channel, set()).add(ws)
                    joined.add(channel)
                    positions[channel] = {"offset": offsets.get(channel, 0), "epoch": EPOCH, "recovered": False, "replayed": 0}
                await ws.send(ack(ref, channels=positions))
            elif kind == "PUBLISH":
                channel = payload["channel"]
                events = payload.get("events") or [payload["event"]]
                results = []
                for event in events:
                    offset = offsets[channel] = offsets.get(channel, 0) + 1
                    event_id = event.get("id") or f"e{next(ids)}"
                    frame = json.dumps({
                        "type": event["type"], "payload": event["payload"], "timestamp": now(), "id": event_id,
                        "version": "1.0.0", "channel": channel, "offset": offset, "epoch": EPOCH,
                    })
                    websockets.broadcast(members.get(channel, ()), frame)
                    results.append({"id": event_id, "offsets": {channel: offset}})
                await ws.send(ack(ref, results=results))
    except websockets.ConnectionClosed:
        pass
    finally:
        for channel in joined:
            members[channel].discard(ws)


async def main(port: int) -> None:
    async with websockets.serve(serve_client, "127.0.0.1", port, compression=None, max_queue=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
