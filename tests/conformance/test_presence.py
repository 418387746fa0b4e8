"""Presence across layer instances, with join and leave events (issue 12), on every backend variant."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastapi_websockets import BaseChannelLayer
from fastapi_websockets.exceptions import InvalidMessage, SerializationError
from tests.conftest import LayerFactory
from tests.e2e.presence_peer import peer, peer_setup
from tests.faults import eventually, give_up_joins
from tests.servers import Backend

#: Backends whose presence is not written yet: their tests must fail with NotImplementedError.
PENDING: set[str] = set()


@pytest.fixture(autouse=True)
def _pending(backend: Backend, request: pytest.FixtureRequest) -> None:
    if backend.name.split("-")[0] in PENDING:
        request.applymarker(pytest.mark.xfail(raises=NotImplementedError, strict=True))


def pair(
    backend: Backend, make_layer: LayerFactory, **options: Any
) -> tuple[BaseChannelLayer, BaseChannelLayer]:
    """Two instances of one app (the same one where instances share nothing)."""
    first = make_layer(presence_timeout=3, **options)
    return first, make_layer(presence_timeout=3, **options) if backend.shared_between_instances else first


async def next_event(layer: BaseChannelLayer, channel: str) -> dict[str, Any]:
    return await layer.receive(channel, timeout=10)


async def test_join_update_leave_seen_from_another_instance(
    backend: Backend, make_layer: LayerFactory
) -> None:
    alice_layer, viewer = pair(backend, make_layer)
    alice = await alice_layer.new_channel("ws")
    bob = await viewer.new_channel("ws")
    await alice_layer.presence_join("room:1", alice, {"user": "alice"})
    await viewer.presence_join("room:1", bob, {"user": "bob"})
    assert await viewer.presence("room:1") == {alice: {"user": "alice"}, bob: {"user": "bob"}}
    assert await alice_layer.presence("room:1") == {alice: {"user": "alice"}, bob: {"user": "bob"}}

    await alice_layer.presence_join("room:1", alice, {"user": "alice", "status": "away"})
    assert (await viewer.presence("room:1"))[alice] == {"user": "alice", "status": "away"}

    await alice_layer.presence_leave("room:1", alice)
    assert await viewer.presence("room:1") == {bob: {"user": "bob"}}
    await alice_layer.presence_leave("room:1", alice)  # leaving twice is a no-op
    assert await viewer.presence("room:other") == {}


async def test_join_and_leave_events_reach_the_group(backend: Backend, make_layer: LayerFactory) -> None:
    joiner, watcher_layer = pair(backend, make_layer)
    watcher = await watcher_layer.new_channel("ws")
    await watcher_layer.group_add("room:2", watcher)
    newcomer = await joiner.new_channel("ws")
    await joiner.presence_join("room:2", newcomer, {"user": "carol"})
    assert await next_event(watcher_layer, watcher) == {
        "type": "presence.joined",
        "group": "room:2",
        "channel": newcomer,
        "info": {"user": "carol"},
    }
    await joiner.presence_leave("room:2", newcomer)
    left = await next_event(watcher_layer, watcher)
    assert left == {
        "type": "presence.left",
        "group": "room:2",
        "channel": newcomer,
        "info": {"user": "carol"},
    }

    quiet = await joiner.new_channel("ws")
    await joiner.presence_join("room:2", quiet, {"user": "dan"}, notify=False)
    await joiner.presence_leave("room:2", quiet, notify=False)
    with pytest.raises(TimeoutError):
        await watcher_layer.receive(watcher, timeout=0.5)


async def test_closing_a_layer_leaves_and_announces(backend: Backend, make_layer: LayerFactory) -> None:
    if not backend.shared_between_instances:
        pytest.skip("one in-memory instance is the whole app: nobody is left to watch it close")
    leaving, staying = pair(backend, make_layer)
    watcher = await staying.new_channel("ws")
    await staying.group_add("room:3", watcher)
    gone = await leaving.new_channel("ws")
    await leaving.presence_join("room:3", gone, {"user": "erin"}, notify=False)
    assert gone in await staying.presence("room:3")
    await leaving.close()
    assert await staying.presence("room:3") == {}
    assert (await next_event(staying, watcher))["type"] == "presence.left"


async def test_a_room_emptied_and_filled_again_keeps_one_heartbeat(
    backend: Backend, make_layer: LayerFactory
) -> None:
    # Found by the churn soak: every time the last member left and a new one joined, a broker
    # layer started one more heartbeat task, each beating and reaping for the layer's life.
    if not backend.shared_between_instances:
        pytest.skip("the in-memory layer needs no heartbeat")
    layer = make_layer(presence_timeout=3)
    for user in range(4):
        channel = await layer.new_channel("ws")
        await layer.presence_join("room:quiet", channel, {"user": user}, notify=False)
        await layer.presence_leave("room:quiet", channel, notify=False)
    beating = [task for task in asyncio.all_tasks() if task.get_name().endswith(".presence-heartbeat")]
    assert len(beating) == 1
    await layer.close()
    assert all(task.done() for task in beating)


async def test_info_must_be_a_dict_the_serializer_carries(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel("ws")
    with pytest.raises(InvalidMessage, match="dict"):
        await layer.presence_join("room:4", channel, ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(SerializationError):
        await layer.presence_join("room:4", channel, {"when": object()})
    assert await layer.presence("room:4") == {}


async def test_many_members_over_two_instances(backend: Backend, make_layer: LayerFactory) -> None:
    first, second = pair(backend, make_layer)
    per_instance = 2_000

    async def join_many(layer: BaseChannelLayer, who: str) -> set[str]:
        channels = {await layer.new_channel("ws") for _ in range(per_instance)}
        for start in range(0, per_instance, 200):
            batch = list(channels)[start : start + 200]
            await asyncio.gather(*(layer.presence_join("big", c, {"who": who}, notify=False) for c in batch))
        return channels

    mine = await join_many(first, "first")
    theirs = await join_many(second, "second") if second is not first else set()
    present = await second.presence("big")
    assert set(present) == mine | theirs
    assert sum(1 for info in present.values() if info == {"who": "first"}) == per_instance


async def test_concurrent_joins_updates_and_leaves_are_all_seen_in_call_order(
    backend: Backend, make_layer: LayerFactory
) -> None:
    # A consumer's connect joins while dozens of others do (the churn soak: 50 at a time).
    # Calls started in order take effect in that order, whoever waits for the broker
    # first: the second join's info wins, and a leave never lands before its join.
    owner, viewer = pair(backend, make_layer, capacity=500)  # room for every event
    watcher = await viewer.new_channel("ws")
    await viewer.group_add("room:busy", watcher)
    channels = [await owner.new_channel("ws") for _ in range(50)]
    calls = []
    for number, channel in enumerate(channels):
        calls.append(owner.presence_join("room:busy", channel, {"n": 1}))
        calls.append(owner.presence_join("room:busy", channel, {"n": 2}))
        if number % 2:
            calls.append(owner.presence_leave("room:busy", channel))
    await asyncio.gather(*calls)

    staying = {channel: {"n": 2} for number, channel in enumerate(channels) if number % 2 == 0}
    assert await viewer.presence("room:busy") == staying
    assert await owner.presence("room:busy") == staying
    events = [await next_event(viewer, watcher) for _ in range(len(calls))]
    for number, channel in enumerate(channels):
        mine = sorted((event["type"], event["info"]["n"]) for event in events if event["channel"] == channel)
        joined = [("presence.joined", 1), ("presence.joined", 2)]
        assert mine == ([*joined, ("presence.left", 2)] if number % 2 else joined)


async def test_a_join_its_caller_gave_up_on_leaves_no_entry_behind(
    backend: Backend, make_layer: LayerFactory
) -> None:
    # Cancelled before its write went out, while it was written, or after it was stored
    # but before its caller heard: that caller will not leave, so the entry must not stay.
    layer, viewer = pair(backend, make_layer)
    await layer.presence_join("room:g", await layer.new_channel("ws"), {}, notify=False)
    given_up = await give_up_joins(layer, "room:g")
    assert given_up  # a join that completed before its cancel is a join like any other
    assert not set(await viewer.presence("room:g")) & set(given_up)


async def test_a_dead_process_is_claimed_once_by_two_reaps_of_one_layer_at_once(
    backend: Backend, layers: list[BaseChannelLayer]
) -> None:
    # A manual presence_heartbeat() beside the background reaper: both reaped the same dead
    # process, and on RabbitMQ (whose claim is an exclusive queue, which the connection that
    # declared it may declare again) both won it: its leaves were announced twice. This layer
    # owns no entry, so no background reaper of its own runs: two heartbeats race instead.
    env, layer = peer_setup(backend, presence_timeout=2.0)
    layers.append(layer)
    watcher = await layer.new_channel("ws")
    await layer.group_add("room:once", watcher)
    async with peer(env, "room:once", 3) as (proc, theirs):
        assert set(await layer.presence("room:once")) == set(theirs)
        proc.kill()
        await proc.wait()

        async def silent() -> bool:
            return await layer.presence("room:once") == {}

        await eventually(silent, "the killed process's entries read as gone")
        await asyncio.gather(layer.presence_heartbeat(), layer.presence_heartbeat())
    # Sent once both reaps announced what they claimed: behind those announcements.
    await layer.group_send("room:once", {"type": "mark"})
    left = []
    while (event := await next_event(layer, watcher))["type"] != "mark":
        assert event["type"] == "presence.left"
        left.append(event["channel"])
    assert sorted(left) == sorted(theirs)
