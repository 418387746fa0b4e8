"""encode/broadcaster 0.3.1, as its README's chat example (Starlette, anyio task group)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import anyio
from broadcaster import Broadcast
from payload import ROOM, message, redis_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

broadcast = Broadcast(redis_url())


async def room_ws(websocket: WebSocket) -> None:
    await websocket.accept()

    async with anyio.create_task_group() as tasks:

        async def receiver() -> None:
            async for text in websocket.iter_text():
                await broadcast.publish(channel=ROOM, message=text)
            tasks.cancel_scope.cancel()

        async def sender() -> None:
            async with broadcast.subscribe(channel=ROOM) as subscriber:
                async for event in subscriber:
                    await websocket.send_text(event.message)

        tasks.start_soon(receiver)
        tasks.start_soon(sender)


async def publish(request: Request) -> JSONResponse:
    seq = int(request.query_params["seq"])
    await broadcast.publish(channel=ROOM, message=json.dumps(message(seq)))
    return JSONResponse({"status": "sent"})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()


app = Starlette(
    routes=[WebSocketRoute("/ws", room_ws), Route("/broadcast", publish, methods=["POST"])],
    lifespan=lifespan,
)
