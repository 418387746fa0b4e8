"""Placeholder: the nats backend is being written (see its issue)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.types import Message

__all__ = ["NATSChannelLayer"]


class NATSChannelLayer(BaseChannelLayer):
    """Not implemented yet."""

    backend_name = "nats"

    def __init__(
        self,
        *,
        servers: Sequence[str] = ("nats://localhost:4222",),
        prefix: str = "fastapi-websockets",
        group_bucket: str = "fastapi_websockets_groups",
        stream_name: str = "FASTAPI_WEBSOCKETS",
        message_timeout: float = 60.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)

    async def _start(self) -> None:
        raise NotImplementedError("the nats backend is not implemented yet")

    async def _send_remote(self, channel: str, data: bytes) -> None:
        raise NotImplementedError

    async def _receive_remote(self, channel: str) -> Message:
        raise NotImplementedError

    async def _group_add(self, group: str, channel: str) -> None:
        raise NotImplementedError

    async def _group_discard(self, group: str, channel: str) -> None:
        raise NotImplementedError

    async def _group_send(self, group: str, data: bytes) -> None:
        raise NotImplementedError

    async def _flush(self) -> None:
        raise NotImplementedError
