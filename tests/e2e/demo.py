"""The chat demo as the end-to-end and browser tests run it: what it needs from a backend."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection

from examples.chat.app import ROOM_HISTORY
from tests.conformance.test_history import PENDING as HISTORY_PENDING
from tests.conformance.test_presence import PENDING as PRESENCE_PENDING
from tests.servers import Backend

#: Backends the demo cannot run on yet: it keeps room history and shows presence.
DEMO_PENDING = HISTORY_PENDING | PRESENCE_PENDING


def demo_pending(backend: Backend) -> bool:
    """Whether ``backend`` still lacks history or presence (tests expect NotImplementedError)."""
    return backend.name.split("-")[0] in DEMO_PENDING


async def check_demo_backend(backend: Backend, namespace: str) -> None:
    """Use history and presence as the demo does, in this process.

    A backend without them raises its NotImplementedError here, in the test,
    rather than in a server process that would only close the socket with 1011.
    """
    async with backend.build(namespace, history=ROOM_HISTORY) as layer:
        await layer.group_history("room:preflight")
        await layer.presence("room:preflight")


async def next_frame(ws: ClientConnection, kind: str | None = None) -> dict[str, Any]:
    """The demo's next JSON frame on ``ws`` (the next of ``kind``, skipping others)."""
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if kind is None or frame["kind"] == kind:
            return frame
