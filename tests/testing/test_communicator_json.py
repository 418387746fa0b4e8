"""WebsocketCommunicator and JSON: no NaN or Infinity either way; every socket's error is raised."""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi import FastAPI

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    BaseChannelLayer,
    InMemoryChannelLayer,
    InvalidMessage,
)
from fastapi_websockets.testing import WebsocketCommunicator, lifespan


class Scores(AsyncJsonWebSocketConsumer):
    groups = ("scores",)

    async def receive_json(self, content: Any) -> None:
        await self.send_text(content["raw"])  # whatever text the test asks for, JSON or not

    async def score_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"score": event["score"]})


def make_app(layer: BaseChannelLayer) -> FastAPI:
    app = FastAPI()
    app.add_api_websocket_route("/scores", Scores.as_endpoint(layer))
    return app


async def test_send_json_to_refuses_nan_and_receive_json_from_refuses_what_a_browser_would() -> None:
    async with InMemoryChannelLayer() as layer, WebsocketCommunicator(make_app(layer), "/scores") as ws:
        await ws.connect()
        with pytest.raises(InvalidMessage, match=r"cannot send nan as JSON \(at \['raw'\]\[0\]\)"):
            await ws.send_json_to({"raw": [math.nan]})
        await ws.send_json_to({"raw": '{"score": Infinity}'})
        with pytest.raises(ValueError, match="Infinity is not JSON"):
            await ws.receive_json_from()
        await ws.send_json_to({"raw": '{"score": 1.5}'})
        assert await ws.receive_json_from() == {"score": 1.5}


async def test_a_group_message_that_is_not_json_is_raised_in_every_communicator() -> None:
    # From the second socket on, the consumer logs the failure without its traceback (one
    # traceback per group message); each communicator must still raise its connection's error.
    layer = InMemoryChannelLayer()
    app = make_app(layer)
    async with lifespan(app):
        sockets = [WebsocketCommunicator(app, "/scores") for _ in range(3)]
        for ws in sockets:
            await ws.connect()
        await layer.group_send("scores", {"type": "score.message", "score": -math.inf})
        for ws in sockets:
            with pytest.raises(InvalidMessage, match=r"cannot send -inf as JSON \(at \['score'\]\)"):
                await ws.receive_json_from()
            assert await ws.wait_closed() == 1011
            await ws.disconnect()
    await layer.close()
