"""How the hook points call the installed observers (without installing any: hooks are built directly)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastapi_websockets import AsyncWebSocketConsumer, InMemoryChannelLayer
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.observing import Hooks, Observer
from fastapi_websockets.types import Message


class Recorder(Observer):
    """Logs the hooks it gets; its token for an event is its name."""

    def __init__(self, name: str, log: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.log = log

    def layer_created(self, layer: BaseChannelLayer) -> None:
        self.log.append((self.name, "layer"))

    def frame_out(self, consumer: AsyncWebSocketConsumer) -> None:
        self.log.append((self.name, "frame out"))

    def event_in(self, consumer: AsyncWebSocketConsumer, event: str, message: Message) -> object:
        self.log.append((self.name, "in", event))
        return f"token of {self.name}"

    def event_in_done(self, token: object, error: BaseException | None) -> None:
        self.log.append((self.name, "done", token, error))


class DoneOnly(Recorder):
    """Implements the end of an event but not its start: its token is the base class's None."""

    event_in = Observer.event_in


class Silent(Observer):
    """Leaves every hook a no-op."""


@pytest.fixture
async def consumer() -> Any:
    layer = InMemoryChannelLayer()
    yield AsyncWebSocketConsumer(layer)
    await layer.close()


async def test_several_observers_are_called_in_order_and_ended_in_reverse(consumer: Any) -> None:
    log: list[tuple[Any, ...]] = []
    hooks = Hooks((Recorder("a", log), Silent(), Recorder("b", log)))
    error = ValueError("handler failed")
    token = hooks.event_in(consumer, "chat.message", {"type": "chat.message"})
    hooks.event_in_done(token, error)
    hooks.layer_created(consumer.channel_layer)
    hooks.frame_out(consumer)
    assert log == [
        ("a", "in", "chat.message"),
        ("b", "in", "chat.message"),
        ("b", "done", "token of b", error),
        ("a", "done", "token of a", error),
        ("a", "layer"),
        ("b", "layer"),
        ("a", "frame out"),
        ("b", "frame out"),
    ]


async def test_one_observer_gets_its_own_token_and_no_op_hooks_stay_silent(consumer: Any) -> None:
    log: list[tuple[Any, ...]] = []
    hooks = Hooks((Silent(), DoneOnly("done-only", log)))
    hooks.event_in_done(hooks.event_in(consumer, "other", {"type": "x"}), None)
    hooks.layer_created(consumer.channel_layer)
    assert log == [("done-only", "done", None, None), ("done-only", "layer")]

    log.clear()
    hooks = Hooks((Recorder("only", log),))
    hooks.event_in_done(hooks.event_in(consumer, "chat.message", {"type": "chat.message"}), None)
    assert log == [("only", "in", "chat.message"), ("only", "done", "token of only", None)]

    silent = Hooks((Silent(),))
    silent.layer_created(consumer.channel_layer)
    silent.frame_out(consumer)
    silent.event_in_done(silent.event_in(consumer, "chat.message", {"type": "chat.message"}), None)


async def test_a_layer_counts_every_message_it_hands_to_a_receiver() -> None:
    # Without any instrumentation: the count is the layer's own, read by metrics at scrape time.
    layer = InMemoryChannelLayer()
    try:
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "queued"})
        assert layer.stats.received == 0
        assert await layer.receive(channel) == {"type": "queued"}
        await layer.send(channel, {"type": "queued"})
        assert layer.listen(channel, lambda item: None) == {"type": "queued"}
        handed: list[object] = []
        assert layer.listen(channel, handed.append) is None
        await layer.send(channel, {"type": "to the listener"})
        assert handed == [{"type": "to the listener"}]
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0)
        await layer.group_add("g", channel)
        await layer.group_send("g", {"type": "to the waiter"})
        assert await waiting == {"type": "to the waiter"}
        assert layer.stats.received == 4
        assert (layer.stats.dropped_full, layer.stats.dropped_expired) == (0, 0)
    finally:
        await layer.close()
