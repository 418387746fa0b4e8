"""Consumers end to end: a real uvicorn server, real WebSocket clients, the in-memory layer."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from fastapi_websockets import (
    AsyncJsonWebSocketConsumer,
    AsyncWebSocketConsumer,
    BaseChannelLayer,
    InMemoryChannelLayer,
    channel_layer_dependency,
    channel_layers_lifespan,
    close_default_layers,
    get_default_layer,
    send_bytes_message,
    send_json_message,
    websocket_json_message,
)
from fastapi_websockets.history import History, StreamPosition
from tests.e2e.server import serve


class RoomConsumer(AsyncJsonWebSocketConsumer):
    """Joins room {room}; relays what clients send to the whole room (as naive apps do)."""

    async def connect(self) -> None:
        self.room = self.path_params["room"]
        if self.room == "forbidden":
            await self.close(4003)
            return
        await self.group_add(self.room)
        await self.accept()
        await self.send_json({"event": "connected", "channel": self.channel_name, "query": self.query_params})

    async def receive_json(self, content: Any) -> None:
        if content.get("action") == "relay":
            # Forwards client-chosen event dicts to the group: the dispatcher must stay safe.
            await self.group_send(self.room, content["event"])
        elif content.get("action") == "say":
            await self.group_send(self.room, {"type": "chat.message", "text": content["text"]})
        elif content.get("action") == "crash":
            raise RuntimeError("boom in receive_json")
        elif content.get("action") == "close":
            await self.close(content["code"])

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"event": "chat", "text": event["text"]})

    async def explode(self, event: dict[str, Any]) -> None:
        raise RuntimeError("boom in an event handler")

    async def kick(self, event: dict[str, Any]) -> None:
        await self.close(event["code"])

    async def disconnect(self, close_code: int | None) -> None:
        DISCONNECTS.append((self.channel_name, close_code))


DISCONNECTS: list[tuple[str, int | None]] = []


class TextConsumer(AsyncWebSocketConsumer):
    groups = ("everyone",)

    async def receive_text(self, text_data: str) -> None:
        await self.send_text(text_data.upper())

    async def receive_bytes(self, bytes_data: bytes) -> None:
        await self.send_bytes(bytes_data[::-1])


@pytest.fixture
async def app_url() -> AsyncIterator[str]:
    await close_default_layers()
    app = FastAPI()
    # No layer passed: every connection must share the process-wide default layer.
    app.add_api_websocket_route("/rooms/{room}", RoomConsumer.as_endpoint())
    app.add_api_websocket_route("/text", TextConsumer.as_endpoint())
    DISCONNECTS.clear()
    async with serve(app) as url:
        yield url
    await close_default_layers()


async def recv_json(ws: ClientConnection, timeout: float = 10) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def join(url: str, room: str, **kwargs: Any) -> tuple[ClientConnection, str]:
    ws = await connect(f"{url}/rooms/{room}?user=u1", **kwargs)
    hello = await recv_json(ws)
    assert hello["event"] == "connected"
    assert hello["query"] == {"user": "u1"}
    return ws, hello["channel"]


async def received_close(ws: ClientConnection) -> Close:
    """The close frame the server sends next (no other frame may come first)."""
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    return info.value.rcvd


async def sent_and_closed(url: str, room: str, text: str) -> Close:
    """Join ``room``, send ``text`` and return the close frame the server answers with."""
    ws, _ = await join(url, room)
    await ws.send(text)
    return await received_close(ws)


async def assert_still_open(ws: ClientConnection, other: ClientConnection) -> None:
    await other.send(json.dumps({"action": "say", "text": "ping"}))
    assert await recv_json(ws) == {"event": "chat", "text": "ping"}


def test_a_consumer_serving_no_websocket_says_where_it_gets_one() -> None:
    consumer = AsyncWebSocketConsumer(InMemoryChannelLayer())
    with pytest.raises(RuntimeError, match=r"as_endpoint\(\).*from connect\(\) and the handlers"):
        consumer.websocket  # noqa: B018 - the property is what raises


async def test_broadcast_between_connections_on_the_default_layer(app_url: str) -> None:
    a, _ = await join(app_url, "lobby")
    b, _ = await join(app_url, "lobby")
    await a.send(json.dumps({"action": "say", "text": "hello"}))
    assert await recv_json(a) == {"event": "chat", "text": "hello"}
    assert await recv_json(b) == {"event": "chat", "text": "hello"}
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    "event_type",
    [
        "close",
        "accept",
        "send.json",
        "group.add",
        "group_discard",
        "connect",
        "disconnect",
        "receive.json",
        "websocket",
        "channel.layer",
        "_private",
        "__init__",
        "dispatch.channel.message",
        "as.endpoint",
    ],
)
async def test_client_cannot_dispatch_framework_methods(
    app_url: str, event_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await join(app_url, "safe")
    b, _ = await join(app_url, "safe")
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets.consumers"):
        await a.send(json.dumps({"action": "relay", "event": {"type": event_type, "code": 1000}}))
        await assert_still_open(a, b)
        await assert_still_open(b, a)
    assert any("refused" in record.message or "no handler" in record.message for record in caplog.records)
    # Refused, so never "define async def close(self, event)": that would override the framework.
    assert not any("define async def" in record.message for record in caplog.records)
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    ("event_type", "logged"),
    [
        ("chat-message", "with '.' read as '_' it is not a Python name, so no handler can have it"),
        ("no.such.event", "no handler for event type 'no.such.event' (define async def no_such_event"),
    ],
)
async def test_unhandled_event_types_say_why(
    app_url: str, event_type: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    ws, channel = await join(app_url, "why")
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets.consumers"):
        await get_default_layer().send(channel, {"type": event_type})
        await assert_still_open(ws, ws)
    about = [record.message for record in caplog.records if repr(event_type) in record.message]
    assert len(about) == 1  # one warning per event, saying why
    assert logged in about[0]
    await ws.close()


async def test_invalid_json_closes_only_that_socket_with_1007(app_url: str) -> None:
    bad, _ = await join(app_url, "json")
    good, _ = await join(app_url, "json")
    await bad.send("{not json")
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(bad.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1007
    assert "invalid JSON" in info.value.rcvd.reason
    await good.send(json.dumps({"action": "say", "text": "still here"}))
    assert await recv_json(good) == {"event": "chat", "text": "still here"}
    await good.close()


async def test_deeply_nested_json_closes_only_that_socket_with_1007(
    app_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 10 KB of brackets, far under max_frame_bytes, exhaust json's parser stack: a RecursionError
    # that was logged as a handler failure with its traceback and closed the socket with 1011.
    good, _ = await join(app_url, "nested")
    with caplog.at_level(logging.ERROR, logger="fastapi_websockets.consumers"):
        close = await sent_and_closed(app_url, "nested", "[" * 5000 + "]" * 5000)
    assert (close.code, close.reason) == (1007, "invalid JSON: nested too deeply")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    await assert_still_open(good, good)
    await good.close()


@pytest.mark.parametrize("code", [999, 1005, 1006, 2000, 5000, True])
async def test_an_unsendable_close_code_raises_and_closes_with_1011(
    app_url: str, code: object, caplog: pytest.LogCaptureFixture
) -> None:
    # The server used to fail inside the ASGI send ("invalid status code") and drop the
    # connection without a close frame: the client saw 1006 and the log did not say why.
    bystander, _ = await join(app_url, "codes")
    with caplog.at_level(logging.ERROR, logger="fastapi_websockets.consumers"):
        close = await sent_and_closed(app_url, "codes", json.dumps({"action": "close", "code": code}))
    assert close.code == 1011
    assert any(
        record.exc_info and f"close code {code!r} cannot be sent" in str(record.exc_info[1])
        for record in caplog.records
    )
    await assert_still_open(bystander, bystander)
    await bystander.close()


async def test_binary_frame_on_json_consumer_closes_with_1003(app_url: str) -> None:
    ws, _ = await join(app_url, "binary")
    await ws.send(b"\x00\x01")
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1003


@pytest.mark.parametrize("how", ["receive", "event"])
async def test_handler_exception_closes_that_socket_with_1011_and_leaves_groups(
    app_url: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    victim, victim_channel = await join(app_url, f"crash-{how}")
    bystander, _ = await join(app_url, f"crash-{how}")
    layer = get_default_layer()
    with caplog.at_level(logging.ERROR, logger="fastapi_websockets.consumers"):
        if how == "receive":
            await victim.send(json.dumps({"action": "crash"}))
        else:
            await layer.send(victim_channel, {"type": "explode"})
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(victim.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1011
    assert any(record.exc_info and "boom" in str(record.exc_info[1]) for record in caplog.records)
    for _ in range(100):
        if victim_channel not in layer.local_groups.members(f"crash-{how}"):
            break
        await asyncio.sleep(0.02)
    assert victim_channel not in layer.local_groups.members(f"crash-{how}")
    assert (victim_channel, 1011) in DISCONNECTS
    await bystander.send(json.dumps({"action": "say", "text": "ok"}))
    assert await recv_json(bystander) == {"event": "chat", "text": "ok"}
    await bystander.close()


async def test_event_handler_closing_ends_the_connection_with_its_code(app_url: str) -> None:
    kicked, kicked_channel = await join(app_url, "kick")
    stays, _ = await join(app_url, "kick")
    await get_default_layer().send(kicked_channel, {"type": "kick", "code": 4009})
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(kicked.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4009
    for _ in range(100):
        if (kicked_channel, 4009) in DISCONNECTS:
            break
        await asyncio.sleep(0.02)
    assert (kicked_channel, 4009) in DISCONNECTS
    await assert_still_open(stays, stays)
    await stays.close()


async def test_closing_the_layer_closes_its_sockets_with_1012() -> None:
    layer = InMemoryChannelLayer()
    app = FastAPI()
    app.add_api_websocket_route("/rooms/{room}", RoomConsumer.as_endpoint(layer))
    DISCONNECTS.clear()
    async with serve(app) as url:
        sockets = [await join(url, "restart") for _ in range(3)]
        await layer.close()
        for ws, _ in sockets:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1012
        for _ in range(100):
            if len(DISCONNECTS) == 3:
                break
            await asyncio.sleep(0.02)
        assert sorted(DISCONNECTS) == sorted((channel, 1012) for _, channel in sockets)


async def test_websocket_send_envelopes_are_written_without_handlers(app_url: str) -> None:
    ws, channel = await join(app_url, "envelopes")
    layer = get_default_layer()
    await send_json_message(layer, channel, {"text": "hello"}, event="chat")
    assert await recv_json(ws) == {"text": "hello"}
    await send_bytes_message(layer, channel, b"\x00\x01hello", event="upload")
    assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\x01hello"
    await ws.close()


async def test_unknown_event_type_is_ignored(app_url: str, caplog: pytest.LogCaptureFixture) -> None:
    ws, channel = await join(app_url, "unknown")
    layer = get_default_layer()
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets.consumers"):
        await layer.send(channel, {"type": "no.such.handler"})
        await layer.send(channel, {"type": "chat.message", "text": "after"})
        assert await recv_json(ws) == {"event": "chat", "text": "after"}
    assert any("no handler" in record.message for record in caplog.records)
    await ws.close()


async def test_disconnect_gets_the_client_close_code_and_groups_are_left(app_url: str) -> None:
    ws, channel = await join(app_url, "bye")
    layer = get_default_layer()
    assert channel in layer.local_groups.members("bye")
    await ws.close(code=4321)
    for _ in range(200):
        if (channel, 4321) in DISCONNECTS:
            break
        await asyncio.sleep(0.02)
    assert (channel, 4321) in DISCONNECTS
    assert channel not in layer.local_groups.members("bye")


async def test_connect_can_reject(app_url: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        await connect(f"{app_url}/rooms/forbidden")
    assert info.value.response.status_code == 403


async def test_text_consumer_and_class_groups(app_url: str) -> None:
    async with connect(f"{app_url}/text") as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 10) == "HELLO"
        await ws.send(b"abc")
        assert await asyncio.wait_for(ws.recv(), 10) == b"cba"
        layer = get_default_layer()
        assert len(layer.local_groups.members("everyone")) == 1


async def stalled_client(url: str, path: str) -> asyncio.StreamWriter:
    """A WebSocket client that completes the handshake and then never reads again."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so the server's writes block soon
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    status = await asyncio.wait_for(reader.readline(), 10)
    assert b" 101 " in status
    return writer


