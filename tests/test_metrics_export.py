"""`/metrics`: Prometheus text that prometheus_client's own parser reads, admin only with a key."""

from __future__ import annotations

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kaldrix.metrics_export import CONTENT_TYPE, QUANTILES
from kaldrix.security import issue_token

from .conftest import block_event

SECRET = "metrics-test-secret-that-is-long-enough-for-hs256"


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", "Host: kaldrix", *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
    await stream.send_all("\r\n".join(lines).encode())
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


def families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def token(role: str) -> str:
    return issue_token(f"{role}-1", role, ttl=600, secret=SECRET)


async def test_open_mode_metrics_parse_with_the_expected_families(gateway, connect):
    subscriber = await connect()
    await subscriber.subscribe("blocks")
    producer = await connect()
    for height in range(1, 6):
        await producer.publish(block_event(height))
    await subscriber.events(5)
    status, headers, body = await http_get(gateway.port, "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    found = families(body)
    for name, kind in {
        "kaldrix_build_info": "gauge",
        "kaldrix_delivery_latency_seconds": "summary",
        "kaldrix_fanout_duration_seconds": "summary",
        "kaldrix_connect_duration_seconds": "summary",
        "kaldrix_messages_received": "counter",
        "kaldrix_messages_sent": "counter",
        "kaldrix_events_published": "counter",
        "kaldrix_deliveries": "counter",
        "kaldrix_connections_opened": "counter",
        "kaldrix_connections_failed": "counter",
        "kaldrix_errors": "counter",
        "kaldrix_connections_active": "gauge",
        "kaldrix_subscriptions": "gauge",
        "kaldrix_subscribed_channels": "gauge",
        "process_resident_memory_bytes": "gauge",
    }.items():
        assert name in found, name
        assert found[name].type == kind, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in found.values() for s in f.samples}
    assert samples[("kaldrix_events_published_total", ())] == 5
    assert samples[("kaldrix_deliveries_total", ())] == 5
    assert samples[("kaldrix_connections_active", ())] == 2
    assert samples[("kaldrix_subscriptions", ())] == 1
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("kaldrix_errors_total", (("code", "RATE_LIMITED"),))] == 0
    delivery = [s for s in found["kaldrix_delivery_latency_seconds"].samples]
    quantiles = {float(s.labels["quantile"]): s.value for s in delivery if "quantile" in s.labels}
    assert set(quantiles) == set(QUANTILES)
    assert all(0 < value < 5 for value in quantiles.values())
    assert sorted(quantiles.values()) == [quantiles[q] for q in sorted(quantiles)]
    count = next(s.value for s in delivery if s.name.endswith("_count"))
    assert count >= 5  # the deliveries, plus every ACK whose write was timed


async def test_empty_summaries_have_no_quantiles_but_still_parse(gateway):
    status, _, body = await http_get(gateway.port, "/metrics")
    assert status == 200
    delivery = families(body)["kaldrix_delivery_latency_seconds"]
    assert {s.name for s in delivery.samples} == {
        "kaldrix_delivery_latency_seconds_count",
        "kaldrix_delivery_latency_seconds_sum",
    }


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not-a-token"}, 401),
        ({"Authorization": f"Bearer {token('user')}"}, 403),
        ({"Authorization": f"Bearer {token('publisher')}"}, 403),
        ({"Authorization": f"Bearer {token('admin')}"}, 200),
    ],
)
async def test_admin_required_when_a_key_is_configured(start_gateway, headers, status):
    gateway = await start_gateway(jwt_secret=SECRET)
    got, response_headers, body = await http_get(gateway.port, "/metrics", headers)
    assert got == status
    if status == 200:
        assert "kaldrix_connections_active" in families(body)
    else:
        assert "kaldrix_" not in body
    if status == 401:
        assert response_headers["www-authenticate"].startswith("Bearer")


async def test_only_get_is_allowed(gateway):
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    await stream.send_all(b"POST /metrics HTTP/1.1\r\nHost: k\r\nContent-Length: 0\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            data += chunk
    assert data.startswith(b"HTTP/1.1 405")
