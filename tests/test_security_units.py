"""The security building blocks without sockets: what they refuse first, then what they allow.

Each takes the time as an argument, so windows, buckets and bans are checked at exact
instants instead of by sleeping.
"""

from __future__ import annotations

import ipaddress
import logging

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kaldrix.client._refresh import refresh_delay, token_times
from kaldrix.config import ConfigError, load_config
from kaldrix.security import (
    Blocklist,
    Guard,
    MessageRate,
    OriginPolicy,
    SlidingWindow,
    TokenBucket,
    TrustedProxies,
    Verdict,
    audit,
    audit_line,
    client_key,
    issue_token,
    parse_network,
)
from kaldrix.server._admission import host_of

# -- sliding window ------------------------------------------------------------------------------


def test_sliding_window_refuses_the_event_over_the_limit_until_the_oldest_leaves():
    window = SlidingWindow(limit=3, window=60.0)
    assert [window.acquire("a", t) for t in (0.0, 10.0, 20.0)] == [0.0, 0.0, 0.0]
    assert window.acquire("a", 30.0) == pytest.approx(30.0)  # the event at 0 leaves at 60
    assert window.acquire("a", 59.0) == pytest.approx(1.0)
    assert window.acquire("b", 59.0) == 0.0  # keys are independent
    assert window.acquire("a", 60.0) == 0.0
    assert window.count("a", 60.0) == 3


def test_refused_events_do_not_push_the_retry_further_out():
    window = SlidingWindow(limit=1, window=10.0)
    window.acquire("a", 0.0)
    for t in range(1, 10):
        assert window.acquire("a", float(t)) == pytest.approx(10.0 - t)
    assert window.acquire("a", 10.0) == 0.0


def test_sliding_window_memory_is_bounded_by_its_key_limit():
    window = SlidingWindow(limit=2, window=60.0, max_keys=100)
    for index in range(1000):
        window.acquire(f"client-{index}", float(index) / 1000)
    assert len(window) <= 100
    assert window.acquire("client-999", 1.0) == 0.0  # the most recent ones are kept


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=60), st.integers(1, 5))
@example(stamps=[1.6e-306, 10.0, 10.0], limit=1)  # 1.6e-306 + 10.0 == 10.0: a refusal must never read as a 0 s wait
def test_no_window_of_the_given_length_ever_admits_more_than_the_limit(stamps, limit):
    window = SlidingWindow(limit=limit, window=10.0)
    admitted = [t for t in sorted(stamps) if window.acquire("k", t) == 0.0]
    for start in admitted:
        assert len([t for t in admitted if start <= t < start + 10.0]) <= limit


# -- token bucket and message rate -----------------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.4) is False
    assert bucket.take(0.5) is True  # one token every half second
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # never above the burst


def test_message_rate_refuses_then_closes_a_flood_but_not_an_occasional_burst():
    rate = MessageRate(rate=1.0, burst=2, strikes=3, now=0.0)
    verdicts = [rate.check(0.0) for _ in range(6)]
    assert verdicts == [Verdict.ACCEPT] * 2 + [Verdict.REFUSE] * 3 + [Verdict.CLOSE]

    calm = MessageRate(rate=1.0, burst=2, strikes=3, now=0.0)
    for second in range(0, 100, 10):  # a burst of 3 every 10 s: one refusal each time, never a close
        assert [calm.check(float(second)) for _ in range(3)] == [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.REFUSE]
        assert calm.refused_in_a_row == 1


# -- addresses and the block list -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "nope", "10.0.0.300", "10.0.0.0/33", "2001:db8::/129", "10.0.0.1, 10.0.0.2"])
def test_parse_network_refuses_what_is_no_address(text):
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        parse_network(text)


def test_parse_network_normalises():
    assert str(parse_network("10.1.2.3/8")) == "10.0.0.0/8"
    assert str(parse_network(" 203.0.113.7 ")) == "203.0.113.7/32"
    assert str(parse_network("[2001:db8::1]")) == "2001:db8::1/128"
    assert str(parse_network("::ffff:192.0.2.1")) == "192.0.2.1/32"
    assert str(parse_network("::ffff:192.0.2.0/120")) == "192.0.2.0/24"


