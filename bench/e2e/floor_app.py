"""The floor for ``bench/profile_consumer.py``: FastAPI, no channel layer, one queue per socket.

Each socket's endpoint task waits on its own queue, and a broadcast puts the
text, encoded once, into every queue: what any library pays at least for
fan-out through FastAPI and uvicorn. Not one of the benchmark's peers.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, WebSocket
from payload import message

app = FastAPI()
queues: set[asyncio.Queue[str]] = set()


@app.websocket("/ws")
async def room(websocket: WebSocket) -> None:
    await websocket.accept()
    queue: asyncio.Queue[str] = asyncio.Queue()
    queues.add(queue)
    try:
        while True:
            await websocket.send_text(await queue.get())
    finally:
        queues.discard(queue)


async def publish(seq: int) -> None:
    """Broadcast message ``seq`` to every socket of this process."""
    text = json.dumps(message(seq))
    for queue in queues:
        queue.put_nowait(text)
