"""Envelope builders and senders."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from fastapi_websockets import (
    InMemoryChannelLayer,
    InvalidMessage,
    send_bytes_message,
    send_json_message,
    websocket_bytes_message,
    websocket_json_message,
)


def test_builders() -> None:
    assert websocket_bytes_message(b"\x00\x01hello", event="upload") == {
        "type": "websocket.send",
        "mode": "bytes",
        "body": b"\x00\x01hello",
        "event": "upload",
    }
    assert websocket_json_message({"text": "hello"}, event="chat") == {
        "type": "websocket.send",
        "mode": "json",
        "body": {"text": "hello"},
        "event": "chat",
    }
    assert websocket_bytes_message(bytearray(b"ab"))["body"] == b"ab"
    assert websocket_bytes_message(memoryview(b"ab"))["body"] == b"ab"
    assert websocket_json_message([1], message_type="custom.send")["type"] == "custom.send"


def test_builders_refuse_bad_input() -> None:
    with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
        websocket_bytes_message("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"\['mode'\] would overwrite"):
        websocket_json_message({}, mode="bytes")


async def test_senders_round_trip() -> None:
    async with InMemoryChannelLayer() as layer:
        await send_bytes_message(layer, "chat.room", b"\x00\x01hello")
        message = await layer.receive("chat.room")
        assert message["body"] == b"\x00\x01hello"
        assert message["mode"] == "bytes"
        await send_json_message(layer, "chat.room", {"text": "hi"}, event="client.text")
        assert await layer.receive("chat.room") == {
            "type": "websocket.send",
            "mode": "json",
            "body": {"text": "hi"},
            "event": "client.text",
        }


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_json_envelopes_refuse_nan_and_infinity_in_the_senders_traceback(value: float) -> None:
    # JSON has neither: every consumer the envelope reached failed to send it instead.
    refused = rf"cannot send {value!r} as JSON \(at \['scores'\]\[1\]\).*send null or a string instead"
    with pytest.raises(InvalidMessage, match=refused):
        websocket_json_message({"scores": [1.0, value]})
    async with InMemoryChannelLayer() as layer:
        with pytest.raises(InvalidMessage, match=refused):
            await send_json_message(layer, "chat.room", {"scores": [1.0, value]})
        await send_json_message(layer, "chat.room", {"scores": [1.0]})
        assert (await layer.receive("chat.room"))["body"] == {"scores": [1.0]}  # nothing before it


def test_json_envelopes_leave_other_types_to_the_consumers_encoder() -> None:
    # An encode_json override may write types json cannot, and keys it would refuse.
    body = {"at": Decimal("1.5"), b"raw": b"\x00", "nested": {(1, 2): [1e308]}}
    assert websocket_json_message(body)["body"] is body
