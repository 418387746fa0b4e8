"""The exception hierarchy: every error the library raises is a ``ChannelLayerError``.

Several errors also inherit from the matching built-in (``TimeoutError``,
``ValueError``, ``TypeError``) so that callers who already catch those keep
working.
"""

from __future__ import annotations

import asyncio
import sys

__all__ = [
    "BackendUnavailable",
    "ChannelFull",
    "ChannelLayerClosed",
    "ChannelLayerError",
    "InvalidChannelLayerConfig",
    "InvalidChannelName",
    "InvalidMessage",
    "MessageTooLarge",
    "ReceiveTimeout",
    "SerializationError",
]


class ChannelLayerError(Exception):
    """Base class of every error raised by a channel layer."""


class InvalidChannelLayerConfig(ChannelLayerError, ValueError):
    """A configuration value (dict key, environment variable, option) is wrong."""


class InvalidChannelName(ChannelLayerError, ValueError):
    """A channel or group name breaks the naming rules."""


class ChannelFull(ChannelLayerError):
    """A channel already holds ``capacity`` undelivered messages."""

    def __init__(self, channel: str, capacity: int) -> None:
        self.channel = channel
        self.capacity = capacity
        super().__init__(
            f"channel {channel!r} is full ({capacity} undelivered messages); "
            "receive from it faster or raise its capacity (capacity/channel_capacity)"
        )


class ChannelLayerClosed(ChannelLayerError):
    """The layer was closed, before or while the operation ran."""


if sys.version_info >= (3, 11):
    _TimeoutBases: tuple[type[Exception], ...] = (TimeoutError,)
else:  # asyncio.TimeoutError is not the built-in TimeoutError before 3.11
    _TimeoutBases = (asyncio.TimeoutError, TimeoutError)


class ReceiveTimeout(ChannelLayerError, *_TimeoutBases):  # type: ignore[misc]
    """``receive(channel, timeout=...)`` saw no message in time (also a ``TimeoutError``)."""

    def __init__(self, channel: str, timeout: float) -> None:
        self.channel = channel
        self.timeout = timeout
        super().__init__(f"no message arrived on channel {channel!r} within {timeout} s")


class SerializationError(ChannelLayerError, TypeError):
    """A message holds a value the serializer cannot carry, or a frame cannot be decoded."""


class InvalidMessage(ChannelLayerError, ValueError):
    """A message the layer refuses as it is (a reserved key, say); the text says what to change."""


class MessageTooLarge(ChannelLayerError, ValueError):
    """An encoded message is larger than the layer's ``max_message_size``, or than the broker takes.

    ``server``, when given, says that the broker refused it: its ``max_payload``
    (NATS), ``limit`` bytes, is what the message is over, and the message says
    where that limit is set.
    """

    def __init__(self, size: int, limit: int, *, server: str | None = None) -> None:
        self.size = size
        self.limit = limit
        if server is None:
            over, fix = "the layer's max_message_size", "raise max_message_size"
        else:
            over, fix = f"the max_payload of the server at {server}", "raise max_payload in its configuration"
        super().__init__(
            f"encoded message is {size} bytes, over {over} of {limit} bytes; "
            f"send a reference (a key or URL) instead of the payload, or {fix}"
        )


class BackendUnavailable(ChannelLayerError, ConnectionError):
    """The broker could not be reached within the layer's time limit."""
