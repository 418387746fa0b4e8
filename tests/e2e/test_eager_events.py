"""Channel events handled in the delivery's own turn, and what happens when a handler waits.

Consumers run an event's handler inside the delivery (no task per group
message) until it waits; then it goes on in a task. Through uvicorn and real
clients, on the in-memory layer (whose deliveries run inside ``send()``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fastapi_websockets import AsyncJsonWebSocketConsumer, InMemoryChannelLayer, StreamPosition
from tests.e2e.server import serve

OUTCOMES: list[str] = []
RELEASE = asyncio.Event()


class Waiting(AsyncJsonWebSocketConsumer):
    groups = ("waiting",)

    async def connect(self) -> None:
        await self.accept()
        await self.send_json({"event": "hello", "channel": self.channel_name})

    async def late_join(self, event: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)  # the handler now goes on in a task
        page = await self.group_add("room:x", since=StreamPosition(0, event["epoch"]))
        assert page is not None
        await self.send_json({"event": "caught-up", "texts": [m["text"] for m in page.messages]})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"event": "chat", "text": event["text"]})

    async def numbered(self, event: dict[str, Any]) -> None:
        if event["n"] % 3 == 0:
            await asyncio.sleep(0.005)  # some events wait, the others do not
        await self.send_json({"event": "n", "n": event["n"]})

    async def stuck(self, event: dict[str, Any]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            OUTCOMES.append("stuck handler cancelled")
            raise

    async def bounded(self, event: dict[str, Any]) -> None:
        # A cancel scope binds to the current task: it must be the handler's, not the deliverer's.
        try:
            with anyio.fail_after(0.05):
                await asyncio.Event().wait()
        except TimeoutError:
            await self.send_json({"event": "timed out"})

    async def relay(self, event: dict[str, Any]) -> None:
        rest = event["rest"]
        if rest:
            forward = {"type": "relay", "rest": rest[1:], "hops": event["hops"] + 1}
            await self.channel_layer.send(rest[0], forward)
        else:
            await self.send_json({"event": "relayed", "hops": event["hops"]})

    async def receive_json(self, content: Any) -> None:
        await self.channel_layer.send(self.channel_name, {"type": "explode"})
        await self.send_json({"event": "sent to myself"})

    async def explode(self, event: dict[str, Any]) -> None:
        raise RuntimeError("an event sent by a receive handler to its own connection failed")

    async def disconnect(self, close_code: int | None) -> None:
        OUTCOMES.append(f"disconnected {close_code}")


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, InMemoryChannelLayer]]:
    layer = InMemoryChannelLayer(history={"room:*": {"size": 10, "ttl": 60}})
    app = FastAPI()
    app.add_api_websocket_route("/ws", Waiting.as_endpoint(layer))
    OUTCOMES.clear()
    async with serve(app) as url:
        yield url, layer
    await layer.close()


async def recv_json(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def open_client(url: str) -> tuple[ClientConnection, str]:
    ws = await connect(f"{url}/ws")
    hello = await recv_json(ws)
    assert hello["event"] == "hello"
    return ws, hello["channel"]


async def test_a_handler_that_waits_then_catches_up_does_not_wait_for_itself(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, layer = served
    ws, _ = await open_client(url)
    first = await layer.group_send("room:x", {"type": "chat.message", "text": "one"})
    assert first is not None
    await layer.group_send("room:x", {"type": "chat.message", "text": "two"})
    await layer.group_send("waiting", {"type": "late.join", "epoch": first.epoch})
    # The page goes to the handlers first, then the handler that asked for it goes on.
    assert await recv_json(ws) == {"event": "chat", "text": "one"}
    assert await recv_json(ws) == {"event": "chat", "text": "two"}
    assert await recv_json(ws) == {"event": "caught-up", "texts": ["one", "two"]}
    await layer.group_send("room:x", {"type": "chat.message", "text": "three"})
    assert await recv_json(ws) == {"event": "chat", "text": "three"}
    await ws.close()


async def test_events_stay_in_order_when_some_handlers_wait(served: tuple[str, InMemoryChannelLayer]) -> None:
    url, layer = served
    clients = [await open_client(url) for _ in range(3)]
    for n in range(30):
        await layer.group_send("waiting", {"type": "numbered", "n": n})
    for ws, _ in clients:
        assert [(await recv_json(ws))["n"] for _ in range(30)] == list(range(30))
        await ws.close()


async def test_a_client_leaving_while_its_handler_waits_cancels_the_handler(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, layer = served
    ws, channel = await open_client(url)
    await layer.send(channel, {"type": "stuck"})
    await ws.close()
    for _ in range(500):
        if len(OUTCOMES) == 2:
            break
        await asyncio.sleep(0.01)
    assert OUTCOMES == ["stuck handler cancelled", "disconnected 1000"]


async def test_a_long_relay_chain_between_consumers_does_not_nest_handlers(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    # Each hop delivers from inside the previous consumer's handler: run eagerly, 200 hops
    # would be 200 nested handlers, deeper than Python's recursion limit allows.
    url, layer = served
    clients = [await open_client(url) for _ in range(200)]
    channels = [channel for _, channel in clients]
    await layer.send(channels[0], {"type": "relay", "rest": channels[1:], "hops": 0})
    assert await recv_json(clients[-1][0]) == {"event": "relayed", "hops": 199}
    for ws, _ in clients:
        await ws.close()


async def test_an_event_a_receive_handler_sends_itself_runs_after_it_and_can_end_the_connection(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, _ = served
    ws, _ = await open_client(url)
    await ws.send(json.dumps({"go": True}))
    assert await recv_json(ws) == {"event": "sent to myself"}
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011
    for _ in range(500):
        if OUTCOMES:
            break
        await asyncio.sleep(0.01)
    assert OUTCOMES == ["disconnected 1011"]


async def test_a_timeout_in_a_handler_cancels_the_handler_not_the_sender(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, layer = served
    ws, _ = await open_client(url)
    await layer.group_send("waiting", {"type": "bounded"})
    await asyncio.sleep(0.2)  # past the handler's deadline: this task must not be cancelled
    assert await recv_json(ws) == {"event": "timed out"}
    await ws.close()
