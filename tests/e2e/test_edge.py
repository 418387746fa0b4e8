"""Origin checks, frame size limits and flood control through real uvicorn and real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    AsyncWebSocketConsumer,
    History,
    InMemoryChannelLayer,
    StreamPosition,
)
from tests.e2e.server import serve

CONNECTS: list[str] = []
DISCONNECTS: list[int | None] = []
DISPATCHED: list[str] = []


class CountingLayer(InMemoryChannelLayer):
    """The in-memory layer, counting the channels and memberships consumers create."""

    def __init__(self) -> None:
        super().__init__()
        self.channels_created = 0
        self.groups_joined = 0

    async def new_channel(self, prefix: str = "specific") -> str:
        self.channels_created += 1
        return await super().new_channel(prefix)

    async def group_add(
        self, group: str, channel: str, *, since: StreamPosition | None = None
    ) -> History | None:
        self.groups_joined += 1
        return await super().group_add(group, channel, since=since)


class Echo(AsyncWebSocketConsumer):
    """Same-origin default; joins a group before connect() so a refusal would show."""

    groups = ("watchers",)

    async def connect(self) -> None:
        CONNECTS.append(type(self).__name__)
        await self.accept()

    async def receive_text(self, text_data: str) -> None:
        DISPATCHED.append(text_data[:20])
        await self.send_text(text_data.upper())

    async def receive_bytes(self, bytes_data: bytes) -> None:
        DISPATCHED.append(f"{len(bytes_data)} bytes")
        await self.send_bytes(bytes_data)

    async def disconnect(self, close_code: int | None) -> None:
        DISCONNECTS.append(close_code)


class Listed(Echo):
    allowed_origins: ClassVar[list[str] | None] = ["https://app.example.com", "https://*.example.com"]


class Anyone(Echo):
    allowed_origins: ClassVar[list[str] | None] = ["*"]


class OriginRequired(Echo):
    require_origin = True


class SameOriginPinned(Echo):
    allowed_origins = None  # set on the class: wins over FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS


class Throttled(Echo):
    max_frames_per_second = 50


class BigFrames(Echo):
    max_frame_bytes = 4 * 1024 * 1024


class JsonRecorder(AsyncJsonWebSocketConsumer):
    @classmethod
    def decode_json(cls, text_data: str) -> Any:
        DISPATCHED.append(f"parsed {len(text_data)}")
        return super().decode_json(text_data)

    async def receive_json(self, content: Any) -> None:
        await self.send_json(content)


ROUTES: dict[str, type[AsyncWebSocketConsumer]] = {
    "echo": Echo,
    "listed": Listed,
    "anyone": Anyone,
    "required": OriginRequired,
    "pinned": SameOriginPinned,
    "throttled": Throttled,
    "big": BigFrames,
    "json": JsonRecorder,
}


@pytest.fixture
async def layer() -> AsyncIterator[CountingLayer]:
    layer = CountingLayer()
    yield layer
    await layer.close()


@pytest.fixture
async def url(layer: CountingLayer) -> AsyncIterator[str]:
    """A server with every consumer above; built per test, so environment settings apply."""
    CONNECTS.clear()
    DISCONNECTS.clear()
    DISPATCHED.clear()
    app = FastAPI()
    for path, consumer in ROUTES.items():
        app.add_api_websocket_route(f"/{path}", consumer.as_endpoint(layer))
    async with serve(app) as base:
        yield base


def same_origin(url: str) -> Origin:
    return Origin(url.replace("ws://", "http://"))


async def echoes(ws: ClientConnection, text: str = "ping") -> bool:
    await ws.send(text)
    return await asyncio.wait_for(ws.recv(), 10) == text.upper()


async def refused(url: str, origin: str | None) -> int:
    """Connect with this Origin header; return the HTTP status of the refusal."""
    with pytest.raises(InvalidStatus) as info:
        await connect(url, origin=Origin(origin) if origin is not None else None)
    return info.value.response.status_code


async def closed_with(ws: ClientConnection) -> int | None:
    """Read (and drop) what the server still sends until it closes; return the close code."""

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    # Reading matters: a client that stops reading never sees the server's close.
    await asyncio.wait_for(drain(), 30)
    return ws.close_code


# ------------------------------------------------------------------ origins


async def test_same_origin_is_allowed(url: str) -> None:
    async with connect(f"{url}/echo", origin=same_origin(url)) as ws:
        assert await echoes(ws)
    assert CONNECTS == ["Echo"]


async def test_another_origin_is_refused_before_connect(
    url: str, layer: CountingLayer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fastapi_websockets.consumers"):
        assert await refused(f"{url}/echo", "https://evil.example") == 403
    assert CONNECTS == []
    assert DISCONNECTS == []
    assert (layer.channels_created, layer.groups_joined) == (0, 0)
    refusals = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.INFO
    assert "https://evil.example" in refusals[0].getMessage()


async def test_another_port_on_the_same_host_is_another_origin(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    assert await refused(f"{url}/echo", f"http://127.0.0.1:{port + 1}") == 403


async def test_no_origin_header_is_allowed_unless_required(url: str, layer: CountingLayer) -> None:
    async with connect(f"{url}/echo") as ws:
        assert await echoes(ws)
    assert await refused(f"{url}/required", None) == 403
    async with connect(f"{url}/required", origin=same_origin(url)) as ws:
        assert await echoes(ws)
    assert CONNECTS == ["Echo", "OriginRequired"]
    assert layer.channels_created == 2


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://chat.example.com", True),
        ("https://a.b.example.com", False),
        ("https://example.com.evil.net", False),
        ("https://example.com", False),
        ("http://chat.example.com", False),
    ],
)
async def test_listed_origins_and_one_level_wildcards(url: str, origin: str, allowed: bool) -> None:
    if allowed:
        async with connect(f"{url}/listed", origin=Origin(origin)) as ws:
            assert await echoes(ws)
        assert CONNECTS == ["Listed"]
    else:
        assert await refused(f"{url}/listed", origin) == 403
        assert CONNECTS == []


async def test_a_list_replaces_the_same_origin_default(url: str) -> None:
    assert await refused(f"{url}/listed", same_origin(url)) == 403


async def test_star_allows_any_origin(url: str) -> None:
    async with connect(f"{url}/anyone", origin=Origin("https://evil.example")) as ws:
        assert await echoes(ws)


# ------------------------------------------------------------------ frames


async def test_oversized_frame_closes_with_1009_and_is_not_dispatched(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    two_mib = "x" * (2 * 1024 * 1024)
    async with connect(f"{url}/json") as big, connect(f"{url}/echo") as other:
        with caplog.at_level(logging.INFO, logger="fastapi_websockets.consumers"):
            await big.send(json.dumps(two_mib))
            assert await closed_with(big) == 1009
        assert DISPATCHED == []  # not even decoded
        assert await echoes(other)
    closes = [record for record in caplog.records if "1009" in record.getMessage()]
    assert len(closes) == 1
    assert closes[0].levelno == logging.INFO


async def test_oversized_binary_frame_closes_with_1009(url: str) -> None:
    async with connect(f"{url}/echo") as ws:
        await ws.send(b"\x00" * (1024 * 1024 + 1))
        assert await closed_with(ws) == 1009
    assert DISPATCHED == []
    assert DISCONNECTS == [1009]


async def test_a_class_can_raise_the_frame_limit(url: str) -> None:
    async with connect(f"{url}/big", max_size=None) as ws:
        await ws.send(b"\x00" * (2 * 1024 * 1024))
        assert len(await asyncio.wait_for(ws.recv(), 10)) == 2 * 1024 * 1024


async def flood(ws: ClientConnection, frames: int = 5000) -> None:
    """Send small frames as fast as the connection takes them, until done or closed."""
    with contextlib.suppress(ConnectionClosed):
        for _ in range(frames):
            await ws.send("x")


async def test_flood_closes_with_1008_while_others_keep_echoing(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with connect(f"{url}/throttled") as flooder, connect(f"{url}/throttled") as calm:
        with caplog.at_level(logging.INFO, logger="fastapi_websockets.consumers"):
            await flood(flooder)
            assert await closed_with(flooder) == 1008
        assert await echoes(calm)
        assert await echoes(calm, "still here")
    assert DISCONNECTS.count(1008) == 1
    # A burst of 2 s worth passed; far fewer than the 5,000 sent were dispatched.
    assert 100 <= DISPATCHED.count("x") < 5000
    closes = [record for record in caplog.records if "1008" in record.getMessage()]
    assert len(closes) == 1


# ------------------------------------------------------------------ environment


@pytest.fixture
def env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_ALLOWED_ORIGINS", "https://*.example.org")
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES", "1000")
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_MAX_FRAMES_PER_SECOND", "20")


@pytest.mark.usefixtures("env_settings")
async def test_environment_sets_every_consumer_without_its_own_value(url: str) -> None:
    async with connect(f"{url}/echo", origin=Origin("https://app.example.org")) as ws:
        assert await echoes(ws, "y" * 1000)
        await ws.send("y" * 1001)
        assert await closed_with(ws) == 1009
    assert await refused(f"{url}/echo", same_origin(url)) == 403
    async with connect(f"{url}/echo") as ws:
        await flood(ws)
        assert await closed_with(ws) == 1008


@pytest.mark.usefixtures("env_settings")
async def test_class_attributes_win_over_the_environment(url: str) -> None:
    assert await refused(f"{url}/listed", "https://app.example.org") == 403
    async with connect(f"{url}/listed", origin=Origin("https://app.example.com")) as ws:
        assert await echoes(ws)
    assert await refused(f"{url}/pinned", "https://app.example.org") == 403
    async with connect(f"{url}/pinned", origin=same_origin(url)) as ws:
        assert await echoes(ws)
    async with connect(f"{url}/big") as ws:
        await ws.send(b"\x00" * 5000)
        assert len(await asyncio.wait_for(ws.recv(), 10)) == 5000


async def test_a_bad_environment_value_fails_at_mount_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi_websockets import InvalidChannelLayerConfig

    monkeypatch.setenv("FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES", "1MiB")
    with pytest.raises(InvalidChannelLayerConfig, match="FASTAPI_WEBSOCKETS_MAX_FRAME_BYTES='1MiB'"):
        Echo.as_endpoint()