def test_client_key_groups_an_ipv6_slash_64():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_blocklist_refuses_bad_entries_and_durations():
    blocklist = Blocklist()
    with pytest.raises(ValueError):
        blocklist.block("10.0.0.0/40", reason="x", now=0.0)
    for duration in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="duration"):
            blocklist.block("10.0.0.1", reason="x", now=0.0, duration=duration)
    assert len(blocklist) == 0


def test_blocklist_matches_addresses_and_cidrs_of_both_families():
    blocklist = Blocklist(["10.0.0.0/8", "203.0.113.7", "2001:db8::/32"])
    for blocked in ("10.1.2.3", "10.255.255.255", "203.0.113.7", "::ffff:10.0.0.1", "2001:db8::1", "2001:db8:ffff::9"):
        assert blocklist.match(blocked, 0.0) is not None, blocked
    for free in ("11.0.0.1", "203.0.113.8", "2001:db9::1", "::1", "unknown", ""):
        assert blocklist.match(free, 0.0) is None, free


def test_temporary_blocks_lapse_and_never_shorten_a_permanent_one():
    blocklist = Blocklist()
    blocklist.block("192.0.2.1", reason="ban", now=0.0, duration=10.0)
    assert blocklist.match("192.0.2.1", 9.9) is not None
    assert blocklist.match("192.0.2.1", 10.0) is None
    assert blocklist.entries(10.0) == []

    blocklist.block("192.0.2.2", reason="operator", now=0.0)
    blocklist.block("192.0.2.2", reason="ban", now=0.0, duration=5.0)
    assert blocklist.match("192.0.2.2", 100.0).reason == "operator"
    blocklist.block("192.0.2.3", reason="ban", now=0.0, duration=5.0)
    blocklist.block("192.0.2.3", reason="operator", now=0.0)
    assert blocklist.match("192.0.2.3", 100.0).reason == "operator"


def test_unblock_lifts_exactly_the_entry_named():
    blocklist = Blocklist(["10.0.0.0/8"])
    assert blocklist.unblock("10.1.2.3") is False  # an address inside a range stays blocked
    assert blocklist.match("10.1.2.3", 0.0) is not None
    assert blocklist.unblock("10.0.0.0/8") is True
    assert blocklist.match("10.1.2.3", 0.0) is None


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=20), st.integers(0, 2**32 - 1))
def test_blocklist_agrees_with_the_standard_library(entries, probe):
    networks = [ipaddress.ip_network((value, prefix), strict=False) for value, prefix in entries]
    blocklist = Blocklist(str(network) for network in networks)
    address = ipaddress.ip_address(probe)
    assert (blocklist.match(str(address), 0.0) is not None) == any(address in network for network in networks)


# -- trusted proxies ---------------------------------------------------------------------------------------


def test_forwarded_for_is_ignored_from_an_untrusted_peer():
    proxies = TrustedProxies(["10.0.0.1"])
    assert proxies.client_address("192.0.2.50", "198.51.100.1") == "192.0.2.50"
    assert TrustedProxies().client_address("10.0.0.1", "198.51.100.1") == "10.0.0.1"


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (None, "10.0.0.1"),
        ("", "10.0.0.1"),
        ("198.51.100.1", "198.51.100.1"),
        ("6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the left part is whatever the client wrote
        ("198.51.100.1, 10.0.0.2", "198.51.100.1"),  # trusted hops are skipped from the right
        ("198.51.100.1:4711, [2001:db8::5]:443", "2001:db8::5"),
        ("198.51.100.1, garbage", "10.0.0.1"),  # a broken chain: only the peer is known
        ("garbage, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.3, 10.0.0.2", "10.0.0.3"),  # nothing but proxies: the farthest one
        ("::ffff:198.51.100.1", "198.51.100.1"),
    ],
)
def test_forwarded_for_from_a_trusted_proxy_gives_the_rightmost_untrusted_address(header, client):
    proxies = TrustedProxies(["10.0.0.0/24"])
    assert proxies.client_address("10.0.0.1", header) == client


