"""The chat demo in a real browser, driven by its labelled fields as a user (or any script) would.

One test runs the demo as ``bash scripts/demo`` does (one process, in-memory
layer); the other runs it as documented for production: two uvicorn
processes sharing Redis, one browser on each, with a dropped connection that
recovers exactly the missed messages. With ``UPDATE_SCREENSHOT=1`` the latter
also rewrites docs/demo.png, the README's picture.
"""

from __future__ import annotations

import asyncio
import base64
import html
import os
import re
import urllib.request
import uuid
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from tests.browser.conftest import ROOT, Pages
from tests.e2e.demo import check_demo_backend, demo_pending
from tests.e2e.server import serve_in_subprocess
from tests.servers import Backend

APP = "examples.chat.app:app"
SCREENSHOT = ROOT / "docs" / "demo.png"


def http(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://", 1)


async def join(page: Page, room: str, name: str) -> int:
    """Join with the page's fields; return the pid of the worker its WebSocket reached."""
    await page.get_by_label("room").fill(room)
    await page.get_by_label("name").fill(name)
    await page.get_by_role("button", name="Join").click()
    return await connected(page)


async def connected(page: Page) -> int:
    """Wait for the page to be connected; return the worker pid it shows."""
    status = page.get_by_role("status")
    await expect(status).to_contain_text("Connected to worker")
    found = re.search(r"worker (\d+)", await status.inner_text())
    assert found is not None
    return int(found.group(1))


async def say(page: Page, text: str) -> None:
    await page.get_by_label("message").fill(text)
    await page.get_by_label("message").press("Enter")


def messages(page: Page, kind: str = "") -> Locator:
    """The texts of the chat lines in the log (``kind``: "history", "recovered" or "" for all)."""
    return page.get_by_role("log").locator(f".message{'.' + kind if kind else ''} .text")


async def expect_online(page: Page, *names: str) -> None:
    """Wait until the page's online list holds exactly ``names`` (in any order)."""
    who = page.get_by_label("online").locator(".who")
    await expect(who).to_have_count(len(names))
    assert sorted(await who.all_inner_texts()) == sorted(names)


async def announce(base: str, room: str, text: str) -> None:
    request = urllib.request.Request(f"{base}/rooms/{room}/announce?text={text}", method="POST")
    await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read())


async def drop_and_hold(page: Page) -> None:
    """Cut the page's WebSocket and keep it offline: its reconnect attempts fail until released."""
    await page.context.set_offline(True)  # existing sockets survive this; new ones cannot connect
    await page.evaluate("chat.socket.close()")
    await expect(page.get_by_role("status")).to_contain_text("reconnecting")


