"""Abuse limits, blocking, trusted proxies and the Origin check against a live gateway.

Refusals first, each followed by the proof that everybody else is still served.
Clients come from distinct loopback addresses (127.0.x.y), real socket peers.
"""

from __future__ import annotations

import logging

import orjson
import trio
from trio_websocket import ConnectionRejected

from kaldrix.security import issue_token
from tests.conftest import block_event
from tests.test_security_support import (
    SECRET,
    bearer,
    closed_with,
    http_from,
    rejected,
    still_serves,
    ws_from,
)

ADMIN = {"Authorization": f"Bearer {issue_token('root', 'admin', secret=SECRET, ttl=3600)}"}


def _error(exc: ConnectionRejected) -> str:
    return orjson.loads(exc.body or b"{}")["error"]


# -- handshake rate, connection count, message rate -------------------------------------------


async def test_the_handshake_over_the_window_limit_gets_429_with_retry_after(start_gateway, nursery, caplog):
    caplog.set_level(logging.INFO, logger="kaldrix.audit")
    gateway = await start_gateway(handshake_rate_limit=3, handshake_rate_window=60)
    for _ in range(3):
        await ws_from(nursery, gateway, "127.0.0.2")
    refusal = await rejected(gateway, "127.0.0.2")
    assert refusal.status_code == 429
    assert 1 <= int(dict(refusal.headers)[b"retry-after"]) <= 60
    assert _error(refusal) == "too many handshakes from this address"
    assert any(r.getMessage().startswith("handshake_rate_limited address=127.0.0.2") for r in caplog.records)
    await still_serves(await ws_from(nursery, gateway, "127.0.0.3"))  # another address has its own window


async def test_the_default_handshake_limit_is_the_seeds(start_gateway):
    gateway = await start_gateway()
    assert (gateway.config.handshake_rate_limit, gateway.config.handshake_rate_window) == (100, 60.0)


async def test_too_many_connections_from_one_address_get_429(start_gateway, nursery):
    gateway = await start_gateway(max_connections_per_ip=2)
    first = await ws_from(nursery, gateway, "127.0.0.4")
    await ws_from(nursery, gateway, "127.0.0.4")
    refusal = await rejected(gateway, "127.0.0.4")
    assert (refusal.status_code, _error(refusal)) == (429, "too many connections from this address")
    await still_serves(await ws_from(nursery, gateway, "127.0.0.5"))
    await first.ws.aclose()
    with trio.fail_after(5):
        while gateway.guard.connection_count("127.0.0.4") > 1:
            await trio.sleep(0.01)
    await still_serves(await ws_from(nursery, gateway, "127.0.0.4"))


async def test_a_message_flood_gets_rate_limited_then_closed_with_4029(start_gateway, nursery):
    gateway = await start_gateway(
        jwt_secret=SECRET, allow_anonymous_publish=False, message_rate=2, message_burst=5, rate_limit_strikes=3
    )
    honest = await ws_from(nursery, gateway, "127.0.0.6")
    await honest.subscribe("blocks")
    flooder = await ws_from(nursery, gateway, "127.0.0.7")
    for index in range(12):
        await flooder.send("PING", {"t": index}, message_id=f"flood-{index}")
    code, reason, received = await closed_with(flooder)
    assert (code, reason) == (4029, "rate limited")
    assert [m["type"] for m in received[:5]] == ["PONG"] * 5
    limited = [m["payload"] for m in received if m["type"] == "ERROR"]
    assert len(limited) == 3 and all(p["code"] == "RATE_LIMITED" for p in limited)
    assert [p["ref"] for p in limited] == ["flood-5", "flood-6", "flood-7"]
    await still_serves(honest)
    producer = await ws_from(nursery, gateway, headers=bearer(issue_token("feeder", "publisher", secret=SECRET)))
    for height in range(1, 21):  # producers are not limited
        assert (await producer.publish(block_event(height)))["type"] == "ACK"
    assert [e["payload"]["height"] for e in await honest.events(20)] == list(range(1, 21))


async def test_a_short_burst_over_the_rate_gets_an_error_and_the_connection_stays(start_gateway, nursery):
    gateway = await start_gateway(message_rate=1, message_burst=2, rate_limit_strikes=5, allow_anonymous_publish=False)
    client = await ws_from(nursery, gateway)
    for index in range(3):
        await client.send("PING", {"t": index}, message_id=f"p{index}")
    kinds = [(await client.receive())["type"] for _ in range(3)]
    assert kinds == ["PONG", "PONG", "ERROR"]
    await trio.sleep(1.1)  # the bucket refills at 1 message a second
    await still_serves(client)


