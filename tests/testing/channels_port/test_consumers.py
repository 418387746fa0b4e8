"""Tests as a Django Channels project writes them: only the import block below differs.

In the Channels project these lines read::

    from channels.layers import get_channel_layer
    from channels.testing import WebsocketCommunicator

    from chat.asgi import application

Everything after the imports is the Channels test unchanged: the same
communicator calls, the same assertions. ``channel_layer_settings`` stands for
the project's ``settings.CHANNEL_LAYERS = {"default": {"BACKEND":
"channels.layers.InMemoryChannelLayer"}}`` override.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fastapi_websockets import InMemoryChannelLayer
from fastapi_websockets import get_default_layer as get_channel_layer
from fastapi_websockets.layers import override_default_layer
from fastapi_websockets.testing import WebsocketCommunicator
from tests.testing.channels_port.consumers import application


@pytest.fixture
async def channel_layer_settings() -> AsyncIterator[None]:
    layer = InMemoryChannelLayer()
    with override_default_layer(layer):
        yield
    await layer.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("channel_layer_settings")
async def test_room_consumer_echoes_to_the_group() -> None:
    communicator = WebsocketCommunicator(application, "/ws/room/lobby/")
    connected, subprotocol = await communicator.connect()
    assert connected
    assert subprotocol is None
    await communicator.send_to(text_data='{"message": "hello"}')
    response = await communicator.receive_json_from()
    assert response == {"message": "hello"}
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.usefixtures("channel_layer_settings")
async def test_two_clients_share_a_room() -> None:
    first = WebsocketCommunicator(application, "/ws/room/lobby/")
    second = WebsocketCommunicator(application, "/ws/room/lobby/")
    connected, _ = await first.connect()
    assert connected
    connected, _ = await second.connect()
    assert connected
    await first.send_json_to({"message": "hi all"})
    assert await first.receive_json_from(timeout=1) == {"message": "hi all"}
    assert await second.receive_json_from(timeout=1) == {"message": "hi all"}
    assert await first.receive_nothing()
    await first.disconnect()
    await second.disconnect()


@pytest.mark.asyncio
@pytest.mark.usefixtures("channel_layer_settings")
async def test_group_send_from_outside_reaches_the_client() -> None:
    communicator = WebsocketCommunicator(application, "/ws/room/news/")
    connected, _ = await communicator.connect()
    assert connected
    channel_layer = get_channel_layer()
    await channel_layer.group_send("room_news", {"type": "room.message", "message": "breaking"})
    response = await communicator.receive_from()
    assert response == '{"message": "breaking"}'
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.usefixtures("channel_layer_settings")
async def test_binary_frames() -> None:
    communicator = WebsocketCommunicator(application, "/ws/room/lobby/")
    connected, _ = await communicator.connect()
    assert connected
    await communicator.send_to(bytes_data=b"abc")
    assert await communicator.receive_from() == b"cba"
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.usefixtures("channel_layer_settings")
async def test_private_room_rejects_anonymous_and_admits_admin() -> None:
    communicator = WebsocketCommunicator(application, "/ws/room/private/")
    connected, code = await communicator.connect()
    assert not connected
    assert code == 4003

    communicator = WebsocketCommunicator(application, "/ws/room/private/")
    communicator.scope["user"] = "admin"
    connected, _ = await communicator.connect()
    assert connected
    await communicator.disconnect()


@pytest.mark.asyncio
@pytest.mark.usefixtures("channel_layer_settings")
async def test_nothing_arrives_for_other_rooms() -> None:
    communicator = WebsocketCommunicator(application, "/ws/room/quiet/")
    connected, _ = await communicator.connect()
    assert connected
    await get_channel_layer().group_send("room_lobby", {"type": "room.message", "message": "not for you"})
    assert await communicator.receive_nothing(timeout=0.1, interval=0.01) is True
    with pytest.raises(TimeoutError):
        await communicator.receive_from(timeout=0.1)
    await communicator.disconnect()