# -- Origin -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["explorer.kaldrix.io", "https://", "https://a.example/path", "ftp://a.example", "*.example"])
def test_origin_allowlist_refuses_entries_that_are_not_origins(entry):
    with pytest.raises(ValueError):
        OriginPolicy([entry])


def test_origin_policy():
    policy = OriginPolicy(["https://explorer.kaldrix.io", "https://*.wallets.example", "http://localhost:8080"])
    refused = ["https://evil.example", "http://explorer.kaldrix.io", "null", "https://explorer.kaldrix.io.evil.example",
               "https://wallets.example", "https://x.wallets.example:8443", "http://localhost", "https://user@explorer.kaldrix.io"]
    for origin in refused:
        assert policy.refusal(origin) is not None, origin
    allowed = ["https://explorer.kaldrix.io", "HTTPS://Explorer.Kaldrix.IO:443", "https://a.b.wallets.example",
               "http://localhost:8080", None]
    for origin in allowed:
        assert policy.refusal(origin) is None, origin
    assert policy.refusal("https://gw.example:3000", host="gw.example:3000") is None  # pages of the gateway itself
    assert OriginPolicy().refusal("https://anything.example") is None
    assert OriginPolicy(["*"]).refusal("null") is None
    assert OriginPolicy(allow_missing=False).refusal(None) is not None


# -- the guard ---------------------------------------------------------------------------------------------


def test_guard_checks_block_then_origin_then_connections_then_rate():
    guard = Guard(
        blocked_addresses=("192.0.2.0/24",),
        allowed_origins=("https://ok.example",),
        handshake_rate_limit=2,
        handshake_rate_window=60.0,
        max_connections_per_ip=1,
    )
    assert guard.admit("192.0.2.9", origin="https://ok.example", host=None, now=0.0).status == 403
    assert guard.admit("198.51.100.1", origin="https://bad.example", host=None, now=0.0).event == "origin_refused"
    assert guard.admit("198.51.100.1", origin=None, host=None, now=0.0) is None
    guard.connected("198.51.100.1")
    refusal = guard.admit("198.51.100.1", origin=None, host=None, now=1.0)
    assert (refusal.status, refusal.event) == (429, "too_many_connections")
    guard.disconnected("198.51.100.1")
    assert guard.admit("198.51.100.1", origin=None, host=None, now=2.0) is None
    refusal = guard.admit("198.51.100.1", origin=None, host=None, now=3.0)
    assert (refusal.status, refusal.event, refusal.retry_after) == (429, "handshake_rate_limited", 57)


def test_guard_bans_after_repeated_auth_failures_and_unblock_forgives():
    guard = Guard(auth_failure_limit=3, auth_failure_window=60.0, auth_ban_duration=600.0)
    assert guard.auth_failed("198.51.100.1", 0.0) is None
    assert guard.auth_failed("198.51.100.1", 1.0) is None
    assert guard.auth_failed("198.51.100.2", 1.0) is None
    ban = guard.auth_failed("198.51.100.1", 2.0)
    assert ban is not None and ban.expires_at == 602.0
    assert guard.admit("198.51.100.1", origin=None, host=None, now=3.0).status == 403
    assert guard.admit("198.51.100.1", origin=None, host=None, now=603.0) is None
    assert guard.auth_failed("2001:db8::1", 0.0) is None
    assert guard.auth_failed("2001:db8::2", 0.0) is None
    assert guard.auth_failed("2001:db8::3", 0.0).address == "2001:db8::/64"  # one /64, one client
    assert guard.unblock("2001:db8::/64") is True
    assert guard.auth_failed("2001:db8::1", 1.0) is None  # its failures were forgotten too


