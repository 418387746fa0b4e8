"""A real browser for the tests: Playwright driving Debian's Chromium, nothing downloaded.

Each test gets a fresh Chromium (``browser``) and a ``pages`` helper that
opens pages in browser contexts of their own (separate cookies and network,
like two people). When a test fails, every page it opened is saved as a PNG
under tests/artifacts/<test>/ and the paths are added to the failure report.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from tests.servers import ensure_apt

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
#: Headless Chromium with nothing that reaches the network by itself (sandboxing needs a non-root user).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 820, "height": 460}

# A loaded machine can take seconds to deliver through a broker; a wait is not a speed check.
expect.set_options(timeout=30_000)

_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


class Pages:
    """Pages of one test, each in its own browser context; named for the failure screenshots."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.opened: dict[str, Page] = {}

    async def open(self, name: str, url: str) -> Page:
        """A new context with one page at ``url``."""
        context = await self.browser.new_context(viewport=VIEWPORT)
        page = await context.new_page()
        self.opened[name] = page
        await page.goto(url)
        return page

    async def screenshots(self, folder: Path) -> list[Path]:
        """Save every page still open as ``folder/<name>.png``."""
        saved = []
        for name, page in self.opened.items():
            if not page.is_closed():
                path = folder / f"{name}.png"
                await page.screenshot(path=path)
                saved.append(path)
        return saved


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium (installed with apt if missing), closed after the test."""
    executable = ensure_apt("/usr/bin/chromium", "chromium")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def pages(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Pages]:
    """Opens pages for the test; screenshots them if the test failed."""
    opened = Pages(browser)
    yield opened
    report = request.node.stash.get(_CALL_REPORT, None)
    if report is not None and report.failed:
        folder = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
        folder.mkdir(parents=True, exist_ok=True)
        saved = await opened.screenshots(folder)
        # The failure summary is printed at the end of the session, from this same report.
        report.sections.append(("screenshots", "\n".join(str(path) for path in saved) or "(no page open)"))
