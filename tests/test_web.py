"""The landing page, the debug panel and the browser client, in a real Chromium.

The gateway runs in the test's trio nursery; Chromium (Debian's, driven by Playwright's
sync API on its own thread) loads the pages from it over loopback like any browser.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kaldrix import __version__
from kaldrix.security import issue_token
from kaldrix.server import Gateway
from kaldrix.web import (
    CONTENT_SECURITY_POLICY,
    STATIC_FILES,
    landing_links,
    load_asset,
    protocol_text,
    readme_text,
    render_landing,
)

from .conftest import StartGateway, make_config
from .web_support import BrowserThread, BrowserUnavailable, Page, browser_missing, http_get, skip_or_fail

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CONNECTED = '#status[data-status="connected"]'
BLOCKS_ROW = 'tr[data-channel="blocks"]'
SIMULATED = {"simulate": True, "sim_block_interval": 0.2}

# Collect every event the panel's client admits on `blocks`, through its public API.
COLLECT_BLOCKS = """() => {
  window.blockOffsets = [];
  window.kaldrixPanel.client.on("*", (event) => {
    if (event.channel === "blocks") window.blockOffsets.push([event.offset, event.epoch]);
  });
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserThread]:
    reason = browser_missing()
    if reason:
        skip_or_fail(reason)
    thread = BrowserThread()
    try:
        thread.start()
    except BrowserUnavailable as exc:  # a broken install is a missing browser too
        thread.stop()
        skip_or_fail(str(exc))
    yield thread
    thread.stop()


async def events_on(page: Page, channel: str) -> int:
    return int(await page.inner_text(f'tr[data-channel="{channel}"] td:nth-child(2)'))


async def wait_events(page: Page, channel: str, at_least: int) -> None:
    await page.wait_for_function(
        "([channel, n]) => Number(document.querySelector(`tr[data-channel='${channel}'] td:nth-child(2)`).textContent) >= n",
        arg=[channel, at_least],
    )


async def log_rows(page: Page) -> int:
    return await page.run(lambda p: p.eval_on_selector_all("#log tr", "rows => rows.length"))


async def close(browser: BrowserThread, page: Page, gateway: Gateway) -> None:
    """Close the page and let the gateway see its sockets go: cancelling a gateway in the
    middle of a close handshake would wait out the close timeout."""
    await browser.close_page(page)
    with trio.fail_after(5):
        while gateway.connections:
            await trio.sleep(0.01)


def assert_no_page_errors(page: Page) -> None:
    """No uncaught exception, and nothing the Content-Security-Policy had to refuse."""
    bad = [line for line in page.console if line.startswith("pageerror") or "Content Security Policy" in line]
    assert not bad, bad


# -- HTTP: types, policy, packaging ----------------------------------------------------------


async def test_pages_and_client_are_served_with_their_types(gateway: Gateway) -> None:
    expected = {
        "/kaldrix.js": "text/javascript; charset=utf-8",
        "/debug": "text/html; charset=utf-8",
        "/debug.js": "text/javascript; charset=utf-8",
        "/kaldrix.css": "text/css; charset=utf-8",
        "/favicon.svg": "image/svg+xml",
        "/": "text/html; charset=utf-8",
        "/spec/PROTOCOL.md": "text/markdown; charset=utf-8",
    }
    assert gateway.port is not None
    for path, content_type in expected.items():
        status, headers, body = await http_get(gateway.port, path)
        assert status == 200, path
        assert headers["content-type"] == content_type, path
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert headers["x-content-type-options"] == "nosniff"
        assert int(headers["content-length"]) == len(body) > 0
        if path in STATIC_FILES:
            assert body == load_asset(STATIC_FILES[path]).body
    # HEAD: the same head, no body.
    status, headers, body = await http_get(gateway.port, "/debug", method="HEAD")
    assert (status, headers["content-type"], body) == (200, "text/html; charset=utf-8", b"")
    _, _, client = await http_get(gateway.port, "/kaldrix.js")
    assert b"export class KaldrixClient" in client
    assert not re.search(rb"^\s*import\b", client, re.MULTILINE)  # no dependencies


