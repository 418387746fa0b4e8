"""fastapi-websockets, as the README's consumer example: a handler calls ``send_json``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI
from payload import ROOM, message

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    BaseChannelLayer,
    channel_layer_dependency,
    channel_layers_lifespan,
)


class RoomConsumer(AsyncJsonWebSocketConsumer):
    async def connect(self) -> None:
        await self.group_add(ROOM)
        await self.accept()

    async def bench_message(self, event: dict[str, Any]) -> None:
        await self.send_json(event["body"])


Layer = Annotated[BaseChannelLayer, Depends(channel_layer_dependency())]

app = FastAPI(lifespan=channel_layers_lifespan())
app.add_api_websocket_route("/ws", RoomConsumer.as_endpoint())


@app.post("/broadcast")
async def broadcast(seq: int, layer: Layer) -> dict[str, str]:
    await layer.group_send(ROOM, {"type": "bench.message", "body": message(seq)})
    return {"status": "sent"}
