"""The demo chat app (examples/chat/app.py), tested the way users test theirs: WebsocketCommunicator."""

from __future__ import annotations

from typing import Any

import pytest

from examples.chat.app import ROOM_HISTORY, app, demo_channel_layers
from fastapi_websockets import InMemoryChannelLayer
from fastapi_websockets.testing import WebsocketClosed, WebsocketCommunicator, lifespan

ORIGIN = [(b"origin", b"http://testserver")]


async def joined(path: str) -> tuple[WebsocketCommunicator, list[dict[str, Any]]]:
    """Connect to ``path``; return the communicator and the frames up to the online list."""
    communicator = WebsocketCommunicator(app, path, headers=ORIGIN)
    connected, _ = await communicator.connect()
    assert connected
    frames = [await communicator.receive_json_from()]
    while frames[-1]["kind"] != "online":
        frames.append(await communicator.receive_json_from())
    return communicator, frames


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["kind"] for frame in frames]


async def test_rooms_keep_history_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert demo_channel_layers() == {
        "default": {
            "BACKEND": "fastapi_websockets.backends.inmemory.InMemoryChannelLayer",
            "CONFIG": {"history": ROOM_HISTORY},
        }
    }
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_BACKEND", "redis")
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_REDIS_HISTORY", '{"room:*": 5}')
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_REDIS_PREFIX", "demo")
    assert demo_channel_layers() == {
        "default": {
            "BACKEND": "fastapi_websockets.backends.redis.RedisChannelLayer",
            "CONFIG": {"history": {"room:*": 5}, "prefix": "demo"},
        }
    }


async def test_two_pages_chat_and_see_each_other_online() -> None:
    async with lifespan(app):
        ann, frames = await joined("/ws/lobby?name=ann")
        assert kinds(frames) == ["hello", "synced", "online"]
        me = frames[0]["channel"]
        assert frames[-1]["members"] == [{"channel": me, "name": "ann", "worker": frames[0]["worker"]}]
        assert (await ann.receive_json_from())["channel"] == me  # its own presence.joined

        bob, frames = await joined("/ws/lobby?name=bob")
        assert sorted(member["name"] for member in frames[-1]["members"]) == ["ann", "bob"]
        own = await bob.receive_json_from()
        assert (own["kind"], own["channel"]) == ("joined", frames[0]["channel"])
        bob_joined = await ann.receive_json_from()
        assert (bob_joined["kind"], bob_joined["name"]) == ("joined", "bob")

        await ann.send_json_to({"text": "hi bob"})
        message = await bob.receive_json_from()
        assert message == {**message, "kind": "message", "user": "ann", "text": "hi bob", "replay": None}
        assert message["position"]["offset"] == 1
        assert await ann.receive_json_from() == message
        assert await bob.receive_nothing()

        await bob.disconnect()  # leaves the room's presence: the others are told
        bob_left = await ann.receive_json_from()
        assert (bob_left["kind"], bob_left["name"], bob_left["channel"]) == (
            "left",
            "bob",
            bob_joined["channel"],
        )
        await ann.disconnect()


async def test_a_new_page_gets_the_history_and_a_returning_one_exactly_what_it_missed() -> None:
    async with lifespan(app):
        ann, _ = await joined("/ws/history?name=ann")
        for text in ("one", "two"):
            await ann.send_json_to({"text": text})
        bob, frames = await joined("/ws/history?name=bob")
        assert kinds(frames) == ["hello", "message", "message", "synced", "online"]
        assert [(f["text"], f["replay"]) for f in frames[1:3]] == [("one", "history"), ("two", "history")]
        last = frames[2]["position"]
        assert frames[3] == {"kind": "synced", "position": last, "recovered": True}
        await bob.disconnect()

        await ann.send_json_to({"text": "missed"})
        query = f"offset={last['offset']}&epoch={last['epoch']}"
        bob, frames = await joined(f"/ws/history?name=bob&{query}")
        assert kinds(frames) == ["hello", "message", "synced", "online"]
        assert (frames[1]["text"], frames[1]["replay"], frames[1]["position"]["offset"]) == (
            "missed",
            "recovered",
            3,
        )
        assert frames[2]["recovered"] is True

        await ann.send_json_to({"text": "live"})
        while (live := await bob.receive_json_from())["kind"] != "message":
            pass
        assert (live["text"], live["replay"]) == ("live", None)
        await bob.disconnect()
        await ann.disconnect()


async def test_the_test_layer_is_the_apps_layer(channel_layer: InMemoryChannelLayer) -> None:
    async with lifespan(app):
        assert app.state.channel_layers["default"] is channel_layer
        # The plugin's layer keeps no history: the demo joins without it.
        alice, frames = await joined("/ws/lobby?name=alice")
        assert kinds(frames) == ["hello", "online"]
        await alice.receive_json_from()  # its own presence.joined
        await channel_layer.group_send("room:lobby", {"type": "chat.notice", "text": "from the test"})
        assert await alice.receive_json_from() == {
            "kind": "notice",
            "text": "from the test",
            "position": None,
            "replay": None,
        }
        await alice.disconnect()
    assert not channel_layer.closed  # the fixture owns it, not the app's lifespan


async def test_unknown_path_is_rejected_with_a_close_code() -> None:
    async with lifespan(app):
        communicator = WebsocketCommunicator(app, "/nowhere")
        assert await communicator.connect() == (False, 1000)
        with pytest.raises(WebsocketClosed, match="closed the WebSocket with code 1000"):
            await communicator.receive_from()
        await communicator.disconnect()


async def test_handler_error_surfaces_as_the_apps_exception_and_closes_1011() -> None:
    async with lifespan(app):
        alice, _ = await joined("/ws/errors?name=alice")
        await alice.receive_json_from()  # its own presence.joined
        # chat_message() reads event["user"]: an event without it makes the handler raise.
        await app.state.channel_layers["default"].group_send(
            "room:errors", {"type": "chat.message", "text": "who?"}
        )
        with pytest.raises(KeyError, match="user") as raised:
            await alice.receive_json_from()
        assert raised.traceback[-1].name == "chat_message"  # the app's own traceback
        assert await alice.wait_closed() == 1011
        await alice.disconnect()


async def test_invalid_json_closes_1007() -> None:
    async with lifespan(app):
        alice, _ = await joined("/ws/lobby?name=alice")
        await alice.receive_json_from()  # its own presence.joined
        await alice.send_to(text_data="{not json")
        with pytest.raises(WebsocketClosed, match=r"code 1007: 'invalid JSON: Expecting property name"):
            await alice.receive_json_from()
        assert await alice.wait_closed() == 1007
        await alice.disconnect()
