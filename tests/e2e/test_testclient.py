"""Users test their consumers with Starlette's TestClient; each client runs the app in a new loop."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_websockets import AsyncJsonWebSocketConsumer, channel_layers_lifespan


class EchoRoom(AsyncJsonWebSocketConsumer):
    groups = ("room",)

    async def receive_json(self, content: Any) -> None:
        await self.group_send("room", {"type": "chat.message", "text": content["text"]})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"]})


def make_app(**kwargs: Any) -> FastAPI:
    app = FastAPI(**kwargs)
    app.add_api_websocket_route("/ws", EchoRoom.as_endpoint())
    return app


def test_consumers_under_test_client_without_lifespan() -> None:
    app = make_app()
    for round_ in range(2):  # a second client runs a new event loop: the default layer must follow
        with (
            TestClient(app) as client,
            client.websocket_connect("/ws") as a,
            client.websocket_connect("/ws") as b,
        ):
            a.send_json({"text": f"hi {round_}"})
            assert a.receive_json() == {"text": f"hi {round_}"}
            assert b.receive_json() == {"text": f"hi {round_}"}


def test_consumers_under_test_client_with_lifespan() -> None:
    app = make_app(lifespan=channel_layers_lifespan({"default": {"BACKEND": "inmemory"}}))
    for _ in range(2):
        with TestClient(app) as client, client.websocket_connect("/ws") as ws:
            ws.send_json({"text": "x"})
            assert ws.receive_json() == {"text": "x"}
            layer = app.state.channel_layers["default"]
        assert layer.closed
