"""Only JSON goes out as JSON and comes in as JSON: NaN and Infinity, and envelope modes, through uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect

from fastapi_websockets import AsyncJsonWebSocketConsumer, InMemoryChannelLayer, InvalidMessage
from tests.e2e.server import serve
from tests.e2e.test_consumers import received_close

NOT_JSON = "as JSON (at ['score']): JSON has no NaN or Infinity"


class ScoreConsumer(AsyncJsonWebSocketConsumer):
    """Joins room {room}; sends scores, some of them not finite, as a careless app would."""

    async def connect(self) -> None:
        await self.group_add(self.path_params["room"])
        await self.accept()
        await self.send_json({"event": "connected", "channel": self.channel_name})

    async def receive_json(self, content: Any) -> None:
        if content.get("action") == "score":
            try:
                await self.send_json({"score": float(content["value"])})  # "nan", "inf": Python floats
            except InvalidMessage as exc:
                await self.send_json({"error": str(exc)})
        else:
            await self.send_json({"echo": content})

    async def score_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"score": event["score"]})  # the error, if any, is the framework's to handle

    async def careful_message(self, event: dict[str, Any]) -> None:
        try:
            await self.send_json({"score": event["score"]})
        except InvalidMessage as exc:
            await self.send_json({"error": str(exc)})

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"]})


class CarefulConsumer(ScoreConsumer):
    """Another class in the same room whose score handler catches what it cannot send."""

    async def score_message(self, event: dict[str, Any]) -> None:
        await self.careful_message(event)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, InMemoryChannelLayer]]:
    layer = InMemoryChannelLayer()
    app = FastAPI()
    app.add_api_websocket_route("/scores/{room}", ScoreConsumer.as_endpoint(layer))
    app.add_api_websocket_route("/careful/{room}", CarefulConsumer.as_endpoint(layer))
    async with serve(app) as url:
        yield url, layer
    await layer.close()


def _refuse(name: str) -> NoReturn:
    raise AssertionError(f"the server sent {name}, which a browser's JSON.parse rejects")


async def recv_json(ws: ClientConnection) -> Any:
    """The next frame, parsed as a browser would: NaN and Infinity fail the test."""
    return json.loads(await asyncio.wait_for(ws.recv(), 10), parse_constant=_refuse)


async def join(url: str, room: str, path: str = "scores") -> tuple[ClientConnection, str]:
    ws = await connect(f"{url}/{path}/{room}")
    hello = await recv_json(ws)
    assert hello["event"] == "connected"
    return ws, hello["channel"]


async def still_served(layer: InMemoryChannelLayer, room: str, *clients: ClientConnection) -> None:
    await layer.group_send(room, {"type": "chat.message", "text": "still here"})
    for ws in clients:
        assert await recv_json(ws) == {"text": "still here"}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
async def test_send_json_refuses_a_non_finite_float_before_writing_and_keeps_the_socket(
    served: tuple[str, InMemoryChannelLayer], value: str
) -> None:
    # json.dumps wrote NaN / Infinity, which a browser's JSON.parse rejects with the whole frame.
    url, layer = served
    ws, _ = await join(url, "lone")
    bystander, _ = await join(url, "lone")
    await ws.send(json.dumps({"action": "score", "value": value}))
    reply = await recv_json(ws)
    assert reply["error"].startswith(f"cannot send {float(value)!r} {NOT_JSON}")
    assert reply["error"].endswith("send null or a string instead")
    await still_served(layer, "lone", ws, bystander)
    for client in (ws, bystander):
        await client.close()


async def test_a_group_message_that_is_not_json_fails_on_each_socket_as_a_lone_send_would(
    served: tuple[str, InMemoryChannelLayer], caplog: pytest.LogCaptureFixture
) -> None:
    # The text of a group message is encoded once per process and class and shared; content
    # that cannot be encoded must fail every handler that sends it, and each once.
    url, layer = served
    members = [(await join(url, "room"))[0] for _ in range(3)]
    bystander, _ = await join(url, "room", path="careful")

    await layer.group_send("room", {"type": "careful.message", "score": math.nan})
    for ws in [*members, bystander]:
        assert (await recv_json(ws))["error"].startswith(f"cannot send nan {NOT_JSON}")

    with caplog.at_level(logging.ERROR, logger="fastapi_websockets.consumers"):
        await layer.group_send("room", {"type": "score.message", "score": math.inf})
        assert (await recv_json(bystander))["error"].startswith(f"cannot send inf {NOT_JSON}")
        for ws in members:
            assert (await received_close(ws)).code == 1011
    failures = [
        record
        for record in caplog.records
        if "cannot send inf" in (str(record.exc_info[1]) if record.exc_info else record.getMessage())
    ]
    # One traceback for the group message, then a line per further socket with the count.
    assert len([record for record in failures if record.exc_info]) == 1
    assert sorted(record.getMessage().count("so did 1 other") for record in failures) == [0, 0, 1]
    assert sorted(record.getMessage().count("so did 2 other") for record in failures) == [0, 0, 1]
    await still_served(layer, "room", bystander)
    await bystander.close()


async def test_a_hand_built_envelope_that_is_not_json_closes_only_its_socket(
    served: tuple[str, InMemoryChannelLayer], caplog: pytest.LogCaptureFixture
) -> None:
    # websocket_json_message() refuses such a body; a dict built by hand reaches the consumer.
    url, layer = served
    ws, channel = await join(url, "envelope")
    bystander, _ = await join(url, "envelope")
    with caplog.at_level(logging.ERROR, logger="fastapi_websockets.consumers"):
        await layer.send(channel, {"type": "websocket.send", "mode": "json", "body": {"score": -math.inf}})
        assert (await received_close(ws)).code == 1011
    assert any(record.exc_info and "cannot send -inf" in str(record.exc_info[1]) for record in caplog.records)
    await still_served(layer, "envelope", bystander)
    await bystander.close()


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("NaN", "NaN is not JSON"),
        ('{"score": Infinity}', "Infinity is not JSON"),
        ("[1, -Infinity]", "-Infinity is not JSON"),
        ('{"n": 1e999}', "the number 1e999 is out of range"),
        ("[1, -1E400]", "the number -1E400 is out of range"),
        ("1" * 400 + ".5", "the number 111111111111... is out of range"),
        # Python's limit on an int's digits: the reason said "use sys.set_int_max_str_digits()".
        (
            '{"n": ' + "9" * 5000 + "}",
            "an integer of 5000 digits is too long (at most 4300); send it as a string",
        ),
    ],
)
async def test_nan_infinity_and_numbers_too_large_from_a_client_are_invalid_json_1007(
    served: tuple[str, InMemoryChannelLayer], text: str, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Python's json.loads takes them (1e999 as an infinity), so receive_json() got a float no
    # reply could carry: the echo failed and closed the socket with 1011.
    url, layer = served
    ws, _ = await join(url, "incoming")
    bystander, _ = await join(url, "incoming")
    with caplog.at_level(logging.ERROR, logger="fastapi_websockets.consumers"):
        await ws.send(text)
        close = await received_close(ws)
    assert close.code == 1007
    assert close.reason.startswith(f"invalid JSON: {said}")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    await still_served(layer, "incoming", bystander)
    await bystander.close()


@pytest.mark.parametrize(
    ("envelope", "logged"),
    [
        ({"mode": "xml", "body": {"a": 1}}, "has the mode 'xml'; the modes are 'json', 'bytes' and 'text'"),
        ({"mode": "byte", "body": b"\x00"}, "has the mode 'byte'; the modes are 'json', 'bytes' and 'text'"),
        ({"mode": "JSON", "body": {"a": 1}}, "has the mode 'JSON'; the modes are 'json', 'bytes' and 'text'"),
        ({"mode": "text", "body": {"a": 1}}, "in text mode needs a str body, got {'a': 1}"),
    ],
)
async def test_an_envelope_mode_that_is_not_known_is_an_error_not_json(
    served: tuple[str, InMemoryChannelLayer],
    envelope: dict[str, Any],
    logged: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every mode but "bytes" and "text" was sent as JSON; a str() of a text mode's dict body.
    url, layer = served
    ws, channel = await join(url, "modes")
    bystander, _ = await join(url, "modes")
    with caplog.at_level(logging.ERROR, logger="fastapi_websockets.consumers"):
        await layer.send(channel, {"type": "websocket.send", **envelope})
        assert (await received_close(ws)).code == 1011
    assert any(record.exc_info and logged in str(record.exc_info[1]) for record in caplog.records)
    await still_served(layer, "modes", bystander)
    await bystander.close()
