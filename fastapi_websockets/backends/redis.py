"""Placeholder: the redis backend is being written (see its issue)."""

from __future__ import annotations

from typing import Any

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.types import Message

__all__ = ["RedisChannelLayer"]


class RedisChannelLayer(BaseChannelLayer):
    """Not implemented yet."""

    backend_name = "redis"

    def __init__(
        self,
        *,
        url: str = "redis://localhost:6379/0",
        prefix: str = "fastapi-websockets",
        cluster: bool = False,
        channel_expiry: float = 60,
        group_expiry: float = 86400,
        use_pubsub: bool = True,
        sharded_pubsub: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(channel_expiry=channel_expiry, group_expiry=group_expiry, **options)

    async def _start(self) -> None:
        raise NotImplementedError("the redis backend is not implemented yet")

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
