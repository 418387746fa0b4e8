"""The pytest plugin, run in fresh pytest processes: opt-in, pytest-asyncio and anyio, asyncio and uvloop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

APP = """
from typing import Any

from fastapi import FastAPI

from fastapi_websockets import AsyncJsonWebSocketConsumer


class Room(AsyncJsonWebSocketConsumer):
    groups = ("room",)

    async def receive_json(self, content: Any) -> None:
        await self.group_send("room", {"type": "room.say", "text": content["text"]})

    async def room_say(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"]})


app = FastAPI()
app.add_api_websocket_route("/ws", Room.as_endpoint())
"""

TESTS = """
import asyncio

from fastapi_websockets.testing import WebsocketCommunicator
from room_app import app

{marker}


async def test_the_fixture_layer_reaches_the_app(channel_layer, {loop_arg}):
    ws = WebsocketCommunicator(app, "/ws")
    assert (await ws.connect())[0]
    await channel_layer.group_send("room", {{"type": "room.say", "text": "from the test"}})
    assert await ws.receive_json_from() == {{"text": "from the test"}}
    await ws.send_json_to({{"text": "from the client"}})
    assert await ws.receive_json_from() == {{"text": "from the client"}}
    await ws.disconnect()
    print("LOOP", type(asyncio.get_running_loop()).__module__)


async def test_left_open(channel_layer, {loop_arg}):
    ws = WebsocketCommunicator(app, "/ws")
    await ws.connect()  # left open
"""

ANYIO_CONFTEST = """
import pytest

BACKENDS = [("asyncio", {"use_uvloop": False}), ("asyncio", {"use_uvloop": True})]

@pytest.fixture(params=BACKENDS, ids=["asyncio", "uvloop"])
def anyio_backend(request):
    return request.param
"""

UVLOOP_CONFTEST = """
import asyncio

import uvloop


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
"""


def run_pytest(tmp_path: Path, ini: str, marker: str, conftest: str = "", *args: str) -> str:
    (tmp_path / "room_app.py").write_text(APP)
    loop_arg = "anyio_backend" if "anyio" in marker else "request"
    (tmp_path / "test_rooms.py").write_text(TESTS.format(marker=marker, loop_arg=loop_arg))
    (tmp_path / "conftest.py").write_text(conftest)
    if "no:asyncio" not in args:
        ini += "asyncio_default_fixture_loop_scope = function\n"
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n" + ini)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-rA", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout + result.stderr


def check_outcome(output: str, loops: int, tmp_path: Path) -> None:
    assert f"{2 * loops} passed, {loops} error" in output, output
    # The left-open test errors at teardown, naming the connection and the line that opened it.
    assert "ConnectionsLeftOpen: 1 WebSocket connection(s) still open at the end" in output, output
    assert "WebsocketCommunicator('/ws') opened at " in output
    line = (tmp_path / "test_rooms.py").read_text().splitlines().index(
        "    await ws.connect()  # left open"
    ) + 1
    assert f"test_rooms.py:{line}\n" in output, output


def test_pytest_asyncio_strict_mode_with_asyncio_and_uvloop(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    output = run_pytest(
        tmp_path,
        "asyncio_mode = strict\n",
        "import pytest\npytestmark = pytest.mark.asyncio",
        UVLOOP_CONFTEST,
        "-p",
        "fastapi_websockets.pytest_plugin",
    )
    check_outcome(output, 2, tmp_path)
    assert "LOOP asyncio" in output
    assert "LOOP uvloop" in output


def test_pytest_asyncio_auto_mode_enabled_by_the_ini_switch(tmp_path: Path) -> None:
    output = run_pytest(tmp_path, "asyncio_mode = auto\nfastapi_websockets_plugin = true\n", "")
    check_outcome(output, 1, tmp_path)


def test_anyio_plugin_alone_with_asyncio_and_uvloop(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    output = run_pytest(
        tmp_path,
        "",
        "import pytest\npytestmark = pytest.mark.anyio",
        ANYIO_CONFTEST,
        "-p",
        "no:asyncio",
        "-p",
        "fastapi_websockets.pytest_plugin",
    )
    check_outcome(output, 2, tmp_path)
    assert "LOOP asyncio" in output
    assert "LOOP uvloop" in output


def test_installed_but_not_enabled_the_plugin_does_nothing(tmp_path: Path) -> None:
    output = run_pytest(tmp_path, "asyncio_mode = auto\n", "", "", "--fixtures")
    assert "fastapi_websockets_plugin" not in output
    assert "channel_layer" not in output, output
    output = run_pytest(tmp_path, "asyncio_mode = auto\n", "")
    assert "fixture 'channel_layer' not found" in output, output