def test_policy_and_pages_allow_no_remote_source() -> None:
    directives = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'"
    for name in ("debug.html", "debug.js", "kaldrix.js", "kaldrix.css", "index.html"):
        text = load_asset(name).body.decode()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    # The panel loads only these: the module client, its own script and the stylesheet.
    page = load_asset("debug.html").body.decode()
    assert 'src="/debug.js"' in page and 'href="/kaldrix.css"' in page
    assert 'from "/kaldrix.js"' in load_asset("debug.js").body.decode()


def test_protocol_text_is_the_checkout_file_and_optional() -> None:
    spec = Path(__file__).resolve().parents[1] / "spec" / "PROTOCOL.md"
    found = protocol_text()
    assert found is not None and found.body == spec.read_bytes()
    assert protocol_text(spec.with_name("MISSING.md")) is None
    assert readme_text("no-such-distribution-kaldrix") is None


def test_landing_links_only_what_the_server_answers() -> None:
    everything = [path for path, _, _ in landing_links(lambda path: True)]
    assert everything[:4] == ["/debug", "/metrics", "/healthz", "/readyz"]
    # Installed from a wheel: no spec/ beside the package, the README stands in.
    wheel = [path for path, _, _ in landing_links(lambda path: path != "/spec/PROTOCOL.md")]
    assert "/README.md" in wheel and "/spec/PROTOCOL.md" not in wheel
    page = render_landing("1.2.3<b>", landing_links(lambda path: path in ("/debug", "/healthz"))).decode()
    assert "1.2.3&lt;b&gt;" in page and "<b>" not in page
    assert 'href="/debug"' in page and 'href="/healthz"' in page and 'href="/metrics"' not in page


# -- in the browser ----------------------------------------------------------------------------


async def test_landing_page_links_work(gateway: Gateway, browser: BrowserThread) -> None:
    page = await browser.new_page()
    base = f"http://127.0.0.1:{gateway.port}"
    await page.goto(base + "/")
    assert __version__ in await page.inner_text("h1")
    links = await page.run(
        lambda p: p.eval_on_selector_all(".links a", "links => links.map(a => a.getAttribute('href'))")
    )
    assert {"/debug", "/metrics", "/healthz", "/spec/PROTOCOL.md"} <= set(links)
    for link in links:
        status = await page.run(lambda p, link=link: p.request.get(base + link).status)
        assert status == 200, link
    await page.click("text=Debug panel")
    await page.wait_for_selector(CONNECTED)
    assert await page.run(lambda p: p.url) == base + "/debug"
    assert_no_page_errors(page)
    await close(browser, page, gateway)


async def test_panel_follows_blocks_across_restarts(
    nursery: trio.Nursery, start_gateway: StartGateway, browser: BrowserThread
) -> None:
    gateway = await start_gateway(**SIMULATED)
    port = gateway.port
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{port}/debug")
    await page.wait_for_selector(CONNECTED)
    assert await page.inner_text("#conn-status") == "connected"
    await page.evaluate(COLLECT_BLOCKS)

    # Join: NEW_BLOCK events from the simulator arrive, with their latency.
    await page.click(f"{BLOCKS_ROW} button")
    await page.wait_for_selector(f'{BLOCKS_ROW}[data-joined="true"]')
    await wait_events(page, "blocks", 3)
    await page.wait_for_selector('#log tr[data-type="NEW_BLOCK"]')
    await page.wait_for_function("() => /^-?\\d/.test(document.querySelector('#delivery').textContent)")
    await page.wait_for_function("() => /^\\d/.test(document.querySelector('#rtt').textContent)")

    # The log filters by type and pauses.
    await page.select_option("#log-filter", "NEW_BLOCK")
    types = await page.run(
        lambda p: p.eval_on_selector_all("#log tr", "rows => rows.map(r => r.dataset.type)")
    )
    assert types and set(types) == {"NEW_BLOCK"}
    await page.click("#pause")
    frozen = await log_rows(page)
    await wait_events(page, "blocks", await events_on(page, "blocks") + 2)
    assert await log_rows(page) == frozen
    assert "paused" in await page.inner_text("#log-count")
    await page.click("#pause")
    assert await log_rows(page) > frozen
    await page.select_option("#log-filter", "default")

    # Restart on the same port, keeping the broker: reconnecting, connected, no gap.
    await gateway.shutdown()
    await page.wait_for_selector('#status[data-status="reconnecting"]')
    before = await events_on(page, "blocks")
    gateway = Gateway(make_config(port=port, **SIMULATED), broker=gateway.broker)
    await nursery.start(gateway.run)
    await page.wait_for_selector(CONNECTED)
    await wait_events(page, "blocks", before + 3)
    assert await page.inner_text("#gaps") == "0"
    seen = await page.evaluate("() => window.blockOffsets")
    offsets = [offset for offset, _ in seen]
    assert len({epoch for _, epoch in seen}) == 1
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))

    # Restart with a new broker: the history is gone, and the panel says so.
    await gateway.shutdown()
    await page.wait_for_selector('#status[data-status="reconnecting"]')
    gateway = Gateway(make_config(port=port, **SIMULATED))
    await nursery.start(gateway.run)
    await page.wait_for_selector(CONNECTED)
    await page.wait_for_selector('#gaps[data-gaps="1"]')
    await page.wait_for_selector('#log tr[data-type="GAP"]')
    await wait_events(page, "blocks", len(offsets) + 4)
    await page.wait_for_function(
        "() => /\\(([1-9]\\d*) deliveries timed\\)/.test(document.querySelector('#metrics-detail').textContent)"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "debug-panel.png"), full_page=True)

    # Leave: the events stop.
    await page.click(f"{BLOCKS_ROW} button")
    await page.wait_for_selector(f'{BLOCKS_ROW}[data-joined="false"]')
    await page.wait_for_selector(f"{BLOCKS_ROW} button:not([disabled])")
    after_leave = await events_on(page, "blocks")
    await trio.sleep(1.0)  # five block intervals
    assert await events_on(page, "blocks") == after_leave
    assert_no_page_errors(page)
    await close(browser, page, gateway)


