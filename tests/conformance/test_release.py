"""Releasing a channel whose connection ended: nothing addressed to it is kept (issue 15, item 7)."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_websockets import ChannelLayerClosed
from tests.conftest import LayerFactory
from tests.servers import Backend


async def test_released_channel_drops_what_it_held_and_what_comes_later(
    backend: Backend, make_layer: LayerFactory
) -> None:
    layer = make_layer()
    other = make_layer() if backend.shared_between_instances else layer
    channel = await layer.new_channel("ws")
    keeper = await layer.new_channel("ws")
    await layer.group_add("room", channel)
    await layer.group_add("room", keeper)
    for n in range(3):
        await layer.send(channel, {"type": "m", "n": n})
    layer.forget_channel(channel)
    assert layer.stats.dropped_released == 3

    await layer.send(channel, {"type": "m", "n": 3})  # accepted and dropped: nobody reads it
    await other.send(channel, {"type": "m", "n": 4})
    await other.group_send("room", {"type": "m", "n": 5})  # still a member in the broker
    assert (await layer.receive(keeper, timeout=10))["n"] == 5
    # The broker path is asynchronous: wait until both remote copies were dropped on arrival.
    for _ in range(200):
        if layer.stats.dropped_released == 6:
            break
        await asyncio.sleep(0.05)
    assert layer.stats.dropped_released == 6
    assert layer._mailboxes.pending(channel) == 0


async def test_a_receive_waiting_on_a_released_channel_is_woken(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel("ws")
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.01)
    layer.forget_channel(channel)
    with pytest.raises(ChannelLayerClosed, match="released"):
        await waiting
