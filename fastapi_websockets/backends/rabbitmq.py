"""Placeholder: the rabbitmq backend is being written (see its issue)."""

from __future__ import annotations

from typing import Any

from fastapi_websockets.backends.base import BaseChannelLayer
from fastapi_websockets.types import Message

__all__ = ["RabbitMQChannelLayer"]


class RabbitMQChannelLayer(BaseChannelLayer):
    """Not implemented yet."""

    backend_name = "rabbitmq"

    def __init__(
        self,
        *,
        url: str = "amqp://guest:guest@localhost:5672//",
        exchange_name: str = "fastapi_websockets",
        queue_prefix: str = "fastapi-websockets",
        durable: bool = True,
        message_ttl: int | None = 60000,
        queue_expiry: int | None = 300000,
        poll_interval: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(**options)

    async def _start(self) -> None:
        raise NotImplementedError("the rabbitmq backend is not implemented yet")

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
