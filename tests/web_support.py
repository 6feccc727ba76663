"""A real Chromium for the web tests, driven from trio tests; and a bare HTTP GET.

Playwright's sync API binds every object to the thread that started it, and its async
API needs asyncio, so the browser lives on one dedicated thread: trio tests hand it
calls and await their results while their own nursery keeps serving the gateway.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import trio

T = TypeVar("T")

CHROMIUM = os.environ.get("KALDRIX_CHROMIUM", "/usr/bin/chromium")
"""Debian's Chromium; never a browser downloaded by Playwright."""
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEP_TIMEOUT_MS = 8000
"""Bound on every single browser step; a test fails rather than hangs."""


def skip_or_fail(reason: str) -> None:
    """A missing browser skips the test, except in CI (CI=true), where it must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; never `playwright install`)"
    if shutil.which(CHROMIUM) is None:
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


class BrowserUnavailable(Exception):
    """Chromium is installed but would not start."""


class BrowserThread:
    """One headless Chromium, owned by one thread; every call to it goes through `call`."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright: Any = None
        self.browser: Any = None

    def start(self) -> None:
        """Launch Chromium (blocking; from a sync fixture); BrowserUnavailable if it cannot start."""
        from playwright.sync_api import Error as PlaywrightError

        try:
            self._executor.submit(self._launch).result(timeout=60)
        except (PlaywrightError, OSError, TimeoutError) as exc:
            raise BrowserUnavailable(f"Chromium did not start: {exc}") from exc

    def stop(self) -> None:
        try:
            self._executor.submit(self._close).result(timeout=30)
        finally:
            self._executor.shutdown(wait=True)

    def _launch(self) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        try:
            self.browser = self._playwright.chromium.launch(
                executable_path=shutil.which(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
        except Exception:
            self._playwright.stop()
            raise

    def _close(self) -> None:
        if self.browser is not None:
            self.browser.close()
        if self._playwright is not None:
            self._playwright.stop()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the browser thread; the trio loop runs meanwhile."""
        future = self._executor.submit(functools.partial(fn, *args, **kwargs))
        return await trio.to_thread.run_sync(future.result)

    async def new_page(self) -> Page:
        return Page(self, await self.call(self._new_page))

    def _new_page(self) -> Any:
        context = self.browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(STEP_TIMEOUT_MS)
        page = context.new_page()
        page.kaldrix_console = []  # type: ignore[attr-defined]
        page.on("console", lambda message: page.kaldrix_console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: page.kaldrix_console.append(f"pageerror: {error}"))
        return page

    async def close_page(self, page: Page) -> None:
        await self.call(page.raw.context.close)


class Page:
    """A Playwright page seen from trio: `await page.click(...)` runs on the browser thread."""

    def __init__(self, thread: BrowserThread, page: Any) -> None:
        self._thread = thread
        self.raw = page

    @property
    def console(self) -> list[str]:
        """Console messages and uncaught errors so far ("error: ...", "pageerror: ...")."""
        return list(self.raw.kaldrix_console)

    async def run(self, fn: Callable[[Any], T]) -> T:
        """`fn(playwright_page)` on the browser thread."""
        return await self._thread.call(fn, self.raw)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def method(*args: Any, **kwargs: Any) -> Any:
            return await self._thread.call(lambda: getattr(self.raw, name)(*args, **kwargs))

        return method


async def http_get(port: int, path: str, *, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request to the gateway: status, headers (lower-case names), body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body
