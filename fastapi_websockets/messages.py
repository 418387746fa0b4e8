"""Builders and senders for ``websocket.send`` envelopes.

An envelope ``{"type": "websocket.send", "mode": "json"|"bytes", "body": ...}``
sent to a consumer's channel is written to its socket as a JSON text frame or
a binary frame, with no handler to write. Extra keyword arguments become extra
keys of the envelope (``event="upload"`` adds ``"event": "upload"``). A JSON
body holding NaN or an infinity is refused here, in the sender's traceback,
rather than by every consumer it reaches (JSON has neither).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi_websockets._json import check_json_numbers
from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.types import Message

__all__ = [
    "WEBSOCKET_SEND",
    "send_bytes_message",
    "send_json_message",
    "websocket_bytes_message",
    "websocket_json_message",
]

WEBSOCKET_SEND = "websocket.send"
_RESERVED = ("type", "mode", "body")


def _envelope(mode: Literal["json", "bytes"], body: Any, message_type: str, extra: dict[str, Any]) -> Message:
    clash = [key for key in _RESERVED if key in extra]
    if clash:
        raise TypeError(f"extra keys {clash} would overwrite envelope fields; pass them as arguments instead")
    return {**extra, "type": message_type, "mode": mode, "body": body}


def _as_bytes(body: bytes | bytearray | memoryview) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"a binary body must be bytes, bytearray or memoryview, got {type(body).__name__}")


def websocket_bytes_message(
    body: bytes | bytearray | memoryview, *, message_type: str = WEBSOCKET_SEND, **extra: Any
) -> Message:
    """Build an envelope that a consumer writes as a binary frame."""
    return _envelope("bytes", _as_bytes(body), message_type, extra)


def websocket_json_message(body: Any, *, message_type: str = WEBSOCKET_SEND, **extra: Any) -> Message:
    """Build an envelope that a consumer writes as a JSON text frame.

    Raises :class:`~fastapi_websockets.InvalidMessage` if ``body`` holds NaN
    or an infinity (send null or a string instead).
    """
    check_json_numbers(body)
    return _envelope("json", body, message_type, extra)


async def send_bytes_message(
    layer: BaseChannelLayer,
    channel: str,
    body: bytes | bytearray | memoryview,
    *,
    message_type: str = WEBSOCKET_SEND,
    **extra: Any,
) -> None:
    """Send a binary-frame envelope to ``channel``."""
    await layer.send(channel, websocket_bytes_message(body, message_type=message_type, **extra))


async def send_json_message(
    layer: BaseChannelLayer, channel: str, body: Any, *, message_type: str = WEBSOCKET_SEND, **extra: Any
) -> None:
    """Send a JSON-frame envelope to ``channel``; NaN and infinities raise ``InvalidMessage``."""
    await layer.send(channel, websocket_json_message(body, message_type=message_type, **extra))
