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
#: None in a queue ends its endpoint (see :func:`end_sockets`).
queues: set[asyncio.Queue[str | None]] = set()


@app.websocket("/ws")
async def room(websocket: WebSocket) -> None:
    await websocket.accept()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    queues.add(queue)
    try:
        while (text := await queue.get()) is not None:
            await websocket.send_text(text)
    finally:
        queues.discard(queue)


async def publish(seq: int) -> None:
    """Broadcast message ``seq`` to every socket of this process."""
    text = json.dumps(message(seq))
    for queue in queues:
        queue.put_nowait(text)


def end_sockets() -> None:
    """End every socket's endpoint, once its client has gone.

    An endpoint never reads, so it does not see its client close: without
    this, uvicorn's shutdown waits out its graceful timeout and cancels each
    one, logging a traceback per socket.
    """
    for queue in queues:
        queue.put_nowait(None)