async def test_panel_reports_a_refused_token_and_shows_metrics_to_admins(
    start_gateway: StartGateway, browser: BrowserThread
) -> None:
    secret = secrets.token_urlsafe(32)
    gateway = await start_gateway(jwt_secret=secret)
    base = f"http://127.0.0.1:{gateway.port}"
    page = await browser.new_page()

    await page.goto(base + "/debug?token=not-a-token")
    await page.wait_for_selector('#status[data-status="failed"]')
    error = await page.inner_text("#conn-error")
    assert "Authentication failed" in error and "UNAUTHORIZED" in error
    assert "token" not in await page.run(lambda p: p.url)  # taken out of the address bar

    # A user token connects, but REQUEST_METRICS is refused.
    await page.fill("#token", issue_token("alice", "user", secret=secret))
    await page.click("#connect")
    await page.wait_for_selector(CONNECTED)
    assert await page.inner_text("#conn-user") == "alice (user)"
    await page.wait_for_selector("#metrics-note:has-text('FORBIDDEN')")

    # An admin token gets the server's metrics.
    await page.fill("#token", issue_token("ops", "admin", secret=secret))
    await page.click("#connect")
    await page.wait_for_selector(CONNECTED)
    assert await page.inner_text("#conn-user") == "ops (admin)"
    await page.wait_for_selector("#metrics-body:not([hidden])")
    assert int(await page.inner_text("#m-connections")) >= 1
    detail = await page.inner_text("#metrics-detail")
    assert "uptime" in detail and "broker memory" in detail
    assert_no_page_errors(page)
    await close(browser, page, gateway)


# Run in a page of the server: the module's helpers, and three live clients on `blocks`
# whose handlers are throttled, debounced, or plain (one of them removed at once).
CLIENT_MODULE = """async () => {
  const k = await import("/kaldrix.js");
  const out = {
    ceilings: [0, 1, 2, 10].map((attempt) => k.backoffDelay(attempt, 1000, 5000, () => 1)),
    floor: k.backoffDelay(3, 1000, 5000, () => 0),
    fraction: k.parseTimestamp("2025-08-07T10:00:00.123456Z") - Date.UTC(2025, 7, 7, 10),
    zoned: k.parseTimestamp("2025-08-07T12:00:00+02:00") === Date.UTC(2025, 7, 7, 10),
    malformed: Number.isNaN(k.parseTimestamp("2025-08-07 10:00:00")),
  };
  const calls = { throttled: 0, debounced: 0, plain: 0, removed: 0 };
  const frames = { throttled: 0, debounced: 0, plain: 0 };
  const clients = {};
  for (const name of Object.keys(frames)) {
    const client = new k.KaldrixClient({
      channels: ["blocks"],
      enableThrottle: name === "throttled", throttleTime: 60000,
      enableDebounce: name === "debounced", debounceTime: 60000,
    });
    client.on("NEW_BLOCK", () => calls[name]++);
    client.on("frame", ({ direction, message }) => direction === "in" && message.type === "NEW_BLOCK" && frames[name]++);
    clients[name] = client;
  }
  clients.plain.on("NEW_BLOCK", () => calls.removed++)();
  const before = clients.plain.getState();
  out.stable = before === clients.plain.getState();
  Object.values(clients).forEach((client) => client.connect());
  await new Promise((resolve) => {
    const poll = setInterval(() => Object.values(frames).every((n) => n >= 5) && (clearInterval(poll), resolve()), 20);
  });
  out.replaced = before !== clients.plain.getState() && clients.plain.getState().connected;
  Object.values(clients).forEach((client) => client.close());
  out.closed = clients.plain.state.status;
  return { ...out, calls, frames };
}"""


