"""Text frames written straight to uvicorn's transport: the same bytes as the normal send path, or that path.

Each test runs the same session twice through real uvicorn and a real
client that records every byte the server sent after its handshake: once as
shipped and once with the direct path switched off. The two byte streams
must be equal, and the direct path must have been taken exactly where it is
safe (plain connections) and never where it is not (permessage-deflate, a
middleware wrapping ``send``, a transport paused for writing).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

import fastapi_websockets._direct as direct
import fastapi_websockets.consumers as consumers
from fastapi_websockets import AsyncJsonWebSocketConsumer, InMemoryChannelLayer, websocket_json_message
from fastapi_websockets._direct import direct_protocol, write_text
from tests.e2e.server import serve, serve_in_subprocess

#: The installed uvicorn, websockets and Starlette are versions whose send path the direct
#: path mirrors. Other versions must get the normal path only (and the same bytes), so a
#: dependency release turns the direct path off instead of turning the suite red.
REVIEWED = direct._known() is not None


class EchoConsumer(AsyncJsonWebSocketConsumer):
    """Sends what group messages carry, by ``send_json`` and ``send_text``; ``bye`` closes after a send."""

    groups = ("room",)
    opened: ClassVar[list[EchoConsumer]] = []
    #: Applied to the transport at connect (the slow-reader test pauses writing early).
    write_high_water: ClassVar[int | None] = None

    async def connect(self) -> None:
        await self.accept()
        # The module's own lookup, also when a test switched the consumer's off (None behind
        # the wrapping middleware).
        self.protocol = direct_protocol(self.websocket)
        if self.write_high_water is not None:
            assert self.protocol is not None
            self.protocol.transport.set_write_buffer_limits(high=self.write_high_water)
        self.opened.append(self)

    async def say_message(self, event: dict[str, Any]) -> None:
        await self.send_json(event["body"])

    async def text_message(self, event: dict[str, Any]) -> None:
        await self.send_text(event["text"])

    async def bye_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"bye": True})
        await self.close(4000, "bye")


class WrappingMiddleware:
    """A user's middleware that wraps ``send`` (here: counts the frames it passes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting_send(message: Message) -> None:
            if message["type"] == "websocket.send":
                self.sent += 1
            await send(message)

        await self.app(scope, receive, counting_send)


class RawClient:
    """A real client (websockets' sans-I/O protocol over a TCP socket) that keeps the server's bytes."""

    def __init__(self, url: str, *, deflate: bool, receive_buffer: int | None) -> None:
        self.url = url
        self.protocol = ClientProtocol(
            parse_uri(url), extensions=[ClientPerMessageDeflateFactory()] if deflate else None
        )
        self.receive_buffer = receive_buffer
        self.received = bytearray()
        self.handshake_end: int | None = None
        self.texts: list[str] = []
        self.closed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        parts = urlsplit(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        # A small limit: the stream stops reading the socket soon, so a client that does not
        # read lets the server's buffers fill.
        self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=1024)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.handshake_end is None:
            await self._read_once()

    def _flush(self) -> None:
        assert self._writer is not None
        for data in self.protocol.data_to_send():
            if data:
                self._writer.write(data)

    async def _read_once(self) -> bool:
        assert self._reader is not None
        data = await self._reader.read(65536)
        if not data:
            return False
        self.received += data
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                assert event.status_code == 101, event
                self.handshake_end = len(self.received) - len(data) + data.index(b"\r\n\r\n") + 4
            elif isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    self.texts.append(bytes(event.data).decode())
                elif event.opcode is Opcode.CLOSE:
                    self.closed.set()
        self._flush()
        return True

    async def read_until_closed(self) -> bytes:
        """Read until the server's close frame and the end of the stream; the bytes after the handshake."""
        while await asyncio.wait_for(self._read_once(), 20):
            pass
        assert self.closed.is_set()
        assert self._writer is not None
        self._writer.close()
        assert self.handshake_end is not None
        return bytes(self.received[self.handshake_end :])


