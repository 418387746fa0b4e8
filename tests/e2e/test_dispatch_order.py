"""A history catch-up asked for by a client frame goes out after the event being handled and
before every live event that arrives meanwhile: through uvicorn, a real client, the in-memory layer.

Live events are dispatched without a lock; the catch-up holds them back (see
``AsyncWebSocketConsumer.group_add``), which these tests pin down step by step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from fastapi_websockets import AsyncJsonWebSocketConsumer, InMemoryChannelLayer, StreamPosition
from fastapi_websockets.history import History
from tests.e2e.server import serve

HISTORY = {"room:*": {"size": 10, "ttl": 60}}


class GatedCatchUpLayer(InMemoryChannelLayer):
    """The in-memory layer; a catch-up (``group_add`` with ``since``) waits at a gate the test opens."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.catching_up = asyncio.Event()
        self.gate = asyncio.Event()
        self.handler_waiting = asyncio.Event()
        self.handler_gate = asyncio.Event()
        self.join_asked = asyncio.Event()

    async def group_add(
        self, group: str, channel: str, *, since: StreamPosition | None = None
    ) -> History | None:
        if since is not None:
            self.catching_up.set()
            await self.gate.wait()
            if since.epoch == "fail":
                raise ConnectionError("the broker went away during the catch-up")
        return await super().group_add(group, channel, since=since)

    def open_gates(self) -> None:
        self.gate.set()
        self.handler_gate.set()


class JoiningLater(AsyncJsonWebSocketConsumer):
    groups = ("lobby",)

    async def connect(self) -> None:
        await self.accept()
        await self.send_json({"event": "hello"})

    async def receive_json(self, content: Any) -> None:
        # In the connection's frame task, while the events task may be handling an event.
        layer = self.channel_layer
        assert isinstance(layer, GatedCatchUpLayer)
        layer.join_asked.set()  # the test goes on once this task waits in group_add()
        try:
            page = await self.group_add("room:x", since=StreamPosition(0, content["epoch"]))
        except ConnectionError:
            await self.send_json({"event": "catch-up failed"})
            return
        assert page is not None
        await self.send_json({"event": "caught-up", "count": len(page.messages)})

    async def slow(self, event: dict[str, Any]) -> None:
        layer = self.channel_layer
        assert isinstance(layer, GatedCatchUpLayer)
        layer.handler_waiting.set()
        await layer.handler_gate.wait()
        await self.send_json({"event": "slow done"})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"event": "chat", "text": event["text"]})


async def recv_json(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


@pytest.fixture
async def joined() -> AsyncIterator[tuple[ClientConnection, GatedCatchUpLayer]]:
    """A client of JoiningLater through uvicorn, greeted, and the server's gated layer."""
    layer = GatedCatchUpLayer(history=HISTORY)
    app = FastAPI()
    app.add_api_websocket_route("/ws", JoiningLater.as_endpoint(layer))
    async with serve(app) as url:
        ws = await connect(f"{url}/ws")
        assert await recv_json(ws) == {"event": "hello"}
        try:
            yield ws, layer
        finally:
            layer.open_gates()  # a failure must not leave the server's shutdown waiting
            await ws.close()
    await layer.close()


async def test_a_catch_up_waits_for_the_event_in_hand_and_holds_live_events_back(
    joined: tuple[ClientConnection, GatedCatchUpLayer],
) -> None:
    ws, layer = joined
    first = await layer.group_send("room:x", {"type": "chat.message", "text": "missed"})
    assert first is not None
    await layer.group_send("lobby", {"type": "slow"})
    await asyncio.wait_for(layer.handler_waiting.wait(), 10)
    await ws.send(json.dumps({"epoch": first.epoch}))  # the catch-up starts behind "slow"
    await asyncio.wait_for(layer.join_asked.wait(), 10)
    assert not layer.catching_up.is_set()  # it waits for the handler of "slow" first
    await layer.group_send("lobby", {"type": "chat.message", "text": "live 1"})
    layer.handler_gate.set()
    await asyncio.wait_for(layer.catching_up.wait(), 10)
    await layer.group_send("lobby", {"type": "chat.message", "text": "live 2"})
    layer.gate.set()
    received = [await recv_json(ws) for _ in range(5)]
    assert received == [
        {"event": "slow done"},
        {"event": "chat", "text": "missed"},
        {"event": "caught-up", "count": 1},
        {"event": "chat", "text": "live 1"},
        {"event": "chat", "text": "live 2"},
    ]
    await layer.group_send("room:x", {"type": "chat.message", "text": "after"})
    assert await recv_json(ws) == {"event": "chat", "text": "after"}


async def test_live_events_go_on_after_a_catch_up_that_failed(
    joined: tuple[ClientConnection, GatedCatchUpLayer],
) -> None:
    ws, layer = joined
    await ws.send(json.dumps({"epoch": "fail"}))
    await asyncio.wait_for(layer.catching_up.wait(), 10)
    await layer.group_send("lobby", {"type": "chat.message", "text": "live"})
    layer.gate.set()
    assert await recv_json(ws) == {"event": "catch-up failed"}
    assert await recv_json(ws) == {"event": "chat", "text": "live"}
