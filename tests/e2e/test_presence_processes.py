"""Presence across OS processes: a peer process's entries are seen, and vanish (with leave events)
after it is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fastapi_websockets import BaseChannelLayer
from tests.conformance.test_presence import PENDING
from tests.conftest import LayerFactory
from tests.e2e.server import ROOT
from tests.servers import Backend

TIMEOUT = 2.0


@pytest.fixture(autouse=True)
def _pending(backend: Backend, request: pytest.FixtureRequest) -> None:
    if backend.name.split("-")[0] in PENDING:
        request.applymarker(pytest.mark.xfail(raises=NotImplementedError, strict=True))


@asynccontextmanager
async def peer(env: dict[str, str], group: str, count: int) -> AsyncIterator[tuple[Process, list[str]]]:
    # An asyncio subprocess: this process's event loop keeps beating while the peer joins,
    # or its own entries would go (a process that stalls past presence_timeout is dead).
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.presence_peer",
        group,
        str(count),
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 24,  # one line names every channel the peer joined
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        line = (await proc.stdout.readline()).decode().strip()
        if not line:
            with contextlib.suppress(ProcessLookupError):  # it may have exited already
                proc.kill()
            error = (await proc.stderr.read()).decode()
            raise AssertionError(f"the peer process did not join: {error[-2000:]}")
        yield proc, line.split(",")
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
            proc.kill()
        await proc.wait()


def setup(backend: Backend, make_layer: LayerFactory) -> tuple[dict[str, str], BaseChannelLayer]:
    if not backend.shared_between_instances:
        pytest.skip("in-memory layers are process-local by design")
    if backend.env is None:
        pytest.fail(f"the {backend.name} test fixture does not say how to configure another process (env)")
    namespace = "p" + uuid.uuid4().hex[:8]
    env = backend.env(namespace)
    prefix = env["FASTAPI_WEBSOCKETS_BACKEND"].upper()
    env[f"FASTAPI_WEBSOCKETS_{prefix}_PRESENCE_TIMEOUT"] = str(TIMEOUT)
    return env, backend.build(namespace, presence_timeout=TIMEOUT)


async def test_a_killed_process_disappears_and_its_leaves_are_announced(
    backend: Backend, make_layer: LayerFactory, layers: list[BaseChannelLayer]
) -> None:
    env, layer = setup(backend, make_layer)
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
    env, layer = setup(backend, make_layer)
    layers.append(layer)
    mine = [await layer.new_channel("ws") for _ in range(5_000)]
    for start in range(0, len(mine), 250):
        batch = mine[start : start + 250]
        await asyncio.gather(*(layer.presence_join("room:many", c, {"n": 1}, notify=False) for c in batch))
    async with peer(env, "room:many", 5_000) as (_, theirs):
        present = await layer.presence("room:many")
        assert set(present) == set(mine) | set(theirs)
        assert len(present) == 10_000
