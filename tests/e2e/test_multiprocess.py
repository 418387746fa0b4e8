"""Two uvicorn processes sharing one broker: the chat demo broadcasts across them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import pytest
from websockets.asyncio.client import connect

from tests.e2e.server import serve_in_subprocess
from tests.servers import Backend


async def test_chat_across_two_server_processes(backend: Backend) -> None:
    if not backend.shared_between_instances:
        pytest.skip("in-memory layers are process-local by design")
    if backend.env is None:
        pytest.fail(f"the {backend.name} test fixture does not say how to configure another process (env)")
    env = backend.env("e2e" + uuid.uuid4().hex[:8])
    with (
        serve_in_subprocess("examples.chat.app:app", env) as url1,
        serve_in_subprocess("examples.chat.app:app", env) as url2,
    ):
        async with connect(f"{url1}/ws/lobby?name=ann") as ann:
            assert json.loads(await asyncio.wait_for(ann.recv(), 20))["text"] == "ann joined"
            async with connect(f"{url2}/ws/lobby?name=bob") as bob:
                assert json.loads(await asyncio.wait_for(bob.recv(), 20))["text"] == "bob joined"
                assert json.loads(await asyncio.wait_for(ann.recv(), 20))["text"] == "bob joined"
                await bob.send(json.dumps({"text": "hi from process 2"}))
                expected = {"kind": "message", "user": "bob", "text": "hi from process 2"}
                assert json.loads(await asyncio.wait_for(ann.recv(), 20)) == expected
                assert json.loads(await asyncio.wait_for(bob.recv(), 20)) == expected
                request = urllib.request.Request(
                    url1.replace("ws://", "http://") + "/rooms/lobby/announce?text=hello", method="POST"
                )
                await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=20).read())
                announcement = {"kind": "notice", "text": "announcement: hello"}
                assert json.loads(await asyncio.wait_for(bob.recv(), 20)) == announcement
                assert json.loads(await asyncio.wait_for(ann.recv(), 20)) == announcement