Calls = list[tuple[bool, bool]]


@pytest.fixture
def direct_calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Every direct write tried: (the transport was writable, the frame went straight out)."""
    calls: Calls = []

    def spying_write_text(protocol: Any, websocket: WebSocket, text: str) -> bool:
        writable = protocol.writable.is_set()
        written = write_text(protocol, websocket, text)
        calls.append((writable, written))
        return written

    monkeypatch.setattr(consumers, "write_text", spying_write_text)
    return calls


@pytest.fixture(autouse=True)
def fresh_consumers() -> None:
    EchoConsumer.opened.clear()
    EchoConsumer.write_high_water = None


async def session(
    *,
    direct: bool,
    clients: int = 2,
    deflate: bool = False,
    middleware: bool = False,
    receive_buffer: int | None = None,
    messages: list[dict[str, Any]],
    before_reading: Callable[[], Any] | None = None,
) -> tuple[list[bytes], list[list[str]], int | None]:
    """Serve EchoConsumer, send ``messages`` to the room, then bye; each client's bytes and texts."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        if not direct:
            monkeypatch.setattr(consumers, "direct_protocol", lambda websocket: None)
        return await _session(clients, deflate, middleware, receive_buffer, messages, before_reading)


async def _session(
    clients: int,
    deflate: bool,
    middleware: bool,
    receive_buffer: int | None,
    messages: list[dict[str, Any]],
    before_reading: Callable[[], Any] | None,
) -> tuple[list[bytes], list[list[str]], int | None]:
    EchoConsumer.opened.clear()
    layer = InMemoryChannelLayer(capacity=10_000)
    api = FastAPI()
    api.add_api_websocket_route("/ws", EchoConsumer.as_endpoint(layer))
    app: Any = WrappingMiddleware(api) if middleware else api
    try:
        async with serve(app) as url:
            raw = [
                RawClient(f"{url}/ws", deflate=deflate, receive_buffer=receive_buffer) for _ in range(clients)
            ]
            for client in raw:
                await client.open()
            for _ in range(1000):
                if len(EchoConsumer.opened) == clients:
                    break
                await asyncio.sleep(0.01)
            assert len(EchoConsumer.opened) == clients
            for message in messages:
                await layer.group_send("room", message)
            await layer.group_send("room", {"type": "bye.message"})
            if before_reading is not None:
                await before_reading()
            streams = await asyncio.gather(*(client.read_until_closed() for client in raw))
    finally:
        await layer.close()
    return list(streams), [client.texts for client in raw], app.sent if middleware else None


def mixed() -> list[dict[str, Any]]:
    """JSON (shared texts), plain texts, unicode, a websocket.send envelope, sizes over 125 and 65535."""
    return [
        {"type": "say.message", "body": {"n": 1, "text": "héllo ☃"}},
        {"type": "text.message", "text": "plain"},
        {"type": "say.message", "body": {"n": 2, "big": "x" * 300}},
        websocket_json_message({"envelope": True}),
        {"type": "say.message", "body": {"n": 3, "huge": "y" * 70_000}},
        {"type": "text.message", "text": ""},
    ]


def expected_texts() -> list[str]:
    return [
        '{"n":1,"text":"héllo ☃"}',
        "plain",
        json.dumps({"n": 2, "big": "x" * 300}, separators=(",", ":")),
        '{"envelope":true}',
        json.dumps({"n": 3, "huge": "y" * 70_000}, separators=(",", ":")),
        "",
        '{"bye":true}',
    ]


