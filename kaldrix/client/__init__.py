"""The kaldrix client for trio: subscribe, publish, stay connected, never lose your place.

    async with open_client("ws://127.0.0.1:3000/ws", channels=["blocks"]) as client:
        client.subscribe("NEW_BLOCK", lambda event: print(event.payload.height))
        client.on_gap(lambda gap: print("lost", gap))
        async for event in client.events():
            ...

After a dropped connection it reconnects (exponential backoff, full jitter) and
resubscribes from the last offset it saw on each channel, so the application sees
every event once and in order, or a Gap when the server can no longer fill the hole.
"""

from ._backoff import backoff_ceiling, backoff_delay
from ._client import KaldrixClient, open_client
from ._dispatch import Dispatcher, EventStream
from ._errors import ClientClosed, CommandError, ConnectionLost
from ._options import ClientOptions, ClientState, TokenSource
from ._pacing import Debounce, Pacer, Throttle
from ._positions import Gap, GapReason, Positions

__all__ = [
    "ClientClosed", "ClientOptions", "ClientState", "CommandError", "ConnectionLost",
    "Debounce", "Dispatcher", "EventStream", "Gap", "GapReason", "KaldrixClient",
    "Pacer", "Positions", "Throttle", "TokenSource",
    "backoff_ceiling", "backoff_delay", "open_client",
]
