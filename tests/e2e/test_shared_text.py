"""One group message, many sockets in one process: equal content is encoded once, and only equal content."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from fastapi_websockets import AsyncJsonWebSocketConsumer, InMemoryChannelLayer, websocket_json_message
from tests.e2e.server import serve


class CountingConsumer(AsyncJsonWebSocketConsumer):
    """Counts its encodings; handlers send back what the README's do, and what careless ones do."""

    groups = ("room",)
    encoded: ClassVar[list[Any]] = []
    numbers = itertools.count()

    async def connect(self) -> None:
        self.number = next(self.numbers)
        await self.accept()
        await self.send_json({"number": self.number})

    @classmethod
    def encode_json(cls, content: Any) -> str:
        cls.encoded.append(content)
        return super().encode_json(content)

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"], "n": event["n"]})  # a new dict per socket

    async def body_message(self, event: dict[str, Any]) -> None:
        await self.send_json(event["body"])  # the shared dict itself

    async def mutating_message(self, event: dict[str, Any]) -> None:
        # Changes the event every local member shares, in place, before sending it.
        event["body"]["to"] = self.number
        event["body"]["nested"]["to"] = [self.number]
        await self.send_json(event["body"])

    async def lookalike_message(self, event: dict[str, Any]) -> None:
        # Equal under ==, different on the wire: 0.0 and -0.0, 1 and True.
        odd = self.number % 2 == 1
        await self.send_json({"zero": -0.0 if odd else 0.0, "one": True if odd else 1})


async def sockets(url: str, count: int) -> tuple[list[ClientConnection], list[int]]:
    """``count`` clients, and the number of the consumer serving each."""
    clients = [await connect(f"{url}/ws") for _ in range(count)]
    return clients, [json.loads(text)["number"] for text in await texts(clients)]


async def texts(clients: list[ClientConnection]) -> list[str]:
    return [str(await asyncio.wait_for(ws.recv(), 10)) for ws in clients]


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, InMemoryChannelLayer]]:
    """The URL of an app serving CountingConsumer at /ws, and its layer."""
    layer = InMemoryChannelLayer()
    app = FastAPI()
    app.add_api_websocket_route("/ws", CountingConsumer.as_endpoint(layer))
    async with serve(app) as url:
        yield url, layer
    await layer.close()


async def test_equal_content_is_encoded_once_per_group_message(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, layer = served
    clients, _ = await sockets(url, 5)
    CountingConsumer.encoded.clear()
    await layer.group_send("room", {"type": "chat.message", "text": "héllo", "n": 1.5})
    assert await texts(clients) == ['{"text":"héllo","n":1.5}'] * 5
    await layer.group_send("room", {"type": "body.message", "body": {"a": [1, {"b": None}]}})
    assert await texts(clients) == ['{"a":[1,{"b":null}]}'] * 5
    await layer.group_send("room", websocket_json_message({"c": "d"}))
    assert await texts(clients) == ['{"c":"d"}'] * 5
    assert CountingConsumer.encoded == [
        {"text": "héllo", "n": 1.5},
        {"a": [1, {"b": None}]},
        {"c": "d"},
    ]
    for ws in clients:
        await ws.close()


async def test_content_changed_in_place_or_only_equal_under_eq_gets_its_own_text(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, layer = served
    clients, numbers = await sockets(url, 4)

    await layer.group_send("room", {"type": "mutating.message", "body": {"nested": {}}})
    assert await texts(clients) == [f'{{"nested":{{"to":[{n}]}},"to":{n}}}' for n in numbers]

    await layer.group_send("room", {"type": "lookalike.message"})
    odd, even = '{"zero":-0.0,"one":true}', '{"zero":0.0,"one":1}'
    assert await texts(clients) == [odd if n % 2 else even for n in numbers]
    for ws in clients:
        await ws.close()