async def test_slow_client_does_not_hold_back_others() -> None:
    layer = InMemoryChannelLayer(capacity=4)
    app = FastAPI()
    app.add_api_websocket_route("/rooms/{room}", RoomConsumer.as_endpoint(layer))
    body = "x" * 100_000
    count = 150
    async with serve(app) as url:
        slow = await stalled_client(url, "/rooms/race")
        fast, _ = await join(url, "race", max_size=None)
        for i in range(count):
            # group_send never waits for a consumer: a full mailbox drops for that member only.
            await layer.group_send("race", {"type": "chat.message", "text": f"{i}:{body}"})
            await asyncio.sleep(0)
        received = [(await recv_json(fast))["text"].split(":")[0] for _ in range(count)]
        assert received == [str(i) for i in range(count)]
        assert layer.stats.dropped_full > 0
        await fast.close()
        slow.close()
    await layer.close()


async def test_lifespan_creates_and_closes_layers() -> None:
    app = FastAPI(
        lifespan=channel_layers_lifespan({"default": {"BACKEND": "inmemory", "CONFIG": {"capacity": 7}}})
    )
    app.add_api_websocket_route("/rooms/{room}", RoomConsumer.as_endpoint())
    async with serve(app) as url:
        layer = app.state.channel_layers["default"]
        assert layer.capacity == 7
        assert get_default_layer() is layer
        assert layer._started  # at startup, not by the first connection
        a, _ = await join(url, "life")
        b, _ = await join(url, "life")
        await a.send(json.dumps({"action": "say", "text": "x"}))
        assert await recv_json(b) == {"event": "chat", "text": "x"}
        await a.close()
        await b.close()
    assert layer.closed
    assert get_default_layer() is not layer
    await close_default_layers()


