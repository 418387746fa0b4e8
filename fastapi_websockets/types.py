"""Shared type aliases and protocols."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Message", "Serializer"]

#: A channel-layer message: a dict of msgpack-safe values, usually with a ``"type"`` key.
Message = dict[str, Any]


@runtime_checkable
class Serializer(Protocol):
    """Turns messages into bytes and back; every backend uses one of these."""

    def dumps(self, message: Message) -> bytes:
        """Encode ``message``; raise ``SerializationError`` for values it cannot carry."""
        ...

    def loads(self, data: bytes) -> Message:
        """Decode bytes produced by :meth:`dumps`; raise ``SerializationError`` on bad input."""
        ...