def test_failures_spread_over_more_than_the_window_do_not_ban():
    guard = Guard(auth_failure_limit=3, auth_failure_window=10.0)
    assert all(guard.auth_failed("198.51.100.1", t) is None for t in (0.0, 6.0, 12.0, 18.0))


# -- settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"blocked_addresses": ["10.0.0.0/99"]}, "blocked_addresses"),
        ({"trusted_proxies": ["proxy.internal"]}, "trusted_proxies"),
        ({"allowed_origins": ["kaldrix.io"]}, "allowed_origins"),
        ({"handshake_rate_limit": -1}, "handshake_rate_limit"),
        ({"handshake_rate_window": 0}, "handshake_rate_window"),
        ({"message_rate": -5}, "message_rate"),
        ({"message_burst": 0}, "message_burst"),
        ({"max_channel_length": 201}, "max_channel_length"),
        ({"auth_ban_duration": float("inf")}, "auth_ban_duration"),
    ],
)
def test_unusable_security_settings_are_refused_by_name(overrides, setting):
    with pytest.raises(ConfigError, match=setting):
        load_config(environ={}, overrides=overrides)


def test_security_lists_come_from_the_environment_and_the_config_file(tmp_path):
    config_file = tmp_path / "kaldrix.toml"
    config_file.write_text('blocked_addresses = ["10.0.0.0/8", "2001:db8::/32"]\n')
    environ = {"KALDRIX_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8", "KALDRIX_ALLOWED_ORIGINS": "https://a.example"}
    config = load_config(config_file, environ=environ)
    assert config.blocked_addresses == ("10.0.0.0/8", "2001:db8::/32")
    assert config.trusted_proxies == ("127.0.0.1", "10.0.0.0/8")
    assert config.allowed_origins == ("https://a.example",)
    guard = Guard.from_config(config)
    assert guard.admit("2001:db8::1", origin=None, host=None, now=0.0).status == 403


# -- audit -------------------------------------------------------------------------------------------------


def test_audit_lines_quote_hostile_values_onto_one_line():
    line = audit_line("origin_refused", "192.0.2.1", "the Origin is not allowed", origin='x"\nforged_event address=1.1.1.1')
    assert "\n" not in line
    assert line.startswith('origin_refused address=192.0.2.1 reason="the Origin is not allowed" origin="x\\"\\nforged')
    assert len(audit_line("e", "a", "r", sub="s" * 10_000)) < 300


def test_audit_records_carry_their_fields(caplog):
    caplog.set_level(logging.INFO, logger="kaldrix.audit")
    audit("banned", "198.51.100.1", "repeated authentication failures", seconds=600)
    (record,) = caplog.records
    assert record.name == "kaldrix.audit" and record.levelno == logging.WARNING
    assert record.audit == {"event": "banned", "address": "198.51.100.1", "reason": "repeated authentication failures",
                            "seconds": 600}


# -- client-side refresh timing ----------------------------------------------------------------------------


def test_token_times_needs_an_exp():
    assert token_times("not-a-jwt") is None
    assert token_times(issue_token("a", "user", secret="s" * 32, ttl=60, now=1000.0)) == (1000.0, 1060.0)


@pytest.mark.parametrize(
    ("issued", "expires", "now", "delay"),
    [
        (0.0, 86400.0, 0.0, 0.8 * 86400),  # long tokens: at 80 % of their life
        (0.0, 120.0, 0.0, 60.0),  # two minutes: a minute before expiry
        (0.0, 2.0, 0.0, 1.0),  # short tokens: half-way
        (0.0, 100.0, 99.0, 0.0),  # already late: now
    ],
)
def test_refresh_comes_before_expiry(issued, expires, now, delay):
    assert refresh_delay(issued, expires, now) == pytest.approx(delay)


def test_the_gateway_reads_the_address_back_from_a_connections_remote():
    assert host_of("198.51.100.1:5000") == "198.51.100.1"
    assert host_of("[2001:db8::1]:443") == "2001:db8::1"