async def test_layer_dependency_runs_on_the_event_loop_thread() -> None:
    # FastAPI runs a plain-function dependency in a worker thread: a publishing request would
    # wait for a thread hop before its group_send.
    threads: list[int] = []

    class Layers(dict[str, BaseChannelLayer]):
        def __contains__(self, key: object) -> bool:
            threads.append(threading.get_ident())
            return super().__contains__(key)

    app = FastAPI(lifespan=channel_layers_lifespan({"default": {"BACKEND": "inmemory"}}))

    @app.post("/notify")
    async def notify(layer: Annotated[BaseChannelLayer, Depends(channel_layer_dependency())]) -> bool:
        await layer.group_send("room", {"type": "chat.message", "text": "hi"})
        return layer is app.state.channel_layers["default"]

    async with serve(app) as url:
        app.state.channel_layers = Layers(app.state.channel_layers)
        async with httpx.AsyncClient(base_url=url.replace("ws://", "http://")) as http:
            response = await http.post("/notify")
    assert response.json() is True
    assert threads == [threading.get_ident()]


async def test_lifespan_starts_even_when_a_broker_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {"url": f"redis://127.0.0.1:{port}", "cluster": True}
    settings = {"default": {"BACKEND": "redis", "CONFIG": config}}
    app = FastAPI()
    with caplog.at_level(logging.WARNING, logger="fastapi_websockets"):
        async with channel_layers_lifespan(settings)(app):
            layer = app.state.channel_layers["default"]
            assert not layer._started
    assert layer.closed
    assert any("did not start" in record.getMessage() for record in caplog.records)
    await close_default_layers()


