"""A consumer's events task between bursts: it may wait for the next event, never for ever.

On Python 3.10/3.11 the events task, done with a burst, waits for the next
event instead of ending (a task per burst costs more there than the burst's
handler), and one sweeper per event loop ends the tasks that waited a whole
period. Through uvicorn and real clients, on the in-memory layer.
"""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from fastapi_websockets import AsyncJsonWebSocketConsumer, InMemoryChannelLayer
from fastapi_websockets import consumers as consumers_module
from tests.e2e.server import serve

ROOM = "lingering"


class Room(AsyncJsonWebSocketConsumer):
    groups = (ROOM,)

    async def connect(self) -> None:
        await self.accept()
        await self.send_json({"event": "hello"})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"n": event["n"]})


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, InMemoryChannelLayer]]:
    layer = InMemoryChannelLayer()
    app = FastAPI()
    app.add_api_websocket_route("/ws", Room.as_endpoint(layer))
    async with serve(app) as url:
        yield url, layer
    await layer.close()


async def recv_json(ws: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def open_clients(url: str, count: int) -> list[ClientConnection]:
    clients = []
    for _ in range(count):
        ws = await connect(f"{url}/ws")
        assert await recv_json(ws) == {"event": "hello"}
        clients.append(ws)
    return clients


def events_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "AsyncWebSocketConsumer._handle_events"
    ]


async def test_connections_that_go_idle_after_events_hold_no_events_task(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, layer = served
    clients = await open_clients(url, 20)
    assert events_tasks() == []
    for n in range(3):
        await layer.group_send(ROOM, {"type": "chat.message", "n": n})
    for ws in clients:
        assert [(await recv_json(ws))["n"] for _ in range(3)] == [0, 1, 2]
    # Python 3.12+: none was left; 3.10/3.11: the sweeper ends them within two periods.
    for _ in range(100):
        if not events_tasks():
            break
        await asyncio.sleep(0.1)
    assert events_tasks() == []
    # The listener that starts a task is back in place: the next event gets through.
    await layer.group_send(ROOM, {"type": "chat.message", "n": 3})
    for ws in clients:
        assert await recv_json(ws) == {"n": 3}
        await ws.close()


@pytest.mark.skipif(not consumers_module._LINGER, reason="events tasks wait between bursts only on 3.10/3.11")
async def test_an_event_sent_as_the_sweeper_ends_the_wait_is_handled_once_and_in_order(
    served: tuple[str, InMemoryChannelLayer],
) -> None:
    url, layer = served
    clients = await open_clients(url, 5)
    await layer.group_send(ROOM, {"type": "chat.message", "n": 0})
    for ws in clients:
        assert await recv_json(ws) == {"n": 0}
    sweeper = consumers_module._sweeper_for(asyncio.get_running_loop())
    # Each client got its event once its task had written it, and that step went on to wait.
    assert len(sweeper.waiting) == len(clients)
    assert len(events_tasks()) == len(clients)
    # Two sweeps in a row end every wait; the events below arrive before the ended tasks
    # run again (no await in between), so they are queued and must be taken from the queue.
    sweeper._sweep(asyncio.get_running_loop())
    sweeper._sweep(asyncio.get_running_loop())
    assert sweeper.waiting == set()
    for n in (1, 2):
        layer.deliver_to_local_members(ROOM, {"type": "chat.message", "n": n})
    await layer.group_send(ROOM, {"type": "chat.message", "n": 3})
    for ws in clients:
        assert [(await recv_json(ws))["n"] for _ in range(3)] == [1, 2, 3]
    await layer.group_send(ROOM, {"type": "chat.message", "n": 4})
    for ws in clients:
        assert await recv_json(ws) == {"n": 4}
        await ws.close()


class Tracked(Room):
    instances: ClassVar[list[weakref.ref[Tracked]]] = []

    async def connect(self) -> None:
        Tracked.instances.append(weakref.ref(self))
        await super().connect()


async def test_a_connection_that_ends_while_its_events_task_waits_leaves_no_garbage_cycle() -> None:
    # Ended by cancellation, the waiting task would keep a CancelledError whose traceback
    # holds the task's frame, which holds the task (and the consumer): freed only by the
    # garbage collector, once per connection under churn.
    layer = InMemoryChannelLayer()
    app = FastAPI()
    app.add_api_websocket_route("/ws", Tracked.as_endpoint(layer))
    Tracked.instances.clear()
    gc.collect()
    gc.disable()
    try:
        async with serve(app) as url:
            (ws,) = await open_clients(url, 1)
            await layer.group_send(ROOM, {"type": "chat.message", "n": 1})
            assert await recv_json(ws) == {"n": 1}
            await ws.close()
            (consumer,) = Tracked.instances
            for _ in range(500):
                if consumer() is None:
                    break
                await asyncio.sleep(0.01)
            assert consumer() is None
    finally:
        gc.enable()
        await layer.close()
