"""The README's JavaScript client, run as written in Chromium against the chat demo.

It claims that a client keeping the last position it saw and sending it on
reconnection gets exactly what it missed: the test cuts its socket, announces
into the room meanwhile, and checks the missed message arrives once, replayed.
"""

from __future__ import annotations

import json
from typing import Any

from playwright.async_api import Page

from tests.browser.conftest import Pages
from tests.browser.test_demo import APP, announce, http
from tests.doc_examples import examples, read_doc
from tests.e2e.server import serve_in_subprocess

CLIENT = examples(read_doc("README.md"), "js")["client-js"]
#: What the snippet leaves to its page: a `show(m)`. The test also keeps each socket the
#: snippet opens, to cut one (the snippet itself keeps none).
HARNESS = """
window.shown = [];
function show(m) { shown.push(m); }
window.sockets = [];
const NativeWebSocket = WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) { super(...args); sockets.push(this); }
};
"""


async def shown(page: Page, kind: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = json.loads(await page.evaluate("JSON.stringify(shown)"))
    return [frame for frame in frames if frame["kind"] == kind]


async def test_readme_client_recovers_what_it_missed(pages: Pages) -> None:
    with serve_in_subprocess(APP) as url:
        base = http(url)
        # Any page of the demo's origin will do; not the demo's own page, whose script connects too.
        page = await pages.open("client", f"{base}/client")
        await page.add_script_tag(content=HARNESS + CLIENT)
        await page.wait_for_function("shown.some((m) => m.kind === 'synced')")
        await announce(base, "room", "seen")
        await page.wait_for_function("shown.some((m) => m.text === 'announcement: seen')")

        await page.context.set_offline(True)  # the snippet's reconnect attempts fail until released
        await page.evaluate("sockets.at(-1).close()")
        await page.wait_for_function("sockets.at(-1).readyState === WebSocket.CLOSED")
        await announce(base, "room", "missed")
        await page.context.set_offline(False)
        await page.wait_for_function("shown.some((m) => m.text === 'announcement: missed')")

        reconnected = await page.evaluate("sockets.at(-1).url")
        assert "offset=" in reconnected
        assert "epoch=" in reconnected
        notices = await shown(page, "notice")
        assert [(m["text"], m["replay"]) for m in notices] == [
            ("announcement: seen", None),
            ("announcement: missed", "recovered"),
        ]
