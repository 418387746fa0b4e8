"""Presence across OS processes: a peer process's entries are seen, and vanish (with leave events)
after it is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from fastapi_websockets import BaseChannelLayer
from tests.conformance.test_presence import PENDING
from tests.conftest import LayerFactory
from tests.e2e.presence_peer import peer, peer_setup
from tests.servers import Backend

TIMEOUT = 2.0


@pytest.fixture(autouse=True)
def _pending(backend: Backend, request: pytest.FixtureRequest) -> None:
    if backend.name.split("-")[0] in PENDING:
        request.applymarker(pytest.mark.xfail(raises=NotImplementedError, strict=True))


async def test_a_killed_process_disappears_and_its_leaves_are_announced(
    backend: Backend, make_layer: LayerFactory, layers: list[BaseChannelLayer]
) -> None:
    env, layer = peer_setup(backend, TIMEOUT)
    layers.append(layer)
    watcher = await layer.new_channel("ws")
    await layer.group_add("room:k", watcher)
    await layer.presence_join("room:k", watcher, {"user": "watcher"}, notify=False)
    async with peer(env, "room:k", 3) as (proc, theirs):
        assert set(await layer.presence("room:k")) == {watcher, *theirs}
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed_at = time.monotonic()
        left: set[str] = set()
        while left != set(theirs):
            event = await layer.receive(watcher, timeout=TIMEOUT + 5)
            assert event["type"] == "presence.left"
            left.add(event["channel"])
        assert time.monotonic() - killed_at <= TIMEOUT + 2
    assert await layer.presence("room:k") == {watcher: {"user": "watcher"}}


async def test_presence_of_two_processes_with_many_members(
    backend: Backend, make_layer: LayerFactory, layers: list[BaseChannelLayer]
) -> None:
    env, layer = peer_setup(backend, TIMEOUT)
    layers.append(layer)
    mine = [await layer.new_channel("ws") for _ in range(5_000)]
    for start in range(0, len(mine), 250):
        batch = mine[start : start + 250]
        await asyncio.gather(*(layer.presence_join("room:many", c, {"n": 1}, notify=False) for c in batch))
    async with peer(env, "room:many", 5_000) as (_, theirs):
        present = await layer.presence("room:many")
        assert set(present) == set(mine) | set(theirs)
        assert len(present) == 10_000
