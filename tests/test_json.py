"""The consumers' JSON encoder: json's C encoder called directly, writing what json.dumps writes."""

from __future__ import annotations

import enum
import json
import math
from typing import Any

import pytest

from fastapi_websockets import AsyncJsonWebSocketConsumer, InvalidMessage


class Level(enum.IntEnum):
    HIGH = 3


VALUES: list[Any] = [
    {"type": "chat.message", "text": 'héllo \u2028 "quoted" \\ \x00 😀', "n": [1, -2.5, 1e308, 10**40]},
    [None, True, False, 0.1, -0.0, (1, 2), {"nested": {"deep": []}}],
    {7: "int key", 2.5: "float key", True: "bool key", None: "none key", "": {}},
    "a lone string, ünïcode",
    12345,
    Level.HIGH,
    {"level": Level.HIGH, "levels": [Level.HIGH]},
]


@pytest.mark.parametrize("value", VALUES)
def test_encode_json_writes_the_bytes_json_dumps_writes(value: Any) -> None:
    # A guard for calling json's C encoder without JSONEncoder.encode() around it.
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert AsyncJsonWebSocketConsumer.encode_json(value) == expected


def test_a_failed_encoding_leaves_nothing_behind_for_the_next_one() -> None:
    # json's C encoder marks each container it is inside and does not unmark it when it fails:
    # a marks dict kept across calls would then take these containers for loops.
    scores = [1.0, math.nan]
    tags: list[Any] = [{1, 2}]
    message = {"scores": scores, "tags": tags}
    with pytest.raises(InvalidMessage, match=r"cannot send nan as JSON \(at \['scores'\]\[1\]\)"):
        AsyncJsonWebSocketConsumer.encode_json(message)
    scores[1] = 2.0
    with pytest.raises(TypeError, match="not JSON serializable"):
        AsyncJsonWebSocketConsumer.encode_json(message)
    tags[0] = "set"
    assert AsyncJsonWebSocketConsumer.encode_json(message) == '{"scores":[1.0,2.0],"tags":["set"]}'
    looped: list[Any] = [scores]
    looped.append(looped)
    with pytest.raises(ValueError, match="Circular reference detected"):
        AsyncJsonWebSocketConsumer.encode_json({"looped": looped})
    looped.pop()
    assert AsyncJsonWebSocketConsumer.encode_json({"looped": looped}) == '{"looped":[[1.0,2.0]]}'