class WrappingConsumer(AsyncJsonWebSocketConsumer):
    groups = ("wrapped",)

    async def send_json(self, data: Any) -> None:
        await super().send_json({"wrapped": data})


async def test_group_envelopes_reach_every_socket_and_custom_send_json() -> None:
    layer = InMemoryChannelLayer()
    app = FastAPI()
    app.add_api_websocket_route("/rooms/{room}", RoomConsumer.as_endpoint(layer))
    app.add_api_websocket_route("/wrapped", WrappingConsumer.as_endpoint(layer))
    async with serve(app) as url:
        sockets = [(await join(url, "env"))[0] for _ in range(3)]
        async with connect(f"{url}/wrapped") as wrapped:
            await asyncio.sleep(0.1)
            await layer.group_send("env", websocket_json_message({"n": 1}))
            for ws in sockets:
                assert await recv_json(ws) == {"n": 1}
            await layer.group_send("wrapped", websocket_json_message({"n": 2}))
            assert await recv_json(wrapped) == {"wrapped": {"n": 2}}
        for ws in sockets:
            await ws.close()
    await layer.close()


class GatedLeaveLayer(InMemoryChannelLayer):
    """The in-memory layer, with presence leaves held at a gate the test opens (a slow broker's leave)."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.leaving = asyncio.Event()
        self.gate = asyncio.Event()

    async def presence_leave(self, group: str, channel: str, *, notify: bool = True) -> None:
        self.leaving.set()
        await self.gate.wait()
        await super().presence_leave(group, channel, notify=notify)


class PresentConsumer(AsyncJsonWebSocketConsumer):
    """Joins the presence of "lobby"; the group's events go to a handler nobody calls after the end."""

    async def connect(self) -> None:
        await self.accept()
        await self.presence_join("lobby", {"name": "u1"})
        await self.send_json({"event": "ready"})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"event": "chat", "text": event["text"]})


