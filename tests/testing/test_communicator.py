"""WebsocketCommunicator and lifespan: what the test sees for each thing the app does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from fastapi import FastAPI, WebSocket

from fastapi_websockets import AsyncWebSocketConsumer, InMemoryChannelLayer, channel_layers_lifespan
from fastapi_websockets.testing import (
    ConnectionsLeftOpen,
    WebsocketClosed,
    WebsocketCommunicator,
    lifespan,
)


class Echo(AsyncWebSocketConsumer):
    disconnected: ClassVar[list[int | None]] = []

    async def connect(self) -> None:
        if self.query_params.get("token") != "ok":
            await self.close(4403)
            return
        offered = self.scope["subprotocols"]
        await self.accept(subprotocol=offered[0] if offered else None)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data == "headers":
            await self.send_text(repr(sorted(self.scope["headers"])))
        elif text_data == "bye":
            await self.close(4000, "asked to leave")
        elif text_data == "hang":
            await asyncio.Event().wait()
        else:
            await self.send(text_data=text_data, bytes_data=bytes_data)

    async def disconnect(self, close_code: int | None) -> None:
        await asyncio.sleep(0)  # the communicator must wait for an async disconnect() to finish
        self.disconnected.append(close_code)


def make_app() -> FastAPI:
    app = FastAPI(lifespan=channel_layers_lifespan({"default": {"BACKEND": "inmemory"}}))
    app.add_api_websocket_route("/echo", Echo.as_endpoint())
    return app


async def test_text_bytes_subprotocol_and_headers() -> None:
    app = make_app()
    async with lifespan(app):
        ws = WebsocketCommunicator(
            app, "/echo?token=ok", headers=[(b"Origin", b"http://testserver")], subprotocols=["chat"]
        )
        assert await ws.connect(timeout=1) == (True, "chat")
        await ws.send_to(text_data="héllo")
        assert await ws.receive_from() == "héllo"
        await ws.send_to(bytes_data=b"\x00\xff")
        assert await ws.receive_from() == b"\x00\xff"
        await ws.send_json_to({"a": [1, 2]})
        assert await ws.receive_json_from() == {"a": [1, 2]}
        await ws.send_to(text_data="headers")
        headers = await ws.receive_from()
        assert "(b'host', b'testserver')" in headers
        assert "(b'origin', b'http://testserver')" in headers
        assert await ws.receive_nothing(timeout=0.05)
        await ws.disconnect(code=1001)
    assert Echo.disconnected[-1] == 1001


async def test_rejection_gives_the_close_code() -> None:
    app = make_app()
    async with lifespan(app):
        ws = WebsocketCommunicator(app, "/echo?token=bad")
        assert await ws.connect() == (False, 4403)
        await ws.disconnect()


async def test_timeout_names_what_was_expected_and_keeps_the_connection() -> None:
    app = make_app()
    async with lifespan(app), WebsocketCommunicator(app, "/echo?token=ok") as ws:
        await ws.connect()
        with pytest.raises(TimeoutError, match=r"expected a frame within 0.05 s, but the app sent nothing"):
            await ws.receive_from(timeout=0.05)
        await ws.send_to(text_data="still here")
        assert await ws.receive_from() == "still here"


async def test_app_closing_is_reported_with_code_and_reason() -> None:
    app = make_app()
    async with lifespan(app):
        ws = WebsocketCommunicator(app, "/echo?token=ok")
        await ws.connect()
        await ws.send_to(text_data="bye")
        with pytest.raises(WebsocketClosed, match="code 4000: 'asked to leave'") as closed:
            await ws.receive_json_from()
        assert (closed.value.code, closed.value.reason) == (4000, "asked to leave")
        assert isinstance(closed.value, TimeoutError)
        assert await ws.receive_nothing()  # the close was read above; nothing follows it
        assert await ws.wait_closed() == 4000
        await ws.disconnect()


async def test_wait_closed_skips_frames_and_times_out_when_open() -> None:
    app = make_app()
    async with lifespan(app):
        ws = WebsocketCommunicator(app, "/echo?token=ok")
        await ws.connect()
        with pytest.raises(TimeoutError, match=r"expected the app to close the WebSocket within 0\.05 s"):
            await ws.wait_closed(timeout=0.05)
        await ws.send_to(text_data="one")
        await ws.send_to(text_data="bye")
        assert await ws.wait_closed() == 4000
        await ws.disconnect()


async def test_disconnect_cancels_an_app_that_does_not_return() -> None:
    app = make_app()
    async with lifespan(app):
        ws = WebsocketCommunicator(app, "/echo?token=ok")
        await ws.connect()
        await ws.send_to(text_data="hang")
        with pytest.raises(
            TimeoutError, match=r"did not return within 0\.05 s after the client disconnected"
        ):
            await ws.disconnect(timeout=0.05)
        await ws.disconnect()  # a second call does nothing


async def test_an_exception_of_a_plain_endpoint_is_raised_with_its_traceback() -> None:
    app = FastAPI()

    @app.websocket("/fail")
    async def fail(websocket: WebSocket) -> None:
        await websocket.accept()
        message = await websocket.receive_text()
        raise ValueError(f"cannot handle {message}")

    ws = WebsocketCommunicator(app, "/fail")
    assert await ws.connect() == (True, None)
    await ws.send_to(text_data="this")
    with pytest.raises(ValueError, match="cannot handle this") as raised:
        await ws.receive_from()
    assert raised.traceback[-1].name == "fail"
    assert await ws.wait_closed() == 1011  # what a server sends for a failed app
    await ws.disconnect()


async def test_an_unread_app_exception_is_raised_by_disconnect() -> None:
    class Broken(AsyncWebSocketConsumer):
        async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
            raise LookupError("lost")

    app = FastAPI()
    app.add_api_websocket_route("/", Broken.as_endpoint(InMemoryChannelLayer()))
    ws = WebsocketCommunicator(app, "/")
    await ws.connect()
    await ws.send_to(text_data="x")
    with pytest.raises(LookupError, match="lost"):
        await ws.disconnect()


async def test_lifespan_state_reaches_connections() -> None:
    @contextlib.asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"greeting": "hello"}

    app = FastAPI(lifespan=app_lifespan)

    @app.websocket("/")
    async def greet(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.state.greeting)
        await websocket.close()

    async with lifespan(app) as state:
        assert state == {"greeting": "hello"}
        ws = WebsocketCommunicator(app, "/")
        await ws.connect()
        assert await ws.receive_from() == "hello"
        assert await ws.wait_closed() == 1000
        await ws.disconnect()


async def test_failed_startup_raises_the_apps_exception() -> None:
    @contextlib.asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise ConnectionRefusedError("no database")
        yield

    with pytest.raises(ConnectionRefusedError, match="no database"):
        async with lifespan(FastAPI(lifespan=app_lifespan)):
            pass


async def test_a_connection_left_open_in_lifespan_is_reported_and_cancelled() -> None:
    app = make_app()
    calls = len(Echo.disconnected)

    opened: list[WebsocketCommunicator] = []

    async def leave_one_open() -> None:
        async with lifespan(app):
            opened.append(WebsocketCommunicator(app, "/echo?token=ok"))
            await opened[0].connect()

    with pytest.raises(
        ConnectionsLeftOpen,
        match=r"WebsocketCommunicator\('/echo\?token=ok'\) opened at .*test_communicator.py:\d+",
    ) as left:
        await leave_one_open()
    assert len(left.value.connections) == 1
    assert len(Echo.disconnected) == calls + 1  # the consumer was cancelled, and its disconnect() ran
    await opened[0].disconnect()  # nothing left to do


async def test_calls_before_connect_say_so() -> None:
    ws = WebsocketCommunicator(make_app(), "/echo")
    with pytest.raises(RuntimeError, match=r"not connected; call `await communicator\.connect\(\)` first"):
        await ws.receive_from()
    await ws.disconnect()
