"""The demo chat app (examples/chat/app.py), tested the way users test theirs: WebsocketCommunicator."""

from __future__ import annotations

import pytest

from examples.chat.app import app
from fastapi_websockets import InMemoryChannelLayer
from fastapi_websockets.testing import WebsocketClosed, WebsocketCommunicator, lifespan


async def joined(name: str, room: str = "lobby") -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(app, f"/ws/{room}?name={name}")
    connected, _ = await communicator.connect()
    assert connected
    assert await communicator.receive_json_from() == {"kind": "notice", "text": f"{name} joined"}
    return communicator


async def test_two_communicators_chat(channel_layer: InMemoryChannelLayer) -> None:
    async with lifespan(app):
        alice = await joined("alice")
        bob = await joined("bob")
        assert await alice.receive_json_from() == {"kind": "notice", "text": "bob joined"}

        await alice.send_json_to({"text": "hi bob"})
        expected = {"kind": "message", "user": "alice", "text": "hi bob"}
        assert await bob.receive_json_from() == expected
        assert await alice.receive_json_from() == expected
        assert await bob.receive_nothing()

        await bob.disconnect()  # runs the consumer's disconnect(), which tells the room
        assert await alice.receive_json_from() == {"kind": "notice", "text": "bob left"}
        await alice.disconnect()


async def test_the_test_layer_is_the_apps_layer(channel_layer: InMemoryChannelLayer) -> None:
    async with lifespan(app):
        assert app.state.channel_layers["default"] is channel_layer
        alice = await joined("alice")
        await channel_layer.group_send("room:lobby", {"type": "chat.notice", "text": "from the test"})
        assert await alice.receive_json_from() == {"kind": "notice", "text": "from the test"}
        await alice.disconnect()
    assert not channel_layer.closed  # the fixture owns it, not the app's lifespan


async def test_unknown_path_is_rejected_with_a_close_code(channel_layer: InMemoryChannelLayer) -> None:
    async with lifespan(app):
        communicator = WebsocketCommunicator(app, "/nowhere")
        assert await communicator.connect() == (False, 1000)
        with pytest.raises(WebsocketClosed, match="closed the WebSocket with code 1000"):
            await communicator.receive_from()
        await communicator.disconnect()


async def test_handler_error_surfaces_as_the_apps_exception_and_closes_1011(
    channel_layer: InMemoryChannelLayer,
) -> None:
    async with lifespan(app):
        alice = await joined("alice")
        bob = await joined("bob")
        assert await alice.receive_json_from() == {"kind": "notice", "text": "bob joined"}
        # chat_message() reads event["user"]: an event without it makes the handler raise.
        await channel_layer.group_send("room:lobby", {"type": "chat.message", "text": "who?"})
        with pytest.raises(KeyError, match="user") as raised:
            await alice.receive_json_from()
        assert raised.traceback[-1].name == "chat_message"  # the app's own traceback
        assert await alice.wait_closed() == 1011
        with pytest.raises(WebsocketClosed, match="code 1011"):
            await alice.receive_from()
        with pytest.raises(KeyError, match="user"):  # bob's connection failed the same way, on its own
            await bob.wait_closed()
        await alice.disconnect()
        await bob.disconnect()


async def test_invalid_json_closes_1007(channel_layer: InMemoryChannelLayer) -> None:
    async with lifespan(app):
        alice = await joined("alice")
        await alice.send_to(text_data="{not json")
        with pytest.raises(
            WebsocketClosed, match=r"code 1007: 'invalid JSON: Expecting property name"
        ) as closed:
            await alice.receive_json_from()
        assert (closed.value.code, await alice.wait_closed()) == (1007, 1007)
        await alice.disconnect()