async def test_an_ended_connection_queues_nothing_while_it_leaves_its_groups() -> None:
    # The soak's churn: a closed connection's leave waits on the broker (seconds, when presence
    # changes queue) while it is still in its groups. Their messages meanwhile must be dropped
    # as released at once, not fill its mailbox (memory) and count as dropped at a full one.
    layer = GatedLeaveLayer(capacity=3)
    app = FastAPI()
    app.add_api_websocket_route("/lobby", PresentConsumer.as_endpoint(layer))
    async with serve(app) as url:
        ws = await connect(f"{url}/lobby")
        assert await recv_json(ws) == {"event": "ready"}
        await ws.close()
        try:
            await asyncio.wait_for(layer.leaving.wait(), 10)
            assert len(layer.local_groups.members("lobby")) == 1  # still a member while it leaves
            for i in range(10):
                await layer.group_send("lobby", {"type": "chat.message", "text": str(i)})
            assert (layer.stats.dropped_full, layer.stats.dropped_released) == (0, 10)
        finally:
            layer.gate.set()  # a failure must not leave the server's shutdown waiting on it
        for _ in range(200):
            if not layer.local_groups.members("lobby"):
                break
            await asyncio.sleep(0.02)
        assert not layer.local_groups.members("lobby")
        assert await layer.presence("lobby") == {}
    await layer.close()


class CountingLayer(InMemoryChannelLayer):
    """The in-memory layer, counting group_add calls (each is a broker round trip elsewhere)."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.group_adds: list[tuple[str, str]] = []

    async def group_add(
        self, group: str, channel: str, *, since: StreamPosition | None = None
    ) -> History | None:
        self.group_adds.append((group, channel))
        return await super().group_add(group, channel, since=since)


class JoinTwiceConsumer(AsyncJsonWebSocketConsumer):
    """Joins "lobby" as the demo does: the group first, then its presence."""

    async def connect(self) -> None:
        await self.accept()
        await self.group_add("lobby")
        await self.presence_join("lobby", {"name": "u1"})
        await self.presence_join("hall", {"name": "u1"})
        await self.send_json({"event": "ready"})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"event": "chat", "text": event["text"]})


async def test_presence_join_adds_the_group_only_when_the_connection_is_not_in_it() -> None:
    layer = CountingLayer()
    app = FastAPI()
    app.add_api_websocket_route("/lobby", JoinTwiceConsumer.as_endpoint(layer))
    async with serve(app) as url:
        ws = await connect(f"{url}/lobby")
        assert await recv_json(ws) == {"event": "ready"}
        assert [group for group, _ in layer.group_adds] == ["lobby", "hall"]
        for group in ("lobby", "hall"):
            await layer.group_send(group, {"type": "chat.message", "text": group})
            assert await recv_json(ws) == {"event": "chat", "text": group}
        assert set(await layer.presence("lobby")) == set(await layer.presence("hall"))
        await ws.close()
    await layer.close()