async def test_client_module_helpers_and_handler_pacing(
    start_gateway: StartGateway, browser: BrowserThread
) -> None:
    gateway = await start_gateway(**SIMULATED)
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{gateway.port}/")
    result = await page.evaluate(CLIENT_MODULE)
    assert result["ceilings"] == [1000, 2000, 4000, 5000] and result["floor"] == 0
    assert result["fraction"] == pytest.approx(123.456) and result["zoned"] and result["malformed"]
    assert result["stable"] and result["replaced"] and result["closed"] == "closed"
    calls, frames = result["calls"], result["frames"]
    assert calls["plain"] == frames["plain"] >= 5  # every event, once
    assert calls["throttled"] == 1  # the first at once, the rest wait for the window's end
    assert calls["debounced"] == 0  # the burst is not over yet
    assert calls["removed"] == 0
    assert_no_page_errors(page)
    await close(browser, page, gateway)


HEARTBEAT_CLIENT = """async () => {
  const k = await import("/kaldrix.js");
  window.seen = [];
  window.gaps = [];
  const client = new k.KaldrixClient({ channels: ["blocks"] });
  client.on("*", (event) => window.seen.push([event.offset, event.id]));
  client.on("gap", (gap) => window.gaps.push(gap));
  window.heartbeatClient = client;
  client.connect();
  await client.subscribe(["blocks"]);
}"""


async def test_browser_client_recovers_an_event_a_heartbeat_shows_it_missed(
    start_gateway: StartGateway, browser: BrowserThread
) -> None:
    """An event stored in history but never sent (a lost delivery): the channel's next
    HEARTBEAT is ahead of the client, which subscribes again from its last offset."""
    import time

    import attrs

    from kaldrix.protocol import build_new_block_message
    from kaldrix.server._wire import text_frame

    gateway = await start_gateway(channel_heartbeat=0.1)
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{gateway.port}/")
    with trio.fail_after(10):
        await page.evaluate(HEARTBEAT_CLIENT)
    missed = build_new_block_message(block_id="b1", height=1)

    def frame(offset: int, epoch: str) -> bytes:
        return text_frame(attrs.evolve(missed, channel="blocks", offset=offset, epoch=epoch).encode())

    gateway.broker.append("blocks", frame, time.monotonic())
    await page.wait_for_function("() => window.seen.length >= 1")
    await trio.sleep(0.3)  # a few more heartbeats: nothing else may arrive
    assert await page.evaluate("() => window.seen") == [[1, missed.id]]
    assert await page.evaluate("() => window.gaps") == []
    assert await page.evaluate("() => window.heartbeatClient.state.resyncs") == 1
    await page.evaluate("() => window.heartbeatClient.close()")
    assert_no_page_errors(page)
    await close(browser, page, gateway)


async def test_panel_shows_a_shared_broker_and_whether_it_answers(
    start_gateway: StartGateway, browser: BrowserThread, redis_server
) -> None:
    secret = secrets.token_urlsafe(32)
    gateway = await start_gateway(
        jwt_secret=secret, broker=redis_server.url, redis_prefix=f"kx-web-{secrets.token_hex(4)}", sampling_interval=0.2
    )
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{gateway.port}/debug?token={issue_token('ops', 'admin', secret=secret)}")
    await page.wait_for_selector(CONNECTED)
    await page.wait_for_function("() => /broker redis ready/.test(document.querySelector('#metrics-detail').textContent)")
    assert_no_page_errors(page)
    await close(browser, page, gateway)
