"""The floor of the end-to-end benchmark: ``floor_app`` fed by one Redis pub/sub subscription.

No channel layer: each worker subscribes once to the room's Redis channel, and
every message read is put, as the text it arrived as, into every local
socket's queue (``floor_app.publish``'s fan-out). ``POST /broadcast``
publishes the JSON text once. What any library pays at least for this
workload through FastAPI, uvicorn and redis-py; not one of the peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as redis
from fastapi import FastAPI
from floor_app import queues, room
from payload import ROOM, message, redis_url
from redis.asyncio.client import PubSub

client = redis.Redis.from_url(redis_url())


async def relay(pubsub: PubSub) -> None:
    async for item in pubsub.listen():
        if item["type"] != "message":
            continue
        text = item["data"].decode()
        for queue in queues:
            queue.put_nowait(text)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(ROOM)
        reader = asyncio.create_task(relay(pubsub))
        try:
            yield
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    await client.aclose()


app = FastAPI(lifespan=lifespan)
app.add_api_websocket_route("/ws", room)


@app.post("/broadcast")
async def broadcast(seq: int) -> dict[str, str]:
    await client.publish(ROOM, json.dumps(message(seq)))
    return {"status": "sent"}
