"""fastapi-websockets with a ``websocket_json_message`` envelope: no handler in the consumer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI
from payload import ROOM, message

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    BaseChannelLayer,
    channel_layer_dependency,
    channel_layers_lifespan,
    websocket_json_message,
)


class RoomConsumer(AsyncJsonWebSocketConsumer):
    groups = (ROOM,)


def event(seq: int) -> dict[str, Any]:
    """Broadcast ``seq`` as the channel event this app sends (read by bench/profile_consumer.py too)."""
    return websocket_json_message(message(seq))


Layer = Annotated[BaseChannelLayer, Depends(channel_layer_dependency())]

app = FastAPI(lifespan=channel_layers_lifespan())
app.add_api_websocket_route("/ws", RoomConsumer.as_endpoint())


@app.post("/broadcast")
async def broadcast(seq: int, layer: Layer) -> dict[str, str]:
    await layer.group_send(ROOM, event(seq))
    return {"status": "sent"}
