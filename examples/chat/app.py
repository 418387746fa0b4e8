"""A small multi-room chat: the demo app of the README.

Run it with ``bash scripts/demo`` and open http://127.0.0.1:8000. It uses the
in-memory layer unless the environment says otherwise, e.g.
``FASTAPI_WEBSOCKETS_BACKEND=redis FASTAPI_WEBSOCKETS_REDIS_URL=redis://127.0.0.1:6379/0``;
with a broker, start several workers and chat across them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    BaseChannelLayer,
    channel_layer_dependency,
    channel_layers_lifespan,
)

PAGE = (Path(__file__).parent / "index.html").read_text()


class ChatConsumer(AsyncJsonWebSocketConsumer):
    """One browser tab in one room."""

    async def connect(self) -> None:
        self.room = f"room:{self.path_params['room']}"
        self.user = self.query_params.get("name") or "anonymous"
        await self.group_add(self.room)
        await self.accept()
        await self.group_send(self.room, {"type": "chat.notice", "text": f"{self.user} joined"})

    async def receive_json(self, content: Any) -> None:
        text = str(content.get("text", "")).strip()[:500] if isinstance(content, dict) else ""
        if text:
            await self.group_send(self.room, {"type": "chat.message", "user": self.user, "text": text})

    async def disconnect(self, close_code: int | None) -> None:
        if hasattr(self, "room"):
            await self.channel_layer.group_send(
                self.room, {"type": "chat.notice", "text": f"{self.user} left"}
            )

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "message", "user": event["user"], "text": event["text"]})

    async def chat_notice(self, event: dict[str, Any]) -> None:
        await self.send_json({"kind": "notice", "text": event["text"]})


Layer = Annotated[BaseChannelLayer, Depends(channel_layer_dependency())]

app = FastAPI(title="fastapi-websockets chat", lifespan=channel_layers_lifespan())
app.add_api_websocket_route("/ws/{room}", ChatConsumer.as_endpoint())


@app.get("/", response_class=HTMLResponse)
async def index() -> str:
    """The chat page."""
    return PAGE.replace("{{WORKER}}", str(os.getpid()))


@app.post("/rooms/{room}/announce")
async def announce(room: str, text: str, layer: Layer) -> dict[str, str]:
    """Broadcast a server announcement into a room, from any worker."""
    await layer.group_send(f"room:{room}", {"type": "chat.notice", "text": f"announcement: {text}"})
    return {"status": "sent"}
