"""A consumer on a Redis layer from a test fixture: two app instances ("processes") share one redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI

from fastapi_websockets import AsyncJsonWebSocketConsumer, BaseChannelLayer, RedisChannelLayer
from fastapi_websockets.layers import override_default_layer
from fastapi_websockets.testing import WebsocketCommunicator
from tests.servers.redis import RedisNode


class Ticker(AsyncJsonWebSocketConsumer):
    groups = ("ticks",)

    async def receive_json(self, content: Any) -> None:
        await self.group_send("ticks", {"type": "tick", "value": content["value"]})

    async def tick(self, event: dict[str, Any]) -> None:
        await self.send_json({"value": event["value"], "seen_by": self.channel_name})


@pytest.fixture
async def redis_layers(redis_server: RedisNode, namespace: str) -> AsyncIterator[list[RedisChannelLayer]]:
    made = [RedisChannelLayer(url=redis_server.url, prefix=namespace) for _ in range(2)]
    yield made
    for layer in made:
        await layer.close()


def app_on(layer: BaseChannelLayer) -> FastAPI:
    app = FastAPI()
    app.add_api_websocket_route("/ticks", Ticker.as_endpoint(layer))
    return app


async def test_consumers_on_two_layers_talk_through_redis(redis_layers: list[RedisChannelLayer]) -> None:
    first, second = (app_on(layer) for layer in redis_layers)
    async with WebsocketCommunicator(first, "/ticks") as a, WebsocketCommunicator(second, "/ticks") as b:
        assert (await a.connect())[0]
        assert (await b.connect())[0]
        await a.send_json_to({"value": 1})
        got_a, got_b = await a.receive_json_from(timeout=10), await b.receive_json_from(timeout=10)
        assert got_a["value"] == got_b["value"] == 1
        # Each reply came from its own connection's process-specific channel, on its own layer.
        assert redis_layers[0].client_token in got_a["seen_by"]
        assert redis_layers[1].client_token in got_b["seen_by"]
        assert await a.receive_nothing()


async def test_a_redis_layer_as_the_default_layer(redis_layers: list[RedisChannelLayer]) -> None:
    app = FastAPI()
    app.add_api_websocket_route("/ticks", Ticker.as_endpoint())  # no layer: the process default
    with override_default_layer(redis_layers[0]):
        async with WebsocketCommunicator(app, "/ticks") as ws:
            await ws.connect()
            await redis_layers[1].group_send("ticks", {"type": "tick", "value": "from elsewhere"})
            assert (await ws.receive_json_from(timeout=10))["value"] == "from elsewhere"