async def demo_screenshot(browser: Browser, shots: dict[str, Page], path: Path) -> None:
    """Put the pages side by side, captioned, in one PNG at ``path``."""
    figures = []
    for caption, page in shots.items():
        data = base64.b64encode(await page.screenshot()).decode()
        image = f'<img src="data:image/png;base64,{data}">'
        figures.append(f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>")
    context = await browser.new_context(viewport={"width": 1700, "height": 100})
    sheet = await context.new_page()
    style = (
        "body{margin:0;display:flex;gap:20px;padding:20px;background:#e9edf2;font-family:sans-serif}"
        "figure{margin:0}img{border:1px solid #999;box-shadow:0 2px 6px #0003;display:block}"
        "figcaption{text-align:center;padding-top:6px;color:#333}"
    )
    await sheet.set_content(f"<style>{style}</style>{''.join(figures)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    await sheet.screenshot(path=path, full_page=True)
    await context.close()


async def test_demo_on_the_in_memory_default(pages: Pages) -> None:
    room = "lobby"
    with serve_in_subprocess(APP) as url:
        ann = await pages.open("ann", http(url))
        worker = await join(ann, room, "ann")
        bob = await pages.open("bob", f"{http(url)}/?room={room}&name=bob")  # the URL joins by itself
        assert await connected(bob) == worker  # one process serves both
        await expect_online(ann, "ann", "bob")
        await expect_online(bob, "ann", "bob")

        await say(ann, "<b>hi</b> bob")
        await expect(messages(bob)).to_have_text(["<b>hi</b> bob"])  # users' HTML is shown as text
        await expect(bob.get_by_role("log").locator("b")).to_have_count(0)
        await say(bob, "hi ann")
        await expect(messages(ann)).to_have_text(["<b>hi</b> bob", "hi ann"])
        await announce(http(url), room, "hello")
        for page in (ann, bob):
            await expect(page.get_by_role("log").locator(".notice .text").last).to_have_text(
                "announcement: hello"
            )

        await bob.reload()  # a new page: it shows the room's recent history
        await connected(bob)
        await expect(messages(bob, "history")).to_have_text(["<b>hi</b> bob", "hi ann"])
        await expect(bob.get_by_role("log").locator(".notice.history .text")).to_have_text(
            ["announcement: hello"]
        )
        await expect_online(ann, "ann", "bob")

        await drop_and_hold(bob)
        await expect_online(ann, "ann")
        await say(ann, "while bob was away")
        await expect(messages(ann).last).to_have_text("while bob was away")
        await bob.context.set_offline(False)
        await connected(bob)
        await expect(messages(bob, "recovered")).to_have_text(["while bob was away"])
        await expect_online(ann, "ann", "bob")

        await bob.close()
        await expect_online(ann, "ann")
        await expect(ann.get_by_role("log").locator(".presence .text").last).to_have_text("bob left")


async def test_two_workers_through_redis(
    redis_backend: Backend, pages: Pages, browser: Browser, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if demo_pending(redis_backend):
        request.applymarker(pytest.mark.xfail(raises=NotImplementedError, strict=True))
    namespace = "browser" + uuid.uuid4().hex[:8]
    await check_demo_backend(redis_backend, namespace)
    assert redis_backend.env is not None
    env = redis_backend.env(namespace)
    room = "general"
    with serve_in_subprocess(APP, env) as url1, serve_in_subprocess(APP, env) as url2:
        ann = await pages.open("ann", http(url1))
        ann_worker = await join(ann, room, "ann")
        bob = await pages.open("bob", http(url2))
        bob_worker = await join(bob, room, "bob")
        assert ann_worker != bob_worker
        await expect_online(ann, "ann", "bob")
        await expect_online(bob, "ann", "bob")
        await expect(ann.get_by_label("online").locator("li", has_text="bob")).to_contain_text(
            f"worker {bob_worker}"
        )

        await say(ann, "hello from worker 1")
        await expect(messages(bob)).to_have_text(["hello from worker 1"])
        await say(bob, "hello back from worker 2")
        await expect(messages(ann)).to_have_text(["hello from worker 1", "hello back from worker 2"])

        await drop_and_hold(ann)
        await expect_online(bob, "bob")  # ann's worker saw the socket go and left the presence
        missed = ["did you see this?", "and this one?"]
        for text in missed:
            await say(bob, text)
        await expect(messages(bob).last).to_have_text(missed[-1])
        await ann.context.set_offline(False)
        assert await connected(ann) == ann_worker
        # Exactly the missed messages come back, marked, in order, with nothing shown twice.
        await expect(messages(ann, "recovered")).to_have_text(missed)
        await expect_online(bob, "ann", "bob")
        await say(bob, "welcome back")
        everything = ["hello from worker 1", "hello back from worker 2", *missed, "welcome back"]
        await expect(messages(ann)).to_have_text(everything)
        await expect(messages(ann, "recovered")).to_have_text(missed)

        shots = {f"ann, worker {ann_worker}": ann, f"bob, worker {bob_worker}": bob}
        update = os.environ.get("UPDATE_SCREENSHOT") == "1"
        await demo_screenshot(browser, shots, SCREENSHOT if update else tmp_path / "demo.png")

        await bob.reload()  # a new page on the other worker: the history is the same
        await connected(bob)
        await expect(messages(bob, "history")).to_have_text(everything)
        await expect_online(ann, "ann", "bob")

        await ann.close()
        await expect_online(bob, "bob")
        await expect(bob.get_by_role("log").locator(".presence .text").last).to_have_text("ann left")