async def test_a_channel_name_over_the_configured_length_is_refused(start_gateway, nursery):
    gateway = await start_gateway(max_channel_length=12)
    client = await ws_from(nursery, gateway)
    refused = await client.request("SUBSCRIBE", {"channels": ["blocks", "address:0x0123456789"]})
    assert (refused["payload"]["code"], refused["payload"]["path"]) == ("INVALID_CHANNEL", "payload.channels[1]")
    await client.subscribe("address:0x01")


# -- blocking -------------------------------------------------------------------------------------


async def test_a_configured_blocked_address_and_cidr_get_403(start_gateway, nursery):
    gateway = await start_gateway(blocked_addresses=["127.0.0.8", "127.0.9.0/24"])
    for source in ("127.0.0.8", "127.0.9.1", "127.0.9.254"):
        refusal = await rejected(gateway, source)
        assert (refusal.status_code, _error(refusal)) == (403, "this address is blocked")
    await still_serves(await ws_from(nursery, gateway, "127.0.10.1"))


async def test_admin_blocks_a_cidr_over_websocket_and_its_connections_close_with_4003(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    victims = [await ws_from(nursery, gateway, f"127.0.1.{i}") for i in (1, 2)]
    bystander = await ws_from(nursery, gateway, "127.0.2.1")
    admin = await ws_from(nursery, gateway, "127.0.3.1", headers=ADMIN)
    ack = await admin.request("ADMIN", {"action": "block", "address": "127.0.1.0/24"})
    assert ack["type"] == "ACK"
    assert ack["payload"]["admin"]["closed"] == 2 and ack["payload"]["admin"]["changed"] is True
    assert ack["payload"]["admin"]["blocked"] == [{"address": "127.0.1.0/24", "reason": "blocked by root@127.0.3.1"}]
    for victim in victims:
        assert (await closed_with(victim))[:2] == (4003, "address blocked")
    assert (await rejected(gateway, "127.0.1.3")).status_code == 403
    await still_serves(bystander)

    ack = await admin.request("ADMIN", {"action": "unblock", "address": "127.0.1.0/24"})
    assert ack["payload"]["admin"] == {"blocked": [], "changed": True, "closed": 0}
    await still_serves(await ws_from(nursery, gateway, "127.0.1.3"))


async def test_a_temporary_block_lists_its_expiry_and_lapses(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    admin = await ws_from(nursery, gateway, headers=ADMIN)
    ack = await admin.request("ADMIN", {"action": "block", "address": "127.0.4.4", "duration": 0.3})
    (entry,) = ack["payload"]["admin"]["blocked"]
    assert entry["address"] == "127.0.4.4" and entry["expires"].endswith("Z")
    assert (await rejected(gateway, "127.0.4.4")).status_code == 403
    await trio.sleep(0.4)
    await still_serves(await ws_from(nursery, gateway, "127.0.4.4"))


async def test_admin_input_errors_name_the_field(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    admin = await ws_from(nursery, gateway, headers=ADMIN)
    for payload, path in (
        ({"action": "block"}, "payload.address"),
        ({"action": "block", "address": "10.0.0.300"}, "payload.address"),
        ({"action": "block", "address": "10.0.0.1", "duration": -1}, "payload.duration"),
        ({"action": "unblock", "address": "10.0.0.1", "duration": 5}, "payload.duration"),
    ):
        refused = await admin.request("ADMIN", payload)
        assert (refused["payload"]["code"], refused["payload"]["path"]) == ("INVALID_PAYLOAD", path), payload
    ack = await admin.request("ADMIN", {"action": "unblock", "address": "10.0.0.1"})
    assert ack["payload"]["admin"]["changed"] is False


async def test_admin_http_endpoints_block_list_and_unblock(start_gateway, nursery):
    gateway = await start_gateway(jwt_secret=SECRET)
    victim = await ws_from(nursery, gateway, "127.0.5.5")
    status, _, body = await http_from(gateway, "POST", "/api/admin/block", headers=ADMIN, body=b'{"address": "127.0.5.5"}')
    assert status == 200 and orjson.loads(body)["closed"] == 1
    assert (await closed_with(victim))[0] == 4003
    status, _, body = await http_from(gateway, "GET", "/api/admin/blocked", headers=ADMIN)
    assert status == 200 and [e["address"] for e in orjson.loads(body)["blocked"]] == ["127.0.5.5"]
    status, _, body = await http_from(gateway, "POST", "/api/admin/unblock", headers=ADMIN, body=b'{"address": "127.0.5.5"}')
    assert (status, orjson.loads(body)["changed"]) == (200, True)
    await still_serves(await ws_from(nursery, gateway, "127.0.5.5"))


async def test_admin_http_refuses_bad_requests(start_gateway):
    gateway = await start_gateway(jwt_secret=SECRET)
    cases = [
        ({}, b'{"address": "nope"}', 400),
        ({}, b"[1]", 400),
        ({}, b"not json", 400),
        ({}, b'{"address": "10.0.0.1", "extra": 1}', 400),
        ({}, b'{"address": "' + b"9" * 5000 + b'"}', 413),
        ({"Transfer-Encoding": "chunked"}, b"0\r\n\r\n", 411),
    ]
    for headers, body, expected in cases:
        status, _, _ = await http_from(gateway, "POST", "/api/admin/block", headers={**ADMIN, **headers}, body=body)
        assert status == expected, (headers, body[:40])
    status, answer, _ = await http_from(gateway, "GET", "/api/admin/block", headers=ADMIN)
    assert (status, answer["allow"]) == (405, "POST")
    assert len(gateway.guard.blocklist) == 0


async def test_repeated_auth_failures_ban_the_address_for_a_while(start_gateway, nursery, caplog):
    caplog.set_level(logging.INFO, logger="kaldrix.audit")
    gateway = await start_gateway(jwt_secret=SECRET, auth_failure_limit=3, auth_ban_duration=60)
    bystander = await ws_from(nursery, gateway, "127.0.6.6")  # same address, still connected
    for _ in range(3):
        client = await ws_from(nursery, gateway, "127.0.6.6", headers=bearer("not-a-token"), welcome=False)
        assert (await closed_with(client))[0] == 4001
    assert (await closed_with(bystander))[:2] == (4003, "address blocked")
    refusal = await rejected(gateway, "127.0.6.6")
    assert refusal.status_code == 403
    banned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("banned ")]
    assert banned and "address=127.0.6.6" in banned[0] and "repeated authentication failures" in banned[0]
    await still_serves(await ws_from(nursery, gateway, "127.0.6.7"))


# -- trusted proxies ---------------------------------------------------------------------------------


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(start_gateway, nursery):
    gateway = await start_gateway(trusted_proxies=["127.0.0.1"], blocked_addresses=["127.0.7.7"], handshake_rate_limit=2)
    spoofing = {"X-Forwarded-For": "198.51.100.1"}
    refusal = await rejected(gateway, "127.0.7.7", headers=spoofing)  # cannot hide a blocked peer
    assert refusal.status_code == 403
    for index in range(2):
        await ws_from(nursery, gateway, "127.0.7.8", headers={"X-Forwarded-For": f"198.51.100.{index + 2}"})
    refusal = await rejected(gateway, "127.0.7.8", headers={"X-Forwarded-For": "198.51.100.9"})
    assert refusal.status_code == 429  # nor rotate its way past the rate limit
    assert {conn.remote.rsplit(":", 1)[0] for conn in gateway.connections} == {"127.0.7.8"}


async def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(start_gateway, nursery):
    gateway = await start_gateway(trusted_proxies=["127.0.0.1", "10.0.0.0/8"], blocked_addresses=["198.51.100.7", "2001:db8::/32"])
    for chain in ("198.51.100.7", "203.0.113.5, 198.51.100.7", "198.51.100.7, 10.1.1.1", "2001:db8::7"):
        refusal = await rejected(gateway, "127.0.0.1", headers={"X-Forwarded-For": chain})
        assert refusal.status_code == 403, chain
    # Entries left of the right-most untrusted address may be the client's own invention.
    client = await ws_from(nursery, gateway, "127.0.0.1", headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.5, 10.2.2.2"})
    assert next(conn.remote for conn in gateway.connections).startswith("203.0.113.5:")
    await still_serves(client)
    await still_serves(await ws_from(nursery, gateway, "127.0.0.1", headers={"X-Forwarded-For": "2001:db9::1"}))


# -- Origin --------------------------------------------------------------------------------------------


async def test_a_bad_origin_gets_403_and_allowed_ones_connect(start_gateway, nursery):
    gateway = await start_gateway(allowed_origins=["https://explorer.kaldrix.io", "https://*.wallets.example"])
    for origin in ("https://evil.example", "http://explorer.kaldrix.io", "null", "https://wallets.example.evil.io"):
        refusal = await rejected(gateway, "127.0.8.1", headers={"Origin": origin})
        assert (refusal.status_code, _error(refusal)) == (403, "the Origin is not allowed"), origin
    for origin in ("https://explorer.kaldrix.io", "https://EXPLORER.kaldrix.io:443", "https://a.wallets.example",
                   f"http://127.0.0.1:{gateway.port}"):
        await still_serves(await ws_from(nursery, gateway, "127.0.8.1", headers={"Origin": origin}))
    await still_serves(await ws_from(nursery, gateway, "127.0.8.1"))  # no Origin: allowed by default


async def test_handshakes_without_origin_can_be_refused(start_gateway, nursery):
    gateway = await start_gateway(allow_missing_origin=False)
    assert (await rejected(gateway, "127.0.8.2")).status_code == 403
    await still_serves(await ws_from(nursery, gateway, "127.0.8.2", headers={"Origin": "https://anywhere.example"}))
