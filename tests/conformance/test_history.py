"""Group history and exact recovery (issue 11), on every backend variant."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastapi_websockets import BaseChannelLayer, History, InvalidChannelLayerConfig, StreamPosition
from fastapi_websockets.exceptions import InvalidMessage
from tests.conftest import LayerFactory
from tests.servers import Backend

#: Backends whose history is not written yet: their tests must fail with NotImplementedError.
PENDING: set[str] = set()


@pytest.fixture(autouse=True)
def _pending(request: pytest.FixtureRequest) -> None:
    name = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    stores = request.node.get_closest_marker("stores_history") is not None
    if stores and name is not None and name.split("-")[0] in PENDING:
        request.applymarker(pytest.mark.xfail(raises=NotImplementedError, strict=True))


#: Tests that store history (the others run on every backend already).
stores_history = pytest.mark.stores_history

HISTORY = {
    "room:*": {"size": 50, "ttl": 600},
    "big:*": 1000,
    "tiny:*": 5,
    "short:*": {"size": 10, "ttl": 0.5},
}


def two_layers(backend: Backend, make_layer: LayerFactory, **options: Any) -> tuple[BaseChannelLayer, ...]:
    """A sender and a receiver instance (the same one where instances share nothing)."""
    first = make_layer(history=HISTORY, **options)
    second = make_layer(history=HISTORY, **options) if backend.shared_between_instances else first
    return first, second


async def drain(layer: BaseChannelLayer, channel: str, count: int) -> list[dict[str, Any]]:
    return [await layer.receive(channel, timeout=10) for _ in range(count)]


@stores_history
async def test_group_send_returns_positions_and_members_get_them(
    backend: Backend, make_layer: LayerFactory
) -> None:
    sender, receiver = two_layers(backend, make_layer)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("room:1", channel)
    first = await sender.group_send("room:1", {"type": "chat.message", "n": 1})
    second = await sender.group_send("room:1", {"type": "chat.message", "n": 2})
    assert isinstance(first, StreamPosition)
    assert isinstance(second, StreamPosition)
    assert second.offset > first.offset
    assert second.epoch == first.epoch
    got = await drain(receiver, channel, 2)
    assert [StreamPosition(**m["_position"]) for m in got] == [first, second]
    assert got[0] == {
        "type": "chat.message",
        "n": 1,
        "_position": {"offset": first.offset, "epoch": first.epoch},
    }
    if type(sender).contiguous_history_offsets:
        assert second.offset == first.offset + 1


async def test_groups_without_history_pay_nothing(backend: Backend, make_layer: LayerFactory) -> None:
    sender, receiver = two_layers(backend, make_layer)
    channel = await receiver.new_channel("ws")
    await receiver.group_add("lobby", channel)
    assert await sender.group_send("lobby", {"type": "x"}) is None
    assert await receiver.receive(channel, timeout=10) == {"type": "x"}
    with pytest.raises(InvalidChannelLayerConfig, match="history"):
        await sender.group_history("lobby")


@stores_history
async def test_offsets_from_concurrent_senders_are_unique_and_increasing(
    backend: Backend, make_layer: LayerFactory
) -> None:
    layers = [make_layer(history=HISTORY) for _ in range(3 if backend.shared_between_instances else 1)]

    async def burst(layer: BaseChannelLayer, who: int) -> list[StreamPosition]:
        return [await layer.group_send("room:c", {"type": "m", "who": who, "i": i}) for i in range(15)]  # type: ignore[misc]

    results = await asyncio.gather(*(burst(layer, who) for who, layer in enumerate(layers)))
    offsets = [position.offset for result in results for position in result]
    assert len(set(offsets)) == len(offsets)
    for result in results:  # per sender, in the order it sent
        assert [p.offset for p in result] == sorted(p.offset for p in result)
    page = await layers[0].group_history("room:c")
    assert [m["_position"]["offset"] for m in page.messages] == sorted(offsets)
    assert page.recovered
    if type(layers[0]).contiguous_history_offsets:
        assert sorted(offsets) == list(range(min(offsets), min(offsets) + len(offsets)))


@stores_history
async def test_history_since_a_position_is_exactly_what_was_missed(
    backend: Backend, make_layer: LayerFactory
) -> None:
    sender, reader = two_layers(backend, make_layer)
    positions = [await sender.group_send("room:h", {"type": "m", "i": i}) for i in range(10)]
    assert all(positions)
    seen = positions[3]
    assert seen is not None
    page = await reader.group_history("room:h", since=seen)
    assert isinstance(page, History)
    assert [m["i"] for m in page.messages] == [4, 5, 6, 7, 8, 9]
    assert page.recovered
    assert page.position == positions[-1]
    # More missing than the limit: the newest `limit`, not recovered.
    page = await reader.group_history("room:h", since=seen, limit=4)
    assert [m["i"] for m in page.messages] == [6, 7, 8, 9]
    assert not page.recovered
    # Nothing missed.
    page = await reader.group_history("room:h", since=positions[-1])
    assert page.messages == []
    assert page.recovered


@stores_history
async def test_history_of_a_new_group_is_empty_at_offset_zero(make_layer: LayerFactory) -> None:
    layer = make_layer(history=HISTORY)
    page = await layer.group_history("room:empty")
    assert page.messages == []
    assert page.position.offset == 0
    assert page.recovered


@stores_history
async def test_trim_by_size(make_layer: LayerFactory) -> None:
    layer = make_layer(history=HISTORY)
    positions = [await layer.group_send("tiny:1", {"type": "m", "i": i}) for i in range(8)]
    first = positions[0]
    assert first is not None
    page = await layer.group_history("tiny:1", since=first)
    assert [m["i"] for m in page.messages] == [3, 4, 5, 6, 7]
    assert not page.recovered  # 1 and 2 were trimmed
    since = positions[2]
    assert since is not None
    page = await layer.group_history("tiny:1", since=since)
    assert [m["i"] for m in page.messages] == [3, 4, 5, 6, 7]
    assert page.recovered


@stores_history
async def test_trim_by_ttl(make_layer: LayerFactory) -> None:
    layer = make_layer(history=HISTORY)
    before = await layer.group_send("short:1", {"type": "m", "i": 0})
    await layer.group_send("short:1", {"type": "m", "i": 1})
    assert before is not None
    await asyncio.sleep(1.5)
    page = await layer.group_history("short:1", since=before)
    assert page.messages == []
    assert not page.recovered


@stores_history
async def test_another_epoch_is_not_recovered(make_layer: LayerFactory) -> None:
    layer = make_layer(history=HISTORY)
    for i in range(3):
        await layer.group_send("room:e", {"type": "m", "i": i})
    page = await layer.group_history("room:e", since=StreamPosition(1, "some-other-epoch"))
    assert not page.recovered
    assert [m["i"] for m in page.messages] == [0, 1, 2]


@stores_history
async def test_wiped_history_gets_a_new_epoch(make_layer: LayerFactory) -> None:
    layer = make_layer(history=HISTORY)
    before = await layer.group_send("room:w", {"type": "m"})
    assert before is not None
    await layer.flush()
    after = await layer.group_send("room:w", {"type": "m"})
    assert after is not None
    assert after.epoch != before.epoch
    page = await layer.group_history("room:w", since=before)
    assert not page.recovered


async def test_reserved_position_key_is_refused(make_layer: LayerFactory) -> None:
    layer = make_layer(history=HISTORY)
    with pytest.raises(InvalidMessage, match="_position"):
        await layer.group_send("room:r", {"type": "m", "_position": 1})


@stores_history
async def test_catch_up_while_another_layer_publishes_is_exact(
    backend: Backend, make_layer: LayerFactory
) -> None:
    """Every message is in the page or live, never both, never neither, in order."""
    publisher, joiner = two_layers(backend, make_layer, capacity=1000)
    total = 200
    sent: list[StreamPosition] = []
    halfway = asyncio.Event()

    async def publish() -> None:
        for i in range(total):
            position = await publisher.group_send("big:x", {"type": "m", "i": i})
            assert position is not None
            sent.append(position)
            if i == 60:
                halfway.set()
            if i % 10 == 0:
                await asyncio.sleep(0)

    task = asyncio.ensure_future(publish())
    waiter = asyncio.ensure_future(halfway.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # the publisher failed: show why
    since = sent[20]
    channel = await joiner.new_channel("ws")
    page = await joiner.group_add("big:x", channel, since=since)
    await task
    assert page is not None
    assert page.recovered
    live_count = sum(1 for p in sent if p.offset > page.position.offset)
    live = await drain(joiner, channel, live_count)
    assert await _nothing_more(joiner, channel)
    offsets = [m["_position"]["offset"] for m in page.messages] + [m["_position"]["offset"] for m in live]
    expected = [p.offset for p in sent if p.offset > since.offset]
    assert offsets == expected
    assert all(m["_position"]["offset"] > page.position.offset for m in live)


async def _nothing_more(layer: BaseChannelLayer, channel: str) -> bool:
    try:
        extra = await layer.receive(channel, timeout=0.5)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected extra message {extra!r}")


async def test_exclude_skips_one_channel_or_a_set(backend: Backend, make_layer: LayerFactory) -> None:
    sender, receiver = two_layers(backend, make_layer)
    a, b, c = [await receiver.new_channel("ws") for _ in range(3)]
    for channel in (a, b, c):
        await receiver.group_add("lobby", channel)
    await sender.group_send("lobby", {"type": "m", "n": 1}, exclude=a)
    await sender.group_send("lobby", {"type": "m", "n": 2}, exclude={a, b})
    assert [m["n"] for m in await drain(receiver, b, 1)] == [1]
    for_c = await drain(receiver, c, 2)
    assert for_c == [{"type": "m", "n": 1}, {"type": "m", "n": 2}]  # no reserved key left in
    assert await _nothing_more(receiver, a)
    assert await _nothing_more(receiver, b)


@stores_history
async def test_history_pages_carry_no_exclude_key(backend: Backend, make_layer: LayerFactory) -> None:
    sender, receiver = two_layers(backend, make_layer)
    skipped = await receiver.new_channel("ws")
    await receiver.group_add("room:ex", skipped)
    position = await sender.group_send("room:ex", {"type": "m", "n": 1}, exclude=skipped)
    assert position is not None
    page = await sender.group_history("room:ex")
    assert page.messages == [{"type": "m", "n": 1, "_position": position.as_dict()}]
    assert await _nothing_more(receiver, skipped)
