"""``listen()``: the callback form of ``receive()`` that consumers use, on every backend."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_websockets import ChannelLayerClosed
from fastapi_websockets.exceptions import InvalidChannelName
from fastapi_websockets.types import Message
from tests.conftest import LayerFactory
from tests.servers import Backend


class Collector:
    """A listener that records what it was given and lets a test wait for it."""

    def __init__(self) -> None:
        self.items: list[Message | BaseException] = []
        self.arrived = asyncio.Event()

    def __call__(self, item: Message | BaseException) -> None:
        self.items.append(item)
        self.arrived.set()

    async def wait(self) -> Message | BaseException:
        await asyncio.wait_for(self.arrived.wait(), 10)
        self.arrived.clear()
        return self.items[-1]


async def test_listen_takes_what_is_queued_then_calls_back_once(
    backend: Backend, make_layer: LayerFactory
) -> None:
    layer = make_layer()
    sender = make_layer() if backend.shared_between_instances else layer
    channel = await layer.new_channel("ws")
    await layer.send(channel, {"type": "m", "n": 0})
    await layer.send(channel, {"type": "m", "n": 1})
    listener = Collector()
    assert layer.listen(channel, listener) == {"type": "m", "n": 0}
    assert layer.listen(channel, listener) == {"type": "m", "n": 1}
    assert layer.listen(channel, listener) is None  # nothing queued: the listener waits

    await sender.send(channel, {"type": "m", "n": 2})
    assert await listener.wait() == {"type": "m", "n": 2}
    # Called once: the next message is queued until someone listens or receives again.
    await sender.send(channel, {"type": "m", "n": 3})
    assert (await layer.receive(channel, timeout=10))["n"] == 3
    assert len(listener.items) == 1


async def test_group_messages_reach_listeners(backend: Backend, make_layer: LayerFactory) -> None:
    layer = make_layer()
    sender = make_layer() if backend.shared_between_instances else layer
    listeners = {}
    for _ in range(3):
        channel = await layer.new_channel("ws")
        await layer.group_add("room", channel)
        listeners[channel] = Collector()
        assert layer.listen(channel, listeners[channel]) is None
    await sender.group_send("room", {"type": "m", "text": "hi"})
    for listener in listeners.values():
        assert await listener.wait() == {"type": "m", "text": "hi"}


async def test_unlisten_withdraws_the_listener(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel("ws")
    listener = Collector()
    assert layer.listen(channel, listener) is None
    layer.unlisten(channel)
    await layer.send(channel, {"type": "m"})
    assert await layer.receive(channel, timeout=10) == {"type": "m"}
    assert listener.items == []


async def test_close_and_release_reach_the_listener(make_layer: LayerFactory) -> None:
    layer = make_layer()
    released, closed = await layer.new_channel("ws"), await layer.new_channel("ws")
    on_release, on_close = Collector(), Collector()
    assert layer.listen(released, on_release) is None
    assert layer.listen(closed, on_close) is None
    layer.forget_channel(released)
    assert isinstance(on_release.items[0], ChannelLayerClosed)
    with pytest.raises(InvalidChannelName, match="released"):
        layer.listen(released, on_release)
    await layer.close()
    assert isinstance(on_close.items[0], ChannelLayerClosed)
    assert len(on_release.items) == 1
    with pytest.raises(ChannelLayerClosed):
        layer.listen(closed, on_close)


async def test_listen_refuses_other_instances_channels(backend: Backend, make_layer: LayerFactory) -> None:
    layer = make_layer()
    with pytest.raises(InvalidChannelName):
        layer.listen("chat.room", Collector())  # a named channel: any process may receive it
    if backend.shared_between_instances:
        foreign = await make_layer().new_channel("ws")
        with pytest.raises(InvalidChannelName):
            layer.listen(foreign, Collector())
