"""A small multi-room chat: the demo app of the README.

Run it with ``bash scripts/demo`` and open http://127.0.0.1:8000: one
process on the in-memory layer. The real thing is several workers sharing a
broker, which the environment selects (see .env.sample)::

    FASTAPI_WEBSOCKETS_BACKEND=redis FASTAPI_WEBSOCKETS_REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn examples.chat.app:app --workers 2

Each page tells which worker serves its WebSocket, shows the room's recent
history when it joins, who is online (presence), and after a dropped
connection reconnects with the position of the last message it saw and shows
what it missed, marked as recovered.
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
    StreamPosition,
    channel_layer_dependency,
    channel_layers_lifespan,
    parse_channel_layers_from_env,
)
from fastapi_websockets.types import Message

PAGE = (Path(__file__).parent / "index.html").read_text()

#: Every room keeps its last 100 messages for an hour, unless the environment sets ``history``.
ROOM_HISTORY = {"room:*": {"size": 100, "ttl": 3600}}


def demo_channel_layers() -> dict[str, dict[str, Any]]:
    """The demo's ``CHANNEL_LAYERS``: the backend the environment names, with room history.

    ``FASTAPI_WEBSOCKETS_*`` variables choose the backend and its options as
    for any app; ``FASTAPI_WEBSOCKETS_<BACKEND>_HISTORY`` replaces the rooms' history.
    """
    layers: dict[str, dict[str, Any]] = {}
    for alias, settings in parse_channel_layers_from_env().items():
        layers[alias] = {"BACKEND": settings.backend, "CONFIG": {"history": ROOM_HISTORY, **settings.config}}
    return layers


def _position(query: dict[str, str]) -> StreamPosition | None:
    """The last position a reconnecting page saw (``?offset=&epoch=``), or None."""
    offset, epoch = query.get("offset", ""), query.get("epoch", "")
    if not offset.isdigit() or not epoch:
        return None
    return StreamPosition(int(offset), epoch)


class ChatConsumer(AsyncJsonWebSocketConsumer):
    """One browser tab in one room: chat, the room's history, who is online, and recovery."""

    async def connect(self) -> None:
        self.room = f"room:{self.path_params['room']}"
        self.user = (self.query_params.get("name") or "").strip()[:40] or "anonymous"
        #: How the messages being dispatched reach the page: "history", "recovered" or None (live).
        self.replay: str | None = None
        await self.accept()
        await self.send_json({"kind": "hello", "worker": os.getpid(), "channel": self.channel_name})
        if self.channel_layer.history_policy(self.room) is None:
            await self.group_add(self.room)
        else:
            await self._join_with_history()
        await self.presence_join(self.room, {"name": self.user, "worker": os.getpid()})
        online = await self.channel_layer.presence(self.room)
        await self.send_json({"kind": "online", "members": [_member(c, i) for c, i in online.items()]})

    async def _join_with_history(self) -> None:
        since = _position(self.query_params)
        self.replay = "recovered"
        if since is None:
            # A new page: the recent history, then join from its end so nothing falls in between.
            self.replay = "history"
            latest = await self.channel_layer.group_history(self.room)
            for message in latest.messages:
                await self.dispatch_channel_message(message)
            since = latest.position
        try:
            page = await self.group_add(self.room, since=since)
        finally:
            self.replay = None
        if page is not None:
            synced = {"position": page.position.as_dict(), "recovered": page.recovered}
            await self.send_json({"kind": "synced", **synced})

    async def receive_json(self, content: Any) -> None:
        text = str(content.get("text", "")).strip()[:500] if isinstance(content, dict) else ""
        if text:
            await self.group_send(self.room, {"type": "chat.message", "user": self.user, "text": text})

    async def chat_message(self, event: Message) -> None:
        await self.send_json(
            {"kind": "message", "user": event["user"], "text": event["text"], **self._origin(event)}
        )

    async def chat_notice(self, event: Message) -> None:
        await self.send_json({"kind": "notice", "text": event["text"], **self._origin(event)})

    async def presence_joined(self, event: Message) -> None:
        await self.send_json({"kind": "joined", **_member(event["channel"], event["info"])})

    async def presence_left(self, event: Message) -> None:
        await self.send_json({"kind": "left", **_member(event["channel"], event["info"])})

    def _origin(self, event: Message) -> dict[str, Any]:
        return {"position": event.get("_position"), "replay": self.replay}


def _member(channel: str, info: dict[str, Any]) -> dict[str, Any]:
    return {"channel": channel, "name": info.get("name", "?"), "worker": info.get("worker")}


Layer = Annotated[BaseChannelLayer, Depends(channel_layer_dependency())]

app = FastAPI(title="fastapi-websockets chat", lifespan=channel_layers_lifespan(demo_channel_layers()))
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
