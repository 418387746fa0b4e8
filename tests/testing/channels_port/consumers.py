"""A room consumer written the way a Django Channels project writes it.

Against Channels it differs only in its imports, the class name's spelling
(``AsyncWebSocketConsumer``) and the route: Channels reads
``self.scope["url_route"]["kwargs"]``, FastAPI gives ``self.path_params``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

from fastapi_websockets import AsyncWebSocketConsumer


class RoomConsumer(AsyncWebSocketConsumer):
    async def connect(self) -> None:
        self.room_name = self.path_params["room_name"]
        self.room_group_name = f"room_{self.room_name}"
        if self.room_name == "private" and self.scope.get("user") != "admin":
            await self.close(code=4003)
            return
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, close_code: int | None) -> None:
        if hasattr(self, "room_group_name"):
            await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if bytes_data is not None:
            await self.send(bytes_data=bytes_data[::-1])
            return
        assert text_data is not None
        message = json.loads(text_data)["message"]
        await self.channel_layer.group_send(
            self.room_group_name, {"type": "room.message", "message": message}
        )

    async def room_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps({"message": event["message"]}))


# The Channels project's `application = URLRouter([path("ws/room/<room_name>/", RoomConsumer.as_asgi())])`.
application = FastAPI()
application.add_api_websocket_route("/ws/room/{room_name}/", RoomConsumer.as_endpoint())
