"""python-socketio 5 with AsyncRedisManager, served as ASGI by uvicorn, as its docs show."""

from __future__ import annotations

from typing import Any

import socketio
from payload import ROOM, message, redis_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

sio = socketio.AsyncServer(async_mode="asgi", client_manager=socketio.AsyncRedisManager(redis_url()))


@sio.event
async def connect(sid: str, environ: dict[str, Any]) -> None:
    await sio.enter_room(sid, ROOM)


async def publish(request: Request) -> JSONResponse:
    seq = int(request.query_params["seq"])
    await sio.emit("bench", message(seq), room=ROOM)
    return JSONResponse({"status": "sent"})


http = Starlette(routes=[Route("/broadcast", publish, methods=["POST"])])
app = socketio.ASGIApp(sio, other_asgi_app=http, socketio_path="socket.io")
