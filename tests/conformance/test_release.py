"""Releasing a channel whose connection ended: nothing addressed to it is kept (issue 15, item 7)."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_websockets import ChannelLayerClosed
from fastapi_websockets.backends import base
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


HISTORY = {"room:*": {"size": 10, "ttl": 600}}


async def test_a_released_channel_keeps_no_catch_up_floor(make_layer: LayerFactory) -> None:
    # The demo's join: history first, then join from its end (which sets a floor for the channel).
    layer = make_layer(history=HISTORY)
    channel = await layer.new_channel("ws")
    latest = await layer.group_history("room:1")
    await layer.group_add("room:1", channel, since=latest.position)
    assert channel in layer._floors
    await layer.group_discard("room:1", channel)
    layer.forget_channel(channel)
    assert channel not in layer._floors


async def test_expired_floors_of_channels_never_released_are_swept(
    make_layer: LayerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Floors that expire at once: none may outlive the next sweep, which comes before 64 more.
    monkeypatch.setattr(base, "_FLOOR_SECONDS", -1.0)
    layer = make_layer(history=HISTORY)
    latest = await layer.group_history("room:1")
    for _ in range(130):
        await layer.group_add("room:1", await layer.new_channel("ws"), since=latest.position)
    assert 0 < len(layer._floors) < 64