async def test_plain_connections_get_the_normal_paths_bytes_straight_from_one_frame(
    direct_calls: Calls,
) -> None:
    normal, normal_texts, _ = await session(direct=False, messages=mixed())
    assert direct_calls == []
    fast, fast_texts, _ = await session(direct=True, messages=mixed())
    if REVIEWED:
        # Every frame of the session before the close went straight out.
        assert direct_calls == [(True, True)] * (len(expected_texts()) * 2)
    else:
        assert direct_calls == []  # no protocol found for versions nobody read
    assert fast == normal
    assert fast_texts == normal_texts == [expected_texts()] * 2
    # The close frame after the sends is there, once, at the end.
    assert all(stream.endswith(b"\x88\x05\x0f\xa0bye") for stream in fast)


async def test_permessage_deflate_takes_the_normal_path(direct_calls: Calls) -> None:
    normal, normal_texts, _ = await session(direct=False, deflate=True, messages=mixed())
    fast, fast_texts, _ = await session(direct=True, deflate=True, messages=mixed())
    assert direct_calls or not REVIEWED  # asked per write, and refused
    assert all(not written for _, written in direct_calls)
    assert fast == normal
    assert fast_texts == normal_texts == [expected_texts()] * 2
    # Compressed: the 70,000 bytes of "y" did not go out as they are.
    assert all(len(stream) < 10_000 for stream in fast)


async def test_a_middleware_that_wraps_send_sees_every_frame(direct_calls: Calls) -> None:
    normal, _, normal_sent = await session(direct=False, middleware=True, messages=mixed())
    fast, fast_texts, fast_sent = await session(direct=True, middleware=True, messages=mixed())
    assert direct_calls == []  # the wrapper is not one we know: no direct path at all
    assert fast == normal
    assert fast_sent == normal_sent == len(expected_texts()) * 2
    assert fast_texts == [expected_texts()] * 2


@pytest.mark.skipif(not REVIEWED, reason="the direct path is off for these uvicorn/websockets/Starlette")
async def test_a_slow_reader_pauses_the_direct_path_and_gets_every_frame_in_order(
    direct_calls: Calls,
) -> None:
    many = [{"type": "say.message", "body": {"n": n, "pad": "z" * 20_000}} for n in range(150)]

    async def until_paused() -> None:
        # The client reads nothing yet: wait until the server's transport stopped taking writes.
        for _ in range(2000):
            if all(
                consumer.protocol is not None and not consumer.protocol.writable.is_set()
                for consumer in EchoConsumer.opened
            ):
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the server's transport never paused writing")

    EchoConsumer.write_high_water = 4096
    normal, normal_texts, _ = await session(
        direct=False, receive_buffer=4096, messages=many, before_reading=until_paused
    )
    fast, fast_texts, _ = await session(
        direct=True, receive_buffer=4096, messages=many, before_reading=until_paused
    )
    assert fast == normal
    expected = [json.dumps({"n": n, "pad": "z" * 20_000}, separators=(",", ":")) for n in range(150)]
    assert fast_texts == normal_texts == [[*expected, '{"bye":true}']] * 2
    # Straight out while the transport took writes; never while it was paused (the normal path waits).
    assert any(written for _, written in direct_calls)
    assert any(not writable for writable, _ in direct_calls)
    assert all(not written for writable, written in direct_calls if not writable)


class EmptyFirstConsumer(AsyncJsonWebSocketConsumer):
    """Sends an empty text, then another, on connect: the first texts of its server process."""

    async def connect(self) -> None:
        await self.accept()
        await self.send_text("")
        await self.send_text("after")


empty_first_app = FastAPI()
empty_first_app.add_api_websocket_route("/ws", EmptyFirstConsumer.as_endpoint(InMemoryChannelLayer()))


async def test_an_empty_text_first_in_a_process_gets_its_frame() -> None:
    # The frame kept from the previous text starts as no text: "" (a singleton str) must not
    # match it and go out as no bytes at all.
    with serve_in_subprocess("tests.e2e.test_direct_frames:empty_first_app") as url:
        async with connect(f"{url}/ws", compression=None) as ws:  # deflate would skip the direct path
            assert await asyncio.wait_for(ws.recv(), 10) == ""
            assert await asyncio.wait_for(ws.recv(), 10) == "after"
