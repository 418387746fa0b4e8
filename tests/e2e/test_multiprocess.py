"""Two uvicorn processes sharing one broker: the chat demo across them (chat, presence, recovery)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import pytest
from websockets.asyncio.client import connect

from tests.e2e.demo import check_demo_backend, demo_pending, next_frame
from tests.e2e.server import serve_in_subprocess
from tests.servers import Backend


@pytest.fixture(autouse=True)
def _pending(backend: Backend, request: pytest.FixtureRequest) -> None:
    if demo_pending(backend):
        request.applymarker(pytest.mark.xfail(raises=NotImplementedError, strict=True))


async def test_chat_across_two_server_processes(backend: Backend) -> None:
    if not backend.shared_between_instances:
        pytest.skip("in-memory layers are process-local by design")
    if backend.env is None:
        pytest.fail(f"the {backend.name} test fixture does not say how to configure another process (env)")
    namespace = "e2e" + uuid.uuid4().hex[:8]
    await check_demo_backend(backend, namespace)
    env = backend.env(namespace)
    with (
        serve_in_subprocess("examples.chat.app:app", env) as url1,
        serve_in_subprocess("examples.chat.app:app", env) as url2,
    ):
        async with connect(f"{url1}/ws/lobby?name=ann") as ann:
            ann_worker = (await next_frame(ann, "hello"))["worker"]
            await next_frame(ann, "online")
            async with connect(f"{url2}/ws/lobby?name=bob") as bob:
                bob_worker = (await next_frame(bob, "hello"))["worker"]
                assert bob_worker != ann_worker
                online = await next_frame(bob, "online")
                assert sorted((m["name"], m["worker"]) for m in online["members"]) == sorted(
                    [("ann", ann_worker), ("bob", bob_worker)]
                )
                bob_joined = await next_frame(ann, "joined")
                if bob_joined["name"] == "ann":  # its own presence.joined came first
                    bob_joined = await next_frame(ann, "joined")
                assert (bob_joined["name"], bob_joined["worker"]) == ("bob", bob_worker)

                await bob.send(json.dumps({"text": "hi from process 2"}))
                expected = {"kind": "message", "user": "bob", "text": "hi from process 2"}
                first = await next_frame(ann, "message")
                assert first == {**first, **expected, "replay": None}
                assert await next_frame(bob, "message") == first

                request = urllib.request.Request(
                    url1.replace("ws://", "http://") + "/rooms/lobby/announce?text=hello", method="POST"
                )
                await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=20).read())
                announcement = await next_frame(bob, "notice")
                assert announcement["text"] == "announcement: hello"
                assert await next_frame(ann, "notice") == announcement
                last = announcement["position"]
            assert (await next_frame(ann, "left"))["name"] == "bob"

        # ann is gone; bob writes in between; ann comes back on the other process with its position.
        async with connect(f"{url2}/ws/lobby?name=bob") as bob:
            await next_frame(bob, "online")
            for text in ("missed 1", "missed 2"):
                await bob.send(json.dumps({"text": text}))
                await next_frame(bob, "message")
            query = f"offset={last['offset']}&epoch={last['epoch']}"
            async with connect(f"{url2}/ws/lobby?name=ann&{query}") as ann:
                frames = [await next_frame(ann)]
                while frames[-1]["kind"] != "synced":
                    frames.append(await next_frame(ann))
                replayed = [(f["text"], f["replay"]) for f in frames if f["kind"] == "message"]
                assert replayed == [("missed 1", "recovered"), ("missed 2", "recovered")]
                assert frames[-1]["recovered"] is True
